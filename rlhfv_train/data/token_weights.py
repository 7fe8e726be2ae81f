"""Token weights from a fine-grained correction (DESIGN.md §2, RLHF-V's Dense DPO).

The chosen answer is the annotator's correction of the rejected one. Tokens the annotator rewrote get weight gamma
on both sides; everything else keeps weight 1.
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence


def correction_weights(chosen_ids: Sequence[int], rejected_ids: Sequence[int], gamma: float,
                       min_match: int = 3) -> tuple[list[float], list[float]]:
    """Per-token weights (chosen, rejected) for a corrected pair.

    The two token-id sequences are aligned with difflib.SequenceMatcher. Matching blocks shorter than `min_match`
    tokens are dropped, so they merge into the changed span around them (a shared "a" or "the" inside a rewrite does
    not split it). Between the kept blocks, a span changed on both sides is a replacement and gets weight `gamma` on
    both sides; a span present on one side only (a pure insertion or deletion) keeps weight 1.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if min_match < 1:
        raise ValueError(f"min_match must be >= 1, got {min_match}")
    chosen, rejected = list(chosen_ids), list(rejected_ids)
    chosen_w = [1.0] * len(chosen)
    rejected_w = [1.0] * len(rejected)
    matcher = difflib.SequenceMatcher(a=chosen, b=rejected, autojunk=False)
    kept = [block for block in matcher.get_matching_blocks() if block.size >= min_match]
    # Walk the gaps between kept blocks, with a sentinel block at the end of both sequences.
    prev_chosen = prev_rejected = 0
    for block in kept + [difflib.Match(len(chosen), len(rejected), 0)]:
        chosen_gap = range(prev_chosen, block.a)
        rejected_gap = range(prev_rejected, block.b)
        if len(chosen_gap) and len(rejected_gap):
            for i in chosen_gap:
                chosen_w[i] = float(gamma)
            for i in rejected_gap:
                rejected_w[i] = float(gamma)
        prev_chosen, prev_rejected = block.a + block.size, block.b + block.size
    return chosen_w, rejected_w

"""Rewards for online GRPO (Generative RLHF-V): pointwise rewards, pairwise judges, the grouped-comparison score and
group-normalised advantages. Pure functions of answers; the rollout loop that uses them is rlhfv_train.grpo's job.

Grouped comparison: each of a prompt's k answers is judged against every other one in both orders (a pairwise judge
is biased by position), and its score is the mean of its win probabilities:
    S(y_i) = 1 / (2 (k - 1)) * sum_{j != i} [ P(y_i beats y_j | y_i shown first) + P(y_i beats y_j | y_j shown first) ]
A judge here is a callable (record, pairs) -> P(first answer of each pair is better), one float in [0, 1] per pair,
so that a model-based judge can score all k (k - 1) ordered pairs of a group in one batch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .data import PreferenceRecord

Judge = Callable[[PreferenceRecord, Sequence[tuple[str, str]]], Sequence[float]]


def grouped_comparison(record: PreferenceRecord, answers: Sequence[str], judge: Judge) -> list[float]:
    """S(y_i) for each of `answers` (k >= 2) to the prompt of `record`, from all k (k - 1) ordered pairs."""
    k = len(answers)
    if k < 2:
        raise ValueError(f"grouped comparison needs at least 2 answers per prompt, got {k}")
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    scores = list(judge(record, [(answers[i], answers[j]) for i, j in pairs]))
    if len(scores) != len(pairs):
        raise ValueError(f"the judge returned {len(scores)} scores for {len(pairs)} pairs")
    wins = [0.0] * k
    for (i, j), p in zip(pairs, scores):
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"the judge returned {p}, not a probability in [0, 1]")
        wins[i] += p        # y_i shown first
        wins[j] += 1.0 - p  # y_j shown second: it wins when the first loses
    return [w / (2 * (k - 1)) for w in wins]


def group_advantages(rewards: torch.Tensor, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards [groups, k] -> advantages [groups, k]: minus the group mean, divided by the group std when `scale`
    (GRPO; Dr. GRPO sets scale=False). A group whose answers all score alike gets zero advantages."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, k] with k >= 2, got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


class SceneJudge:
    """The exact judge for the synthetic scenes: of two answers, the one with fewer hallucinated objects wins, then the
    one with more correct objects; a tie is 0.5. Needs records with ground-truth `objects`."""

    def __init__(self, parser: Callable[[str], Sequence] | None = None):
        if parser is None:
            from .synthetic import parse_description as parser
        self.parser = parser

    def counts(self, record: PreferenceRecord, answer: str) -> tuple[int, int]:
        """(hallucinated, correct) objects of `answer`, each mention counted once."""
        if record.objects is None:
            raise ValueError(f"{record.source}: the scene judge needs the record's ground-truth 'objects'")
        mentioned, present = set(self.parser(answer)), set(record.objects)
        return len(mentioned - present), len(mentioned & present)

    def __call__(self, record: PreferenceRecord, pairs: Sequence[tuple[str, str]]) -> list[float]:
        scores = []
        for first, second in pairs:
            wrong_a, right_a = self.counts(record, first)
            wrong_b, right_b = self.counts(record, second)
            key_a, key_b = (-wrong_a, right_a), (-wrong_b, right_b)
            scores.append(1.0 if key_a > key_b else 0.0 if key_a < key_b else 0.5)
        return scores


def scene_reward(record: PreferenceRecord, answer: str, parser=None) -> float:
    """A pointwise reward for the synthetic scenes: (correct - hallucinated objects) / objects in the image."""
    wrong, right = SceneJudge(parser).counts(record, answer)
    return (right - wrong) / max(len(set(record.objects)), 1)

"""Hallucination in generated answers, CHAIR-style: what RLHF-V exists to reduce.

    python -m rlhfv_train.eval --checkpoint runs/rlhfv/checkpoint.pt          # the run's held-out images
    python -m rlhfv_train.eval --model ./my-vlm --data eval.jsonl --parser mypkg.parse:objects

The model answers each record's question about its image (greedy by default; --sample draws --num-samples answers
at --temperature), prompted as the trainers prompt: the processor's chat template when it has one (what the run used,
with --checkpoint), --no-chat-template for the plain '<image> question'. A parser turns each answer into the objects
it mentions, which are compared with the record's ground-truth "objects":
  chair_s  response level: the share of answers that mention at least one object that is not in the image;
  chair_i  object level: hallucinated mentions / all mentions (each answer's mentions counted once);
  recall   correctly mentioned objects / objects in the images;
  mentioned  objects mentioned per answer (an answer that says nothing has no hallucination, and no recall).
The default parser reads the synthetic scenes' "a <colour> <shape> on the <side>" (synthetic.parse_description); for
other data pass --parser module:function, a function from the answer text to a list of objects comparable with the
records' "objects" entries (JSON lists become tuples). Bad flags, data or paths end with one line on stderr, exit 2.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from ..data import PreferenceRecord, as_hashable
from ..run.cli import load_callable
from .generation import GenerationSettings, generate_answers

METRICS = ("chair_s", "chair_i", "recall", "mentioned")  # what a run records of hallucination_rates()


def default_parser(text: str) -> list:
    from ..data.synthetic import parse_description
    return parse_description(text)


def load_parser(spec: str | None) -> Callable[[str], Sequence]:
    """'package.module:function' -> that function; None -> the synthetic scenes' parser."""
    return default_parser if spec is None else load_callable(spec, "--parser")


def _as_set(objects, what: str) -> set:
    try:
        return {as_hashable(o) for o in objects}
    except TypeError as exc:
        raise ValueError(f"{what} must be an iterable of hashable objects ({exc})") from None


def hallucination_rates(answers: Sequence[str], truths: Sequence[Sequence], parser=default_parser) -> dict:
    """CHAIR-style rates of `answers` against the ground-truth objects (one truth list per answer); see the module
    docstring for the definitions."""
    if len(answers) != len(truths):
        raise ValueError(f"{len(answers)} answers for {len(truths)} ground-truth lists")
    if not answers:
        raise ValueError("no answers to evaluate")
    hallucinating = mentions = hallucinated = found = present = 0
    for answer, truth in zip(answers, truths):
        mentioned = _as_set(parser(answer), "the parser's result")
        real = _as_set(truth, "ground-truth objects")
        wrong = mentioned - real
        hallucinating += bool(wrong)
        mentions += len(mentioned)
        hallucinated += len(wrong)
        found += len(mentioned & real)
        present += len(real)
    return {"chair_s": hallucinating / len(answers), "chair_i": hallucinated / mentions if mentions else 0.0,
            "recall": found / present if present else 0.0, "mentioned": mentions / len(answers),
            "answers": len(answers)}


def evaluate_hallucination(model, processor, records: Sequence[PreferenceRecord], parser=default_parser,
                           settings: GenerationSettings | None = None, *, device=None, autocast_dtype=None,
                           progress=None) -> tuple[dict, list[list[str]]]:
    """(rates over every generated answer, the answers per record) for records that carry ground-truth objects."""
    missing = [r.source for r in records if r.objects is None]
    if missing:
        raise ValueError(f"{len(missing)} of {len(records)} records have no 'objects' (the ground truth the "
                         f"hallucination metric needs), e.g. {missing[0]}")
    answers = generate_answers(model, processor, records, settings, device=device, autocast_dtype=autocast_dtype,
                               progress=progress)
    flat = [a for per_record in answers for a in per_record]
    truths = [r.objects for r, per_record in zip(records, answers) for _ in per_record]
    return hallucination_rates(flat, truths, parser), answers

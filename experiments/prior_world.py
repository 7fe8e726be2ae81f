"""Issue 46, step 1: a synthetic world whose captions carry language priors, and the hallucination profile of a model
warmed up by SFT on it, split into prior-driven and perception errors, before any preference training.

    python -m experiments.prior_world               # 3 seeds' profiles and their mean, to benchmarks/results/
    python -m experiments.prior_world --quick       # a few steps: checks the pipeline, not the outcome

The world: scenes drawn as rlhfv_train.data.synthetic draws them (the same words, tokenizer and tiny model), with two
priors in the training captions, which describe every scene correctly:
- co-occurrence: a scene with a square also shows a circle (in another column) with probability pair_prob, so the
  captions almost always name a circle after a square;
- colour: each object has its shape's typical colour (synthetic.TYPICAL_COLOR) with probability color_prob.

The probes (fresh held-out scenes, greedy answers) tell the two kinds of error apart:
- partner: a square and no circle. A prior error names a circle. Its control: the same scenes with the square made a
  triangle or a diamond; a circle named there is a perception error, the rate with no prior pointing at one.
- colour: one object in another shape's typical colour (never one confusable with its own typical colour). A
  shape-from-colour error names the colour's typical shape (a blue triangle read as a blue square), against the
  control of naming any one other wrong shape; a colour-from-shape error names the shape's typical colour, against
  any one other wrong colour.
- plain: scenes as the training ones, scored with the usual rates (chair_s, chair_i, recall).
- unbiased: scenes of the world the model meets after its warm-up (EVAL_WORLD: shapes drawn independently, half the
  objects in their typical colour), scored with the usual rates and each hallucinated mention told apart
  by error_kinds (ERROR_KINDS).
A prior drives hallucination when its error rate is several times its control's.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
from dataclasses import asdict, dataclass

from rlhfv_train.data.synthetic import (COLORS, CONFUSABLE, QUESTIONS, SHAPES, SIDES, TYPICAL_COLOR, Object,
                                        describe, draw, hallucinate, parse_description)

PARTNER = ("square", "circle")  # (shape, the shape the captions name beside it)
ERROR_KINDS = ("co-occurrence prior", "shape from colour", "colour from shape", "perception")
TYPICAL_SHAPE = {colour: shape for shape, colour in TYPICAL_COLOR.items()}


@dataclass(frozen=True)
class World:
    pair_prob: float = 0.95   # P(a circle too | a square), in the training scenes
    color_prob: float = 0.9   # P(the shape's typical colour), per object

    def check(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


# The images the model meets after its warm-up: shapes independent (no circle follows a square) and half the objects
# in their typical colour, as in the default synthetic scenes (synthetic._random_object); fixed from the SFT profile.
EVAL_WORLD = World(pair_prob=0.0, color_prob=0.5)


def _object(side: str, rng: random.Random, world: World, shapes=SHAPES) -> Object:
    shape = rng.choice(shapes)
    color = TYPICAL_COLOR[shape] if rng.random() < world.color_prob else rng.choice(list(COLORS))
    return (color, shape, side)


def training_scene(rng: random.Random, world: World) -> list[Object]:
    """1 to 3 objects, one per column, with the world's priors."""
    sides = sorted(rng.sample(SIDES, rng.choice((1, 2, 2, 3))), key=SIDES.index)
    objects = [_object(side, rng, world) for side in sides]
    shapes = [o[1] for o in objects]
    key, partner = PARTNER
    if key in shapes and partner not in shapes and rng.random() < world.pair_prob:
        free = [s for s in SIDES if s not in sides]
        if free:
            objects.append(_object(rng.choice(free), rng, world, shapes=(partner,)))
        else:  # every column taken: another object becomes the circle (one of the squares if all are)
            others = [k for k, o in enumerate(objects) if o[1] != key] or list(range(1, len(objects)))
            i = rng.choice(others)
            objects[i] = _object(objects[i][2], rng, world, shapes=(partner,))
    return sorted(objects, key=lambda o: SIDES.index(o[2]))


def partner_probe(rng: random.Random, world: World, control: bool) -> list[Object]:
    """A square (control: a triangle or a diamond in its place) and at most one other object, never a circle."""
    key, partner = PARTNER
    others = tuple(s for s in SHAPES if s not in PARTNER)
    sides = rng.sample(SIDES, rng.choice((1, 2)))  # in random order: the square's column is the first
    objects = [_object(sides[0], rng, world, shapes=others if control else (key,))]
    objects += [_object(side, rng, world, shapes=others) for side in sides[1:]]
    return sorted(objects, key=lambda o: SIDES.index(o[2]))


def atypical_colours(shape: str) -> list[str]:
    """Colours of `shape` that are neither its typical colour nor confusable with it (a wrong typical colour there is
    not a perception slip)."""
    typical = TYPICAL_COLOR[shape]
    return [c for c in COLORS if c != typical and c not in CONFUSABLE[typical] and typical not in CONFUSABLE[c]]


def colour_probe(rng: random.Random) -> list[Object]:
    """One object in the typical colour of another shape (so that both priors point away from the truth)."""
    shape = rng.choice(SHAPES)
    return [(rng.choice([c for c in atypical_colours(shape) if c in TYPICAL_SHAPE]), shape, rng.choice(SIDES))]


def record(objects: list[Object], rng: random.Random, image_size: int = 32):
    """A PreferenceRecord of the scene (chosen: its correct caption; rejected: a hallucinated one), image as PNG."""
    from rlhfv_train.data import PreferenceRecord
    buffer = io.BytesIO()
    draw(objects, image_size, rng).save(buffer, format="PNG")
    return PreferenceRecord(question=rng.choice(QUESTIONS), chosen=describe(objects),
                            rejected=describe(hallucinate(objects, rng)), images=(buffer.getvalue(),),
                            objects=[tuple(o) for o in objects], source="prior world")


def partner_errors(answers: list[str]) -> float:
    """The share of answers that name a circle (the probes show none)."""
    partner = PARTNER[1]
    return sum(any(shape == partner for _, shape, _ in parse_description(a)) for a in answers) / max(len(answers), 1)


def colour_errors(answers: list[str], scenes: list[list[Object]]) -> dict[str, float]:
    """On colour probes: the share of answers that name, at the object's place, the colour's typical shape, one given
    other wrong shape (the control: the other wrong shapes' rate divided by their number), the shape's typical colour,
    and one given other wrong colour (its control)."""
    counts = dict.fromkeys(("typical shape", "other shape", "typical colour", "other colour"), 0.0)
    for answer, ((colour, shape, side),) in zip(answers, scenes):
        said = [(c, s) for c, s, where in parse_description(answer) if where == side]
        if not said:
            continue
        c, s = said[0]
        if s == TYPICAL_SHAPE[colour]:  # (never the object's own shape: the probe's colour is another shape's)
            counts["typical shape"] += 1
        elif s != shape:
            counts["other shape"] += 1 / (len(SHAPES) - 2)  # one of the wrong shapes that are not the typical one
        elif c == TYPICAL_COLOR[shape]:
            counts["typical colour"] += 1
        elif c != colour:
            counts["other colour"] += 1 / (len(COLORS) - 2)
    return {name: n / max(len(answers), 1) for name, n in counts.items()}


def error_kinds(answer: str, scene: list[Object]) -> dict[str, int]:
    """The answer's hallucinated mentions (those not in the scene), each counted under one of ERROR_KINDS:
    - co-occurrence prior: a circle, in a scene with a square and no circle;
    - shape from colour: at an object's place, the object's colour with that colour's typical shape in place of the
      object's own shape;
    - colour from shape: at an object's place, the right shape in its typical colour, where the object has another
      colour that is not confusable with the typical one;
    - perception: any other wrong mention."""
    counts = dict.fromkeys(ERROR_KINDS, 0)
    shapes = {o[1] for o in scene}
    at = {o[2]: o for o in scene}
    for colour, shape, side in set(parse_description(answer)) - set(scene):
        there = at.get(side)
        if shape == PARTNER[1] and PARTNER[0] in shapes and PARTNER[1] not in shapes:
            counts["co-occurrence prior"] += 1
        elif there is not None and there[0] == colour and TYPICAL_SHAPE.get(colour) == shape:
            counts["shape from colour"] += 1
        elif (there is not None and there[1] == shape and colour == TYPICAL_COLOR[shape]
              and there[0] in atypical_colours(shape)):
            counts["colour from shape"] += 1
        else:
            counts["perception"] += 1
    return counts


def error_split(answers: list[str], scenes: list[list[Object]]) -> dict[str, float]:
    """Hallucinated mentions per answer, by kind (error_kinds), over all answers."""
    total = dict.fromkeys(ERROR_KINDS, 0)
    for answer, scene in zip(answers, scenes):
        for kind, n in error_kinds(answer, scene).items():
            total[kind] += n
    return {kind: n / max(len(answers), 1) for kind, n in total.items()}


def profile(model, processor, world: World, probes: int, seed: int) -> dict:
    """The model's greedy answers on each probe set and the rates of the module docstring."""
    from rlhfv_train.eval import evaluate_hallucination, generate_answers

    rng = random.Random(seed + 104729)
    sets = {"partner": [partner_probe(rng, world, False) for _ in range(probes)],
            "partner-control": [partner_probe(rng, world, True) for _ in range(probes)],
            "colour": [colour_probe(rng) for _ in range(probes)],
            "plain": [training_scene(rng, world) for _ in range(probes)],
            "unbiased": [training_scene(rng, EVAL_WORLD) for _ in range(probes)]}
    records = {name: [record(scene, rng) for scene in scenes] for name, scenes in sets.items()}
    answers = {name: [a[0] for a in generate_answers(model, processor, recs)] for name, recs in records.items()
               if name not in ("plain", "unbiased")}
    colour = colour_errors(answers["colour"], sets["colour"])
    rates, _ = evaluate_hallucination(model, processor, records["plain"])
    unbiased, unbiased_answers = evaluate_hallucination(model, processor, records["unbiased"])
    split = error_split([a[0] for a in unbiased_answers], sets["unbiased"])
    return {"circle named beside a square (prior)": partner_errors(answers["partner"]),
            "circle named, no square (control)": partner_errors(answers["partner-control"]),
            "colour's typical shape named (prior)": colour["typical shape"],
            "one other wrong shape named (control)": colour["other shape"],
            "shape's typical colour named (prior)": colour["typical colour"],
            "one other wrong colour named (control)": colour["other colour"],
            **{f"plain {name}": value for name, value in rates.items()},
            **{f"unbiased {name}": value for name, value in unbiased.items()},
            **{f"unbiased {kind} errors per answer": value for kind, value in split.items()},
            "examples": {name: values[:3] for name, values in answers.items()}}


def warm_up(seed: int, world: World, *, examples: int, sft_steps: int, sft_lr: float, batch_size: int):
    """(processor, SFT model, the seed's scene generator after the captions, SFT losses): the tiny model trained on
    `examples` correct captions of `world` (the same model for the profile and the study's seed)."""
    import torch

    from rlhfv_train.models import load_processor_and_model
    from experiments.ablation import _supervised

    world.check()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    captions = [record(training_scene(rng, world), rng) for _ in range(examples)]
    processor, model = load_processor_and_model(None, seed)
    losses = _supervised(model, processor, captions, steps=sft_steps, lr=sft_lr, batch_size=batch_size,
                         order_seed=seed + 7919)
    return processor, model, rng, losses


def run(args) -> dict:
    world = World(args.pair_prob, args.color_prob)
    profiles = []
    for seed in range(args.seed, args.seed + args.seeds):
        processor, model, _, losses = warm_up(seed, world, examples=args.examples, sft_steps=args.sft_steps,
                                              sft_lr=args.sft_lr, batch_size=args.batch_size)
        profiles.append({"seed": seed, "sft_final_loss": losses[-1] if losses else None,
                         "profile": profile(model, processor, world, args.probes, seed)})
    rates = [name for name, value in profiles[0]["profile"].items() if isinstance(value, float)]
    return {"world": asdict(world), "eval_world": asdict(EVAL_WORLD), "examples": args.examples,
            "sft_steps": args.sft_steps, "probes": args.probes,
            "mean": {name: sum(p["profile"][name] for p in profiles) / len(profiles) for name in rates},
            "seeds": profiles}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.prior_world", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair-prob", type=float, default=World.pair_prob)
    parser.add_argument("--color-prob", type=float, default=World.color_prob)
    parser.add_argument("--examples", type=int, default=1536, help="training scenes")
    parser.add_argument("--sft-steps", type=int, default=2000)
    parser.add_argument("--sft-lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--probes", type=int, default=200, help="scenes per probe set")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=3, help="seeds profiled (each its own SFT model)")
    parser.add_argument("--out", default="benchmarks/results/prior-world-profile-cpu.json")
    parser.add_argument("--quick", action="store_true", help="64 scenes, 20 steps, 8 probes: a pipeline check")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.examples, args.sft_steps, args.probes, args.seeds = 64, 20, 8, 1
    result = run(args)
    text = json.dumps(result, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

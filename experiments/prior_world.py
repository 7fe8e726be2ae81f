"""Issue 46, step 1: a synthetic world whose captions carry language priors, and the hallucination profile of a model
warmed up by SFT on it, split into prior-driven and perception errors, before any preference training.

    python -m experiments.prior_world               # 1 seed, the profile, written to benchmarks/results/
    python -m experiments.prior_world --quick       # a few steps: checks the pipeline, not the outcome

The world: scenes drawn as rlhfv_train.data.synthetic draws them (the same words, tokenizer and tiny model), with two
priors in the training captions, which describe every scene correctly:
- co-occurrence: a scene with a square also shows a circle (in another column) with probability pair_prob, so the
  captions almost always name a circle after a square;
- colour: each object has its shape's typical colour (synthetic.TYPICAL_COLOR) with probability color_prob.

The probes (fresh held-out scenes, greedy answers) tell the two kinds of error apart:
- partner: a square and no circle. A prior error names a circle. Its control: the same scenes with the square made a
  triangle or a diamond; a circle named there is a perception error, the rate with no prior pointing at one.
- colour: one object in a colour that is neither its typical colour nor confusable with it. A prior error names the
  typical colour; its control is the rate of naming any one other wrong colour (the other wrong colours' rate divided
  by their number).
- plain: scenes as the training ones, scored with the usual rates (chair_s, chair_i, recall).
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


@dataclass(frozen=True)
class World:
    pair_prob: float = 0.95   # P(a circle too | a square), in the training scenes
    color_prob: float = 0.9   # P(the shape's typical colour), per object

    def check(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


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
    shape = rng.choice(SHAPES)
    return [(rng.choice(atypical_colours(shape)), shape, rng.choice(SIDES))]


def record(objects: list[Object], rng: random.Random, image_size: int = 32):
    """A PreferenceRecord of the scene (chosen: its correct caption; rejected: a hallucinated one), image as PNG."""
    from rlhfv_train.data import PreferenceRecord
    buffer = io.BytesIO()
    draw(objects, image_size, rng).save(buffer, format="PNG")
    return PreferenceRecord(question=rng.choice(QUESTIONS), chosen=describe(objects),
                            rejected=describe(hallucinate(objects, rng)), images=(buffer.getvalue(),),
                            objects=[list(o) for o in objects], source="prior world")


def partner_errors(answers: list[str]) -> float:
    """The share of answers that name a circle (the probes show none)."""
    partner = PARTNER[1]
    return sum(any(shape == partner for _, shape, _ in parse_description(a)) for a in answers) / max(len(answers), 1)


def colour_errors(answers: list[str], scenes: list[list[Object]]) -> tuple[float, float]:
    """(share of answers naming the object's typical colour, share naming one given other wrong colour): the colour
    the answer gives the object's shape at its side, when it names it there."""
    typical = other = 0
    for answer, ((colour, shape, side),) in zip(answers, scenes):
        said = [c for c, s, where in parse_description(answer) if s == shape and where == side]
        if not said or said[0] == colour:
            continue
        if said[0] == TYPICAL_COLOR[shape]:
            typical += 1
        else:
            other += 1 / (len(COLORS) - 2)  # one of the wrong colours that are not the typical one
    return typical / max(len(answers), 1), other / max(len(answers), 1)


def profile(model, processor, world: World, probes: int, seed: int) -> dict:
    """The model's greedy answers on each probe set and the rates of the module docstring."""
    from rlhfv_train.eval import evaluate_hallucination, generate_answers

    rng = random.Random(seed + 104729)
    sets = {"partner": [partner_probe(rng, world, False) for _ in range(probes)],
            "partner-control": [partner_probe(rng, world, True) for _ in range(probes)],
            "colour": [colour_probe(rng) for _ in range(probes)],
            "plain": [training_scene(rng, world) for _ in range(probes)]}
    records = {name: [record(scene, rng) for scene in scenes] for name, scenes in sets.items()}
    answers = {name: [a[0] for a in generate_answers(model, processor, recs)] for name, recs in records.items()
               if name != "plain"}
    typical, other = colour_errors(answers["colour"], sets["colour"])
    rates, _ = evaluate_hallucination(model, processor, records["plain"])
    return {"circle named beside a square (prior)": partner_errors(answers["partner"]),
            "circle named, no square (control)": partner_errors(answers["partner-control"]),
            "typical colour named (prior)": typical, "one other wrong colour named (control)": other,
            **{f"plain {name}": value for name, value in rates.items()},
            "examples": {name: values[:3] for name, values in answers.items()}}


def run(args) -> dict:
    import torch

    from rlhfv_train.models import load_processor_and_model
    from experiments.ablation import _supervised

    world = World(args.pair_prob, args.color_prob)
    world.check()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train = [record(training_scene(rng, world), rng) for _ in range(args.examples)]
    processor, model = load_processor_and_model(None, args.seed)
    losses = _supervised(model, processor, train, steps=args.sft_steps, lr=args.sft_lr, batch_size=args.batch_size,
                         order_seed=args.seed + 7919)
    result = {"world": asdict(world), "seed": args.seed, "examples": args.examples, "sft_steps": args.sft_steps,
              "sft_final_loss": losses[-1], "probes": args.probes,
              "profile": profile(model, processor, world, args.probes, args.seed)}
    return result


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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/prior-world-profile-cpu.json")
    parser.add_argument("--quick", action="store_true", help="64 scenes, 20 steps, 8 probes: a pipeline check")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.examples, args.sft_steps, args.probes = 64, 20, 8
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

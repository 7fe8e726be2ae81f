"""A small synthetic RLHF-V-style dataset: images of coloured shapes, each with a correct (chosen) description, a
hallucinated (rejected) one that an annotator would correct, and the ground-truth objects.

    python -m rlhfv_train.data.synthetic --out data/synthetic --n 512

writes data/synthetic/images/*.png and data/synthetic/data.jsonl. The words used are fixed (VOCABULARY), so the
embedded tiny model's tokenizer is built from them in code. Every record carries "objects" ([colour, shape, side]
triples), which rlhfv_train.eval compares generated answers against (parse_description reads them back).

The scenes are meant to be hard for a tiny model, so that a model trained on the correct answers still hallucinates
and preference training has something to remove (the first version, two big shapes on a clean background, was
described perfectly after 250 SFT steps): up to three small objects with jittered size and position, confusable
colours (orange between red and yellow, purple next to blue) and shapes (a diamond is a turned square), pixel noise,
and a co-occurrence prior (each shape has a typical colour half of the time), the kind of language bias that makes
real models name what usually goes with what they see. A rejected answer has one or two errors of the kinds models
make: a confusable colour or shape, or an object where there is none; its "reward_margin" (for MM-DPO) is the number
of such wrong objects.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re

COLORS = {"red": (215, 45, 40), "orange": (235, 135, 35), "yellow": (225, 205, 40), "green": (45, 165, 65),
          "blue": (45, 85, 215), "purple": (135, 60, 185)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIDES = ("left", "middle", "right")
QUESTIONS = ("describe the image .", "what do you see ?")
TYPICAL_COLOR = {"circle": "red", "square": "blue", "triangle": "yellow", "diamond": "green"}  # the prior
CONFUSABLE = {"red": ("orange",), "orange": ("red", "yellow"), "yellow": ("orange",), "green": ("yellow",),
              "blue": ("purple",), "purple": ("blue",), "circle": ("diamond",), "square": ("diamond",),
              "triangle": ("diamond",), "diamond": ("square", "circle")}
_FIXED_WORDS = "there is a an and on the of in image describe what do you see . ? object objects one two".split()
VOCABULARY = sorted(set(_FIXED_WORDS) | set(COLORS) | set(SHAPES) | set(SIDES))

Object = tuple  # (color, shape, side)


def describe(objects: list[Object]) -> str:
    """objects: (color, shape, side) -> 'there is a red circle on the left and a blue square in the middle .'"""
    parts = [f"a {color} {shape} {'in' if side == 'middle' else 'on'} the {side}" for color, shape, side in objects]
    return "there is " + " and ".join(parts) + " ."


_MENTION = re.compile(r"\b(\w+) (\w+) (?:on|in) the (\w+)\b")


def parse_description(text: str) -> list[Object]:
    """The objects an answer mentions, as (color, shape, side) triples: every '<colour> <shape> on/in the <side>' with
    known words, in order, duplicates kept (the metric decides how to count them). Anything else is ignored."""
    return [m.groups() for m in _MENTION.finditer(text)
            if m.group(1) in COLORS and m.group(2) in SHAPES and m.group(3) in SIDES]


def correct(mentioned: list[Object], objects: list[Object]) -> list[Object]:
    """An annotator's minimal correction of an answer that mentions `mentioned` in a scene of `objects`: a mention at
    a place where there is an object becomes that object (right colour and shape), a mention at an empty place is
    deleted. Objects the answer left out are not added (corrections fix hallucinations, they do not complete)."""
    present = {}
    for o in objects:  # in a column of stacked objects, the k-th mention there stands for the k-th object there
        present.setdefault(o[2], []).append(o)
    used = {side: 0 for side in present}
    fixed = []
    for _, _, side in mentioned:
        if used.get(side, 0) < len(present.get(side, ())):
            fixed.append(present[side][used[side]])
            used[side] += 1
    return fixed


def _confuse(value: str, choices, rng: random.Random) -> str:
    """A wrong value, usually a confusable one (what a model that half-sees would say)."""
    if rng.random() < 0.7:
        return rng.choice(CONFUSABLE[value])
    return rng.choice([c for c in choices if c != value])


def hallucinate(objects: list[Object], rng: random.Random, per_side: int = 1) -> list[Object]:
    """A plausible wrong description with one or two errors: a confusable colour or shape (a replacement), or an
    object in a free place (the correction deletes it)."""
    return hallucinate_in_steps(objects, rng, per_side)[-1]


def hallucinate_in_steps(objects: list[Object], rng: random.Random, per_side: int = 1) -> list[list[Object]]:
    """hallucinate(), with the description after each error: [one error] or [one error, two errors]."""
    wrong = list(objects)
    steps = []
    for _ in range(1 if rng.random() < 0.6 else 2):
        free = [s for s in SIDES if sum(o[2] == s for o in wrong) < per_side]
        # An error never repeats an object of the same column (the metric counts mentions once, so it would vanish).
        if free and rng.random() < 0.3:
            added = _random_object(rng.choice(free), rng)
            while added in wrong:
                added = _random_object(added[2], rng)
            wrong.append(added)
            wrong.sort(key=lambda o: SIDES.index(o[2]))
            steps.append(list(wrong))
            continue
        i = rng.randrange(len(wrong))
        changed = wrong[i]
        while changed in wrong:
            color, shape, side = wrong[i]
            if rng.random() < 0.5:
                color = _confuse(color, COLORS, rng)
            else:
                shape = _confuse(shape, SHAPES, rng)
            changed = (color, shape, side)
        wrong[i] = changed
        steps.append(list(wrong))
    if wrong == list(objects):  # two errors that undid each other
        return hallucinate_in_steps(objects, rng, per_side)
    return steps


def draw(objects: list[Object], size: int = 32, rng: random.Random | None = None):
    """The scene as a PIL image; `rng` jitters sizes, positions and colours and adds pixel noise."""
    from PIL import Image, ImageDraw

    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), (245, 245, 245))
    pen = ImageDraw.Draw(image)
    column = size / len(SIDES)
    stacked = {side: [o for o in objects if o[2] == side] for side in SIDES}
    for obj in objects:
        color, shape, side = obj
        rows = len(stacked[side])
        band = size / rows
        extent = min(column, band) * (rng.uniform(0.55, 0.9) if rows == 1 else rng.uniform(0.6, 0.9))
        cx = column * (SIDES.index(side) + 0.5) + rng.uniform(-1, 1) * (column - extent) / 2
        if rows == 1:  # alone in its column: anywhere around the middle
            cy = size / 2 + rng.uniform(-1, 1) * size / 5
        else:  # stacked: the k-th object of the column in the k-th band from the top
            cy = band * (stacked[side].index(obj) + 0.5) + rng.uniform(-1, 1) * (band - extent) / 2
        x0, y0, x1, y1 = cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2
        fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLORS[color])
        if shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape == "triangle":
            pen.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
        else:
            pen.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    noise = bytes(max(0, min(255, v + int(rng.gauss(0, 12)))) for v in image.tobytes())
    return Image.frombytes("RGB", image.size, noise)


def write_video(path: str, objects: list[Object], frames: int, *, size: int = 32, fps: int = 4, seed: int = 0) -> str:
    """The scene as a short clip (MPEG-4 part 2, which every PyAV build encodes): `frames` frames, each drawn anew
    (the jitter of draw() makes them move). Needs PyAV (the `av` package)."""
    import av

    rng = random.Random(seed)
    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_image(draw(objects, size, rng))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the encoder
    return path


def _random_object(side: str, rng: random.Random) -> Object:
    shape = rng.choice(SHAPES)
    color = TYPICAL_COLOR[shape] if rng.random() < 0.5 else rng.choice(list(COLORS))
    return (color, shape, side)


def make_example(rng: random.Random, partial: float = 0.0, per_side: int = 1) -> dict:
    """A scene, its question and a (chosen, rejected) pair. With probability `partial`, a rejected answer with two
    errors is only partly corrected: the chosen answer fixes the second error and keeps the first (annotators miss
    things), so the chosen answer hallucinates too and plain SFT on it learns that error. per_side = 2 stacks up to
    two objects per column (3 to 6 objects, described column by column, top first): long answers in which an error
    is a small part."""
    if per_side == 1:
        sides = sorted(rng.sample(SIDES, rng.choice((1, 2, 2, 3))), key=SIDES.index)
    else:
        slots = sorted(rng.sample([(s, row) for s in SIDES for row in range(per_side)],
                                  rng.randint(len(SIDES), len(SIDES) * per_side)))
        sides = sorted((s for s, _ in slots), key=SIDES.index)
    objects = []
    for side in sides:
        obj = _random_object(side, rng)
        while obj in objects:  # two equal objects in one column would read as one
            obj = _random_object(side, rng)
        objects.append(obj)
    steps = hallucinate_in_steps(objects, rng, per_side)
    wrong = steps[-1]
    kept = steps[0] if partial and len(steps) == 2 and rng.random() < partial else objects
    # MM-DPO's reward margin, here exact: how many more wrong objects the rejected answer has than the chosen one.
    margin = len(set(wrong) - set(objects)) - len(set(kept) - set(objects))
    return {"objects": objects, "question": rng.choice(QUESTIONS), "chosen": describe(kept),
            "rejected": describe(wrong), "reward_margin": margin}


def generate(out_dir: str, n: int, *, seed: int = 0, image_size: int = 32, partial: float = 0.0,
             per_side: int = 1, progress: bool = False) -> str:
    """Writes n examples (images + data.jsonl) under out_dir and returns the JSONL path; `partial`, `per_side`: see
    make_example."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    if not 0.0 <= partial <= 1.0:
        raise ValueError(f"partial must be in [0, 1], got {partial}")
    if per_side not in (1, 2):
        raise ValueError(f"per_side must be 1 or 2, got {per_side}")
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, "data.jsonl")
    tmp = path + ".tmp"
    indices = range(n)
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc="synthetic data", unit="img")
    with open(tmp, "w") as f:
        for i in indices:
            example = make_example(rng, partial, per_side)
            name = f"images/{i:05d}.png"
            draw(example["objects"], image_size, rng).save(os.path.join(out_dir, name))
            f.write(json.dumps({"image": name, "question": example["question"], "chosen": example["chosen"],
                                "rejected": example["rejected"], "reward_margin": example["reward_margin"],
                                "objects": example["objects"]}) + "\n")
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=512, help="number of examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--partial", type=float, default=0.0, help="share of two-error answers whose correction fixes "
                        "only one error (default: 0)")
    parser.add_argument("--per-side", type=int, default=1, choices=(1, 2), help="objects per column at most: 2 "
                        "gives 3 to 6 objects and long answers (default: 1)")
    args = parser.parse_args(argv)
    print(generate(args.out, args.n, seed=args.seed, image_size=args.image_size, partial=args.partial,
                   per_side=args.per_side, progress=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

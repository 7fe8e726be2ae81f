"""A small synthetic RLHF-V-style dataset: images of coloured shapes, each with a correct (chosen) description and a
hallucinated (rejected) one that an annotator would correct.

    python -m rlhfv_train.synthetic --out data/synthetic --n 512

writes data/synthetic/images/*.png and data/synthetic/data.jsonl. The words used are fixed (VOCABULARY), so the
embedded tiny model's tokenizer is built from them in code.
"""
from __future__ import annotations

import argparse
import json
import os
import random

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
QUESTIONS = ("describe the image .", "what do you see ?")
_FIXED_WORDS = "there is a an and on the of in image describe what do you see . ? object objects one two".split()
VOCABULARY = sorted(set(_FIXED_WORDS) | set(COLORS) | set(SHAPES) | set(SIDES))


def describe(objects: list[tuple[str, str, str]]) -> str:
    """objects: (color, shape, side) -> 'there is a red circle on the left and a blue square on the right .'"""
    parts = [f"a {color} {shape} on the {side}" for color, shape, side in objects]
    return "there is " + " and ".join(parts) + " ."


def hallucinate(objects: list[tuple[str, str, str]], rng: random.Random) -> list[tuple[str, str, str]]:
    """A plausible wrong description: a wrong colour or shape (a replacement), or an object that is not there."""
    wrong = list(objects)
    kind = rng.random()
    if kind < 0.35 and len(objects) == 1:  # invent a second object (the correction deletes it)
        free = [s for s in SIDES if s != objects[0][2]][0]
        wrong.append((rng.choice(list(COLORS)), rng.choice(SHAPES), free))
        return wrong
    i = rng.randrange(len(objects))
    color, shape, side = objects[i]
    if kind < 0.7:
        color = rng.choice([c for c in COLORS if c != color])
    else:
        shape = rng.choice([s for s in SHAPES if s != shape])
    wrong[i] = (color, shape, side)
    return wrong


def draw(objects: list[tuple[str, str, str]], size: int = 32):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 245))
    pen = ImageDraw.Draw(image)
    half = size // 2
    pad = max(1, size // 16)
    for color, shape, side in objects:
        x0 = (0 if side == "left" else half) + pad
        box = (x0, half // 2 + pad, x0 + half - 2 * pad, half // 2 + half - pad)
        fill = COLORS[color]
        if shape == "circle":
            pen.ellipse(box, fill=fill)
        elif shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    return image


def make_example(rng: random.Random) -> dict:
    sides = list(SIDES) if rng.random() < 0.6 else [rng.choice(SIDES)]
    objects = [(rng.choice(list(COLORS)), rng.choice(SHAPES), side) for side in sides]
    return {"objects": objects, "question": rng.choice(QUESTIONS), "chosen": describe(objects),
            "rejected": describe(hallucinate(objects, rng))}


def generate(out_dir: str, n: int, *, seed: int = 0, image_size: int = 32, progress: bool = False) -> str:
    """Writes n examples (images + data.jsonl) under out_dir and returns the JSONL path."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
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
            example = make_example(rng)
            name = f"images/{i:05d}.png"
            draw(example["objects"], image_size).save(os.path.join(out_dir, name))
            f.write(json.dumps({"image": name, "question": example["question"], "chosen": example["chosen"],
                                "rejected": example["rejected"]}) + "\n")
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=512, help="number of examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)
    print(generate(args.out, args.n, seed=args.seed, image_size=args.image_size, progress=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

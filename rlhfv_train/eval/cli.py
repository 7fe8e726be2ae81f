"""python -m rlhfv_train.eval: the hallucination metric (hallucination.py) of a trainer run or a model folder."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch

from ..data import load_records, split_indices
from ..models import load_processor_and_model, load_weights, read_weights
from ..models.lora import add_lora, lora_settings
from ..run import flags
from ..run.cli import USER_ERRORS, fail
from ..run.distributed import process_device
from ..run.flags import option
from . import hallucination
from .generation import GenerationSettings
from .hallucination import evaluate_hallucination, load_parser


@dataclass
class EvalConfig:
    """The command line's options (each field a flag, run/flags.py)."""
    checkpoint: str | None = option(None, "a trainer checkpoint (checkpoint.pt, sft.pt): its model, data and held-out "
                                    "split are reused")
    model: str | None = option(None, "a local Hugging Face model folder, evaluated as it is (without --checkpoint), "
                               "or the base the checkpoint's weights go into (default: the checkpoint's)")
    data: str | None = option(None, "records with images, questions and 'objects' (default: the checkpoint's data)")
    split: str | None = option(None, "records to evaluate (default: the checkpoint's held-out records, or all "
                               "records of --data without a checkpoint)", choices=("heldout", "all"))
    limit: int | None = option(None, "evaluate only the first N records of the split")
    parser: str | None = option(None, "module:function turning an answer into its objects (default: the synthetic "
                                "scenes' parser)")
    max_new_tokens: int = option(48, "answer length limit")
    sample: bool = option(False, "sample instead of greedy decoding")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling (1: off)")
    num_samples: int = option(1, "answers per image with --sample")
    batch_size: int = option(32, "images per generate() call")
    chat_template: bool = option(True, "prompt with the plain '<image> question' even when the processor has a chat "
                                 "template (default: the template, as the trainers do; with --checkpoint, what the "
                                 "run used)")
    seed: int = option(0, "sampling seed")
    device: str = option("auto", "cpu, cuda, cuda:1, ...")
    show: int = option(3, "print this many answers next to the truth")
    json: str | None = option(None, "also write the rates (and every answer) to this file")
    progress: bool = option(True, "no progress bar")


def build_parser() -> argparse.ArgumentParser:
    return flags.build_parser(EvalConfig, "python -m rlhfv_train.eval", hallucination.__doc__)


def _records_and_model(args):
    """(records to evaluate, processor, model, the run's config or {}) from the command line."""
    if args.checkpoint is None and args.model is None:
        raise ValueError("give --checkpoint (a trainer run) or --model (a local Hugging Face model folder)")
    saved = {}
    if args.checkpoint is not None:
        if not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
        saved = read_weights(args.checkpoint)
    config = saved.get("config", {}) if isinstance(saved, dict) else {}
    model_path = args.model or config.get("model")
    if model_path is not None and not os.path.isdir(model_path):
        raise FileNotFoundError(f"--model {model_path}: no such folder")
    data = args.data or saved.get("data_path") or config.get("data")  # data_path: the file the run really used
    if data is None:
        raise ValueError("no data: give --data (this checkpoint does not name its data file)")
    frames = config.get("video_frames", 8)  # the clips' frames as the run sampled them
    records, _ = load_records(data, video_frames=frames)
    split = args.split or ("heldout" if args.checkpoint and not args.data else "all")
    if split == "heldout":
        if not config:
            raise ValueError("--split heldout needs --checkpoint (the split comes from its seed and eval fraction)")
        if config.get("eval_data"):  # the run held out a file of its own
            records, _ = load_records(config["eval_data"], video_frames=frames)
        else:
            records = [records[i] for i in split_indices(len(records), config["eval_fraction"], config["seed"])[1]]
    if args.limit is not None:
        records = records[:args.limit]
    if not records:
        raise ValueError(f"no records to evaluate (split {split!r} of {data})")
    processor, model = load_processor_and_model(model_path, config.get("seed", 0))
    if args.checkpoint is not None:
        state = saved.get("model", saved) if isinstance(saved, dict) else {}
        if any(str(name).startswith("base_model.model.") for name in state):  # a LoRA run's (not its sft.pt)
            model = add_lora(model, lora_settings(config))
        load_weights(model, args.checkpoint, saved)
    return records, processor, model, config


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                      temperature=args.temperature, top_p=args.top_p, num_samples=args.num_samples,
                                      batch_size=args.batch_size, seed=args.seed)
        settings.check()
        parser = load_parser(args.parser)
        records, processor, model, config = _records_and_model(args)
        settings.chat_template = config.get("chat_template", True) and args.chat_template
        device = process_device(args.device)
        model.to(device)
        from tqdm import tqdm
        with tqdm(total=len(records), desc="generate", unit="img", disable=not args.progress) as bar:
            rates, answers = evaluate_hallucination(
                model, processor, records, parser, settings, device=device,
                autocast_dtype=torch.bfloat16 if device.type == "cuda" else None, progress=bar)
    except USER_ERRORS as exc:
        return fail("python -m rlhfv_train.eval", exc)
    for record, per_record in list(zip(records, answers))[:args.show]:
        print(f"{record.source}\n  truth:  {record.objects}\n  answer: {per_record[0]}")
    decoding = "greedy" if not settings.do_sample else \
        f"{settings.num_samples} sample(s) per image at temperature {settings.temperature}"
    print(f"{len(records)} images, {decoding}: chair_s {rates['chair_s']:.3f} (answers with a hallucinated object), "
          f"chair_i {rates['chair_i']:.3f} (hallucinated / mentioned), recall {rates['recall']:.3f}, "
          f"{rates['mentioned']:.2f} objects mentioned per answer")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rates": rates, "settings": vars(settings),
                       "answers": [{"source": r.source, "answers": a} for r, a in zip(records, answers)]}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

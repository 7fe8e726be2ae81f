"""Hallucination in generated answers, CHAIR-style: what RLHF-V exists to reduce.

    python -m rlhfv_train.evaluate --checkpoint runs/rlhfv/checkpoint.pt          # the run's held-out images
    python -m rlhfv_train.evaluate --model ./my-vlm --data eval.jsonl --parser mypkg.parse:objects

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

import argparse
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .cli import USER_ERRORS, fail
from .data import PreferenceRecord, PromptFormat, as_hashable, encode, load_records, open_image
from .models import load_processor_and_model, load_weights, read_weights, split_indices
from .models.lora import add_lora, lora_settings

METRICS = ("chair_s", "chair_i", "recall", "mentioned")  # what a run records of hallucination_rates()


@dataclass
class GenerationSettings:
    max_new_tokens: int = 48
    do_sample: bool = False       # greedy by default
    temperature: float = 1.0      # with do_sample
    top_p: float = 1.0            # with do_sample
    num_samples: int = 1          # answers per image (with do_sample)
    batch_size: int = 32          # images per generate() call
    chat_template: bool = True    # the processor's chat template when it has one (as in training), else plain
    seed: int = 0                 # for sampling; the caller's random state is left untouched

    def check(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.num_samples < 1:
            raise ValueError("max_new_tokens, batch_size and num_samples must be >= 1")
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError("num_samples > 1 needs sampling (do_sample / --sample): greedy answers are all the same")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, "
                             f"{self.top_p}")


def default_parser(text: str) -> list:
    from .synthetic import parse_description
    return parse_description(text)


def load_callable(spec: str, option: str) -> Callable:
    """'package.module:function' -> that function; errors name the command-line `option` it came from."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{option} {spec!r}: expected module:function, e.g. mypkg.parsing:objects")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{option} {spec!r}: cannot load it ({exc})") from None
    if not callable(function):
        raise ValueError(f"{option} {spec!r} is not callable")
    return function


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


def image_placeholder_ids(model, processor) -> list[int]:
    """Token ids that stand for image or video features: the processor's placeholders (what prompts carry, e.g.
    Gemma 3's <start_of_image>) and the model's (what its forward replaces with features, e.g. <image_soft_token>)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = set()
    for owner in (processor, tokenizer):
        for name in ("image_token", "video_token"):
            token = getattr(owner, name, None)
            if isinstance(token, str):
                ids.add(tokenizer.convert_tokens_to_ids(token))
    config = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            ids.add(value)
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else None
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id and (vocab is None or i < vocab))


@dataclass
class GeneratedBatch:
    """One generate() call: its records, the prompt inputs (left-padded, on the device) and the new tokens, rows
    [record 0 sample 0, record 0 sample 1, ..., record 1 sample 0, ...]: num_samples rows per record."""
    records: Sequence[PreferenceRecord]
    inputs: dict
    new_tokens: torch.Tensor


@torch.no_grad()
def generate_tokens(model, processor, records: Sequence[PreferenceRecord], settings: GenerationSettings | None = None,
                    *, device=None, autocast_dtype=None, progress=None) -> list[GeneratedBatch]:
    """settings.num_samples answers per record, generated from its image and question in left-padded batches.
    The model's train/eval mode and the global random state are restored afterwards, so a training run that
    generates mid-way stays exactly reproducible."""
    settings = settings or GenerationSettings()
    settings.check()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tokenizer = getattr(processor, "tokenizer", processor)
    has_images = hasattr(processor, "image_processor")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
               "num_return_sequences": settings.num_samples, "pad_token_id": pad_id,
               "eos_token_id": tokenizer.eos_token_id}
    placeholders = image_placeholder_ids(model, processor)
    if placeholders:  # an answer with an image placeholder in it would not even run through the model
        options["suppress_tokens"] = placeholders
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:  # a model's generation_config may ask for sampling; greedy means greedy here
        options.update(temperature=None, top_p=None, top_k=None)
    prompts = PromptFormat(processor, settings.chat_template)
    was_training = model.training
    model.eval()
    batches = []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(settings.seed)
            for start in range(0, len(records), settings.batch_size):
                chunk = records[start:start + settings.batch_size]
                images = [open_image(r) for r in chunk] if has_images else [None] * len(chunk)
                with_image = has_images and all(image is not None for image in images)
                texts = [prompts.prompt(r.question, with_image) for r in chunk]
                # Left padding: generation continues every row from its last real token.
                inputs = encode(processor, texts, images if with_image else None, padding_side="left")
                inputs = {k: v.to(device) for k, v in inputs.items()}
                autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else \
                    contextlib.nullcontext()
                with autocast:
                    out = model.generate(**inputs, **options)
                batches.append(GeneratedBatch(chunk, inputs, out[:, inputs["input_ids"].shape[1]:]))
                if progress is not None:
                    progress.update(len(chunk))
    finally:
        model.train(was_training)
    return batches


def generate_answers(model, processor, records: Sequence[PreferenceRecord], settings: GenerationSettings | None = None,
                     *, device=None, autocast_dtype=None, progress=None) -> list[list[str]]:
    """generate_tokens, decoded: settings.num_samples answer texts per record."""
    settings = settings or GenerationSettings()
    tokenizer = getattr(processor, "tokenizer", processor)
    answers, k = [], settings.num_samples
    for batch in generate_tokens(model, processor, records, settings, device=device, autocast_dtype=autocast_dtype,
                                 progress=progress):
        decoded = tokenizer.batch_decode(batch.new_tokens, skip_special_tokens=True)
        answers.extend([text.strip() for text in decoded[i * k:(i + 1) * k]] for i in range(len(batch.records)))
    return answers


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlhfv_train.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a trainer checkpoint (checkpoint.pt, sft.pt): its model, data and held-out "
                   "split are reused")
    p.add_argument("--model", help="a local Hugging Face model folder, evaluated as it is (without --checkpoint), "
                   "or the base the checkpoint's weights go into (default: the checkpoint's)")
    p.add_argument("--data", help="records with images, questions and 'objects' (default: the checkpoint's data)")
    p.add_argument("--split", choices=("heldout", "all"), help="records to evaluate (default: the checkpoint's "
                   "held-out records, or all records of --data without a checkpoint)")
    p.add_argument("--limit", type=int, help="evaluate only the first N records of the split")
    p.add_argument("--parser", help="module:function turning an answer into its objects (default: the synthetic "
                   "scenes' parser)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit (default: 48)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0, off)")
    p.add_argument("--num-samples", type=int, default=1, help="answers per image with --sample (default: 1)")
    p.add_argument("--batch-size", type=int, default=32, help="images per generate() call (default: 32)")
    p.add_argument("--no-chat-template", action="store_true", help="prompt with the plain '<image> question' even "
                   "when the processor has a chat template (default: the template, as the trainers do; with "
                   "--checkpoint, what the run used)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--show", type=int, default=3, help="print this many answers next to the truth (default: 3)")
    p.add_argument("--json", help="also write the rates (and every answer) to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


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
    records, _ = load_records(data)
    split = args.split or ("heldout" if args.checkpoint and not args.data else "all")
    if split == "heldout":
        if not config:
            raise ValueError("--split heldout needs --checkpoint (the split comes from its seed and eval fraction)")
        if config.get("eval_data"):  # the run held out a file of its own
            records, _ = load_records(config["eval_data"])
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
        settings.chat_template = config.get("chat_template", True) and not args.no_chat_template
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
            else torch.device(args.device)
        model.to(device)
        from tqdm import tqdm
        with tqdm(total=len(records), desc="generate", unit="img", disable=args.no_progress) as bar:
            rates, answers = evaluate_hallucination(
                model, processor, records, parser, settings, device=device,
                autocast_dtype=torch.bfloat16 if device.type == "cuda" else None, progress=bar)
    except USER_ERRORS as exc:
        return fail("python -m rlhfv_train.evaluate", exc)
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

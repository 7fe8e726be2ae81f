"""DPO vs DDPO (paper and authors' presets) vs MM-DPO on the synthetic scenes, judged by hallucination in generated
answers (rlhfv_train.eval): the RLHF-V ablation, in miniature.

    python -m experiments.ablation                      # 3 seeds, about 10 minutes on 2 CPU cores
    python -m experiments.ablation --quick              # 1 seed, a few steps: checks the pipeline, not the outcome

Every method gets the same data, model, steps, learning rate and seeds. Per seed: the tiny model is warmed up by SFT
on the chosen answers (shared by all methods of that seed, as the papers start from an SFT model), then each method
trains from those weights, with and without the SFT term (--sft-weights), and answers the held-out images greedily.
A control continues plain SFT for the same number of steps, to tell what the preference pairs add beyond more
supervised training. Writes <out>.json (every run), <out>.md (the table, mean +- std over seeds) and <out>.png.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from experiments.figures import write_report
from rlhfv_train.ddpo import PRESETS
from rlhfv_train.files import save_verified
from rlhfv_train.eval import METRICS
from rlhfv_train.run import flags
from rlhfv_train.run.cli import USER_ERRORS, fail, machine
from rlhfv_train.run.flags import option

METHODS = {  # name: TrainConfig overrides
    "dpo": {"gamma": 1.0, "beta": 0.1, "mode": "sum"},
    "ddpo-paper": PRESETS["paper"],
    "ddpo-authors": PRESETS["authors"],
    "mm-dpo": {"gamma": 1.0, "beta": 0.1, "mode": "sum", "drs_weight": 1.0, "drs_k": 1.0},
}
FULL = {"seeds": 3, "examples": 1536, "sft_steps": 2000, "steps": 300}
QUICK = {"seeds": 1, "examples": 384, "sft_steps": 40, "steps": 10}
CONTROL = "sft-more"  # continued SFT on the chosen answers, no preference pairs


@dataclass
class AblationConfig:
    """The ablation's options (each field a flag, rlhfv_train/run/flags.py); seeds, examples, sft_steps and steps
    left unset come from FULL, or QUICK with --quick."""
    seeds: int | None = option(None, "seeds per method (default: 3)", unset=True)
    examples: int | None = option(None, "synthetic records (default: 1536)", unset=True)
    partial: float = option(0.0, "share of two-error rejected answers whose correction fixes only one error "
                            "(synthetic.make_example)")
    per_side: int = option(1, "objects per column at most; 2: 3 to 6 objects per scene, long answers in which an "
                           "error is a small part", choices=(1, 2))
    pairs: str = option("offline", "offline: the dataset's synthetic (chosen, rejected) pairs; on-policy: the SFT "
                        "model's own sampled answers on the training images, corrected against the ground truth, "
                        "as RLHF-V collected its data", choices=("offline", "on-policy"))
    samples: int = option(2, "on-policy answers per training image")
    eval_fraction: float = option(0.2, "held-out share")
    sft_steps: int | None = option(None, "SFT steps (default: 2000)", unset=True)
    sft_lr: float = option(5e-4, "SFT learning rate")
    steps: int | None = option(None, "preference steps per method (default: 300)", unset=True)
    lr: float = option(1e-5, "preference learning rate (at 5e-5 the runs without SFT term stop naming objects at "
                       "all)")
    batch_size: int = option(8, "pairs per step")
    sft_weights: str = option("0,1", "SFT-term weights to run every method with")
    methods: str = option(",".join([*METHODS, CONTROL]), "comma-separated subset")
    work_dir: str = option("runs/ablation", "runs and data")
    out: str = option("benchmarks/results/ablation-cpu", "results prefix")
    quick: bool = option(False, "1 seed, 384 records, 40 + 10 steps (unless given): a pipeline check")
    progress: bool = option(True, "no progress bars")


def build_parser() -> argparse.ArgumentParser:
    return flags.build_parser(AblationConfig, "python -m experiments.ablation", __doc__)


def _supervised(model, processor, records, *, steps, lr, batch_size, order_seed, progress=None) -> list[float]:
    """sft.fine_tune on the chosen answers of `records`, in a seeded batch order (the warm-up and the SFT control)."""
    from rlhfv_train.data import BatchStream, PairCollator
    from rlhfv_train.run.sft import fine_tune

    collate = PairCollator(processor, gamma=1.0)
    stream = BatchStream(list(range(len(records))), batch_size, order_seed)
    return fine_tune(model, lambda k: collate([(i, records[i]) for i in stream.batch(k)]), steps=steps, lr=lr,
                     progress=progress)


def _sft_start(data_path, seed, args, path):
    """The seed's SFT model, saved to `path` (what every method of this seed starts from)."""
    from tqdm import tqdm

    from rlhfv_train.models import load_processor_and_model

    train_records, _ = _records(data_path, None, seed, args)
    processor, model = load_processor_and_model(None, seed)
    with tqdm(total=args.sft_steps, desc=f"seed {seed}: sft warm-up", unit="step", disable=not args.progress) as bar:
        losses = _supervised(model, processor, train_records, steps=args.sft_steps, lr=args.sft_lr,
                             batch_size=args.batch_size, order_seed=seed + 7919, progress=bar)
    save_verified(path, {"model": model.state_dict(), "sft_losses": losses}, what="SFT weights")


def _control(train_path, held_path, seed, args, sft_path) -> dict:
    """More SFT on the chosen answers of the methods' training pairs, from the warm-up weights, for as many steps as a
    method gets, then the same evaluation."""
    from rlhfv_train.eval import evaluate_hallucination
    from rlhfv_train.models import load_processor_and_model, load_weights

    train_records, held = _records(train_path, held_path, seed, args)
    processor, model = load_processor_and_model(None, seed)
    load_weights(model, sft_path)
    _supervised(model, processor, train_records, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                order_seed=seed)
    rates, _ = evaluate_hallucination(model, processor, held)
    return rates


def _records(train_path, held_path, seed, args):
    """(training records, held-out records): the seed's split of one file, or two files (on-policy pairs)."""
    from rlhfv_train.data import load_records
    from rlhfv_train.data import split_indices

    records, _ = load_records(train_path)
    if held_path is not None:
        return records, load_records(held_path)[0]
    train_idx, held = split_indices(len(records), args.eval_fraction, seed)
    return [records[i] for i in train_idx], [records[i] for i in held]


def on_policy_pairs(records, answers) -> list[dict]:
    """RLHF-V's way of collecting pairs, with an exact annotator: each of the model's answers that mentions a wrong
    object becomes the rejected answer, its minimal correction (synthetic.correct) the chosen one. Answers that do not
    read as a scene description, and answers with nothing to correct, give no pair."""
    from rlhfv_train.data.synthetic import correct, describe, parse_description

    pairs = []
    for record, per_record in zip(records, answers):
        for answer in per_record:
            mentioned = parse_description(answer)
            if not mentioned or describe(mentioned) != answer:
                continue
            fixed = correct(mentioned, record.objects)
            if fixed and fixed != mentioned:
                pairs.append({"image": list(record.images), "question": record.question, "chosen": describe(fixed),
                              "rejected": answer, "reward_margin": len(set(mentioned) - set(record.objects)),
                              "objects": record.objects})
    return pairs


def _json_image(value):
    """JSON for what json cannot write itself: image bytes as the records' {"bytes": base64} form."""
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_rows(path, rows) -> str:
    """Records as JSONL (images given as bytes written in base64); returns `path`."""
    with open(path, "w") as f:
        f.writelines(json.dumps(row, default=_json_image) + "\n" for row in rows)
    return path


def record_row(r) -> dict:
    """A PreferenceRecord as a JSONL row that load_records reads back."""
    return {"image": list(r.images), "question": r.question, "chosen": r.chosen, "rejected": r.rejected,
            "objects": r.objects}


def _on_policy_data(data_path, seed, args, sft_path, seed_dir) -> tuple[str, str]:
    """(pairs file, held-out file): the seed's SFT model answers every training image args.samples times (sampled
    at temperature 1); its wrong answers and their corrections are the pairs."""
    from rlhfv_train.eval import GenerationSettings, generate_answers
    from rlhfv_train.models import load_processor_and_model, load_weights

    train_records, held = _records(data_path, None, seed, args)
    processor, model = load_processor_and_model(None, seed)
    load_weights(model, sft_path)
    settings = GenerationSettings(do_sample=True, num_samples=args.samples, temperature=1.0, seed=seed)
    pairs = on_policy_pairs(train_records, generate_answers(model, processor, train_records, settings))
    if not pairs:
        raise ValueError(f"seed {seed}: none of the SFT model's answers could be corrected into a pair (does it "
                         "describe scenes yet? raise --sft-steps)")
    return (write_rows(os.path.join(seed_dir, "pairs.jsonl"), pairs),
            write_rows(os.path.join(seed_dir, "heldout.jsonl"), [record_row(r) for r in held]))


def run(args) -> dict:
    from rlhfv_train.data import synthetic
    from rlhfv_train.ddpo import TrainConfig, train

    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS and m != CONTROL]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {unknown or 'empty list'}; choose from {[*METHODS, CONTROL]}")
    try:
        sft_weights = [float(w) for w in args.sft_weights.split(",")]
    except ValueError:
        raise ValueError(f"--sft-weights {args.sft_weights!r}: expected numbers separated by commas") from None
    for flag in ("seeds", "steps", "batch_size", "samples", "examples"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.sft_steps < 0:
        raise ValueError(f"--sft-steps must be >= 0, got {args.sft_steps}")
    if not 0.0 < args.eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be between 0 and 1, got {args.eval_fraction}")
    name = f"data-{args.examples}-partial{args.partial:g}" + (f"-per{args.per_side}" if args.per_side > 1 else "")
    data_path = os.path.join(args.work_dir, name, "data.jsonl")
    if not os.path.isfile(data_path):
        synthetic.generate(os.path.dirname(data_path), args.examples, seed=0, partial=args.partial,
                           per_side=args.per_side, progress=args.progress)
    runs = []
    started = time.time()
    for seed in range(args.seeds):
        seed_dir = os.path.join(args.work_dir, f"seed{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        sft_path = os.path.join(seed_dir, "sft.pt")
        _sft_start(data_path, seed, args, sft_path)
        train_path, held_path = data_path, None
        if args.pairs == "on-policy":
            train_path, held_path = _on_policy_data(data_path, seed, args, sft_path, seed_dir)
        start = None
        for method in methods:
            for weight in ([None] if method == CONTROL else sft_weights):
                if method == CONTROL:
                    rates = _control(train_path, held_path, seed, args, sft_path)
                    runs.append({"method": method, "sft_weight": None, "seed": seed, **_pick(rates)})
                    continue
                cfg = TrainConfig(data=train_path, eval_data=held_path,
                                  output_dir=os.path.join(seed_dir, f"{method}-sft{weight:g}"),
                                  init_weights=sft_path, sft_weight=weight, lr=args.lr, max_steps=args.steps,
                                  batch_size=args.batch_size, eval_fraction=args.eval_fraction,
                                  eval_every=args.steps, save_every=args.steps, seed=seed, device="cpu",
                                  progress=args.progress, overwrite=True,  # a rerun of the driver redoes its runs
                                  **METHODS[method])
                summary = train(cfg)
                start = start or summary["start_metrics"]
                runs.append({"method": method, "sft_weight": weight, "seed": seed, **_pick(summary["metrics"]),
                             "eval_accuracy": summary["metrics"].get("eval_accuracy")})
        runs.append({"method": "start (sft warm-up)", "sft_weight": None, "seed": seed, **_pick(start or {})})
    return {"settings": {k: v for k, v in vars(args).items() if k != "progress"}, "runs": runs,
            "minutes": (time.time() - started) / 60}


def _pick(metrics: dict) -> dict:
    return {name: metrics.get(name) for name in METRICS}


def summarize(result: dict) -> list[dict]:
    """One row per (method, sft_weight): mean and std over seeds of every reported metric."""
    groups = {}
    for r in result["runs"]:
        groups.setdefault((r["method"], r["sft_weight"]), []).append(r)
    rows = []
    order = sorted(groups, key=lambda key: not key[0].startswith("start"))  # the starting point first
    for method, weight in order:
        members = groups[(method, weight)]
        row = {"method": method, "sft_weight": weight, "seeds": len(members)}
        for name in (*METRICS, "eval_accuracy"):
            values = [m[name] for m in members if m.get(name) is not None]
            if values:
                row[name] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | SFT term | chair_s (answers with a hallucination) | chair_i (hallucinated / mentioned) | "
             "recall | objects mentioned | held-out pref. acc. |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[n][0]:.3f} ± {row[n][1]:.3f}" if n in row else "–"
                 for n in (*METRICS, "eval_accuracy")]
        weight = "–" if row["sft_weight"] is None else f"{row['sft_weight']:g}"
        lines.append(f"| {row['method']} | {weight} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> str | None:
    from experiments.figures import pyplot, save
    plt = pyplot()
    if plt is None:
        return None
    names = [r["method"] + ("" if r["sft_weight"] is None else f"\n(sft {r['sft_weight']:g})") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), sharey=True)
    for ax, metric, label in zip(axes, ("chair_s", "chair_i", "recall"),
                                 ("answers with a hallucinated object (lower is better)",
                                  "hallucinated / mentioned objects (lower is better)",
                                  "recall of present objects (higher is better)")):
        means = [r[metric][0] for r in rows]
        stds = [r[metric][1] for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=3, color=["tab:gray" if "start" in n else "tab:blue"
                                                                    for n in names])
        ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, 1)
    return save(fig, plt, path, title)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except USER_ERRORS as exc:
        return fail("python -m experiments.ablation", exc)
    rows = summarize(result)
    result["machine"] = machine()
    result["summary"] = rows
    s = result["settings"]
    title = (f"tiny LLaVA, {s['seeds']} seed(s): SFT warm-up {s['sft_steps']} steps, then {s['steps']} preference "
             f"steps at lr {s['lr']:g} (batch {s['batch_size']}), greedy answers on held-out images"
             + (f"; {s['partial']:.0%} of two-error pairs partly corrected" if s["partial"] else "")
             + ("; on-policy pairs" if s["pairs"] == "on-policy" else "")
             + (f"; up to {s['per_side']} objects per column" if s["per_side"] > 1 else ""))
    footer = f"({result['minutes']:.1f} minutes, torch {torch.__version__}, {torch.get_num_threads()} threads)"
    print(write_report(args.out, result, title, table(rows), footer, lambda path, title: plot(rows, path, title)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m experiments.grpo_sweep: GRPO with k = 2, 4, 8 answers per prompt on the synthetic scenes (tiny LLaVA).

Generative RLHF-V reports that grouped comparison gains with the group size k. Here, per seed, one SFT warm-up, then
one GRPO run per k from those weights, all else equal (prompts per step, steps, learning rate: a larger k samples and
trains on more answers per step), judged by the exact scene judge; every --eval-every steps the greedy answers on the
held-out images give the scene reward ((correct - hallucinated objects) / objects) and the CHAIR rates. Writes
<out>.json (every run's curves), <out>.md (table, mean ± std over seeds) and <out>.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

from experiments.figures import write_report
from rlhfv_train.eval import METRICS
from rlhfv_train.grpo import SCENE_JUDGES, TINY_SFT_STEPS, GRPOConfig, train_grpo
from rlhfv_train.run import flags
from rlhfv_train.run.cli import USER_ERRORS, fail, machine
from rlhfv_train.run.flags import option

REPORTED = ("eval_scene_reward", *METRICS, "eval_win_rate")


@dataclass
class SweepConfig:
    """The sweep's options (each field a flag, rlhfv_train/run/flags.py)."""
    k: tuple[int, ...] = option((2, 4, 8), "group sizes")
    seeds: int = option(3, "seeds per k")
    steps: int = option(100, "GRPO steps per run")
    prompts_per_step: int = option(8, "prompts per step")
    lr: float = option(1e-4, "GRPO learning rate")
    beta_kl: float = option(0.04, "KL weight")
    sft_steps: int = option(TINY_SFT_STEPS, "SFT steps per seed (the runs' common start)")
    judge: str = option("scene", "the exact judge's rule (scene: more correct-minus-hallucinated objects wins; "
                        "scene-strict: fewer hallucinated wins)", choices=tuple(sorted(SCENE_JUDGES)))
    examples: int = option(1024, "synthetic records")
    eval_every: int = option(20, "steps between held-out evaluations")
    work_dir: str = option("runs/grpo-sweep", "runs go here")
    out: str = option("benchmarks/results/grpo-k-cpu", "output prefix")
    quick: bool = option(False, "a few steps of everything (a smoke test, not a result)")
    progress: bool = option(True, "no progress bars")


def build_parser() -> argparse.ArgumentParser:
    return flags.build_parser(SweepConfig, "python -m experiments.grpo_sweep", __doc__)


def run(args) -> dict:
    if args.quick:
        args.steps, args.sft_steps, args.examples, args.eval_every, args.seeds = 2, 5, 40, 2, 1
    if min(args.k) < 2 or args.seeds < 1 or args.steps < 1 or args.sft_steps < 0:
        raise ValueError("--k values must be >= 2, --seeds and --steps >= 1, --sft-steps >= 0")
    runs, started = [], time.time()
    for seed in range(args.seeds):
        warm = None
        for k in args.k:
            out_dir = os.path.join(args.work_dir, f"seed{seed}", f"k{k}")
            cfg = GRPOConfig(output_dir=out_dir, num_generations=k, prompts_per_step=args.prompts_per_step,
                             max_steps=args.steps, lr=args.lr, beta_kl=args.beta_kl, eval_every=args.eval_every,
                             save_every=args.steps, synthetic_examples=args.examples, seed=seed, device="cpu",
                             sft_steps=args.sft_steps if warm is None else 0, init_weights=warm,
                             progress=args.progress, overwrite=True,  # a rerun of the driver redoes its runs
                             # one data file per seed: the first run generates it, the others read it
                             data=None if warm is None else os.path.join(os.path.dirname(warm), "synthetic",
                                                                         "data.jsonl"),
                             judge=args.judge)
            began = time.time()
            summary = train_grpo(cfg)
            if warm is None and args.sft_steps:
                warm = os.path.join(out_dir, "sft.pt")
            elif warm is None:
                raise ValueError("--sft-steps 0: the runs would start from random weights; give a warm-up")
            rows = [json.loads(line) for line in open(summary["metrics_path"])]
            runs.append({"k": k, "seed": seed, "minutes": (time.time() - began) / 60,
                         "eval": [{n: r[n] for n in ("step", *REPORTED) if n in r} for r in rows if "chair_s" in r
                                  or "eval_scene_reward" in r],
                         "rollout_scene_reward": [r["scene_reward"] for r in rows if "scene_reward" in r]})
    return {"settings": {k: v for k, v in vars(args).items() if k != "progress"}, "runs": runs,
            "minutes": (time.time() - started) / 60}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(result: dict) -> list[dict]:
    """Rows: the start (after the warm-up), then per k the end of training; mean and std over seeds. The rollouts'
    scene reward is averaged over the first and the last 10 steps. Each k is also compared with the first k seed by
    seed (same warm-up, same data): the mean and std of the held-out scene-reward difference, and in how many seeds
    it is higher."""
    runs = result["runs"]
    first_k = runs[0]["k"]
    rows = [{"run": "start (SFT warm-up)", **{n: _mean_std([r["eval"][0][n] for r in runs if r["k"] == first_k])
                                             for n in REPORTED if n in runs[0]["eval"][0]}}]
    for k in dict.fromkeys(r["k"] for r in runs):
        members = [r for r in runs if r["k"] == k]
        row = {"run": f"GRPO k={k}", **{n: _mean_std([r["eval"][-1][n] for r in members])
                                         for n in REPORTED if n in members[0]["eval"][-1]}}
        row["rollouts_first"] = _mean_std([statistics.fmean(r["rollout_scene_reward"][:10]) for r in members])
        row["rollouts_last"] = _mean_std([statistics.fmean(r["rollout_scene_reward"][-10:]) for r in members])
        row["minutes"] = _mean_std([r["minutes"] for r in members])
        if k != first_k:
            base = {r["seed"]: r["eval"][-1]["eval_scene_reward"] for r in runs if r["k"] == first_k}
            gains = [r["eval"][-1]["eval_scene_reward"] - base[r["seed"]] for r in members]
            row["gain"] = _mean_std(gains)
            row["seeds_better"] = f"{sum(g > 0 for g in gains)} of {len(gains)}"
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    columns = [("eval_scene_reward", "held-out scene reward ↑"), ("chair_s", "chair_s ↓"), ("chair_i", "chair_i ↓"),
               ("recall", "recall ↑"), ("mentioned", "objects mentioned"),
               ("rollouts_first", "rollout reward, first 10 steps"),
               ("rollouts_last", "rollout reward, last 10 steps"),
               ("gain", "scene reward vs the first k, paired by seed"), ("minutes", "minutes per run")]
    lines = ["| run | " + " | ".join(label for _, label in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [f"{row[n][0]:.3f} ± {row[n][1]:.3f}" if n in row else "–" for n, _ in columns]
        if "gain" in row:  # signed, and in how many seeds
            cells[-2] = f"{row['gain'][0]:+.3f} ± {row['gain'][1]:.3f} ({row['seeds_better']} seeds higher)"
        lines.append(f"| {row['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str, title: str) -> str | None:
    from experiments.figures import pyplot, save
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for k in dict.fromkeys(r["k"] for r in result["runs"]):
        members = [r for r in result["runs"] if r["k"] == k]
        steps = [e["step"] for e in members[0]["eval"]]
        for ax, name in zip(axes[:2], ("eval_scene_reward", "chair_i")):
            ax.plot(steps, [statistics.fmean(r["eval"][i][name] for r in members) for i in range(len(steps))], "o-",
                    label=f"k={k}")
        rewards = [statistics.fmean(values) for values in zip(*(r["rollout_scene_reward"] for r in members))]
        window = max(1, len(rewards) // 10)
        smooth = [statistics.fmean(rewards[max(0, i - window + 1):i + 1]) for i in range(len(rewards))]
        axes[2].plot(range(1, len(rewards) + 1), smooth, label=f"k={k}")
    for ax, label in zip(axes, ("held-out greedy answers: scene reward (higher is better)",
                                "held-out: hallucinated / mentioned objects (lower is better)",
                                "rollouts: scene reward (moving average)")):
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("GRPO step")
        ax.legend(fontsize=8)
    return save(fig, plt, path, title)


def write(result: dict, out: str) -> str:
    """<out>.json, .md and .png of a sweep's result; returns the text of the .md and the files written."""
    result["summary"] = rows = summarize(result)
    s, m = result["settings"], result["machine"]
    title = (f"tiny LLaVA, {s['seeds']} seed(s): SFT warm-up {s['sft_steps']} steps, then {s['steps']} GRPO steps of "
             f"{s['prompts_per_step']} prompts x k answers ({s['judge']} judge, grouped comparison), lr {s['lr']:g}, "
             f"beta_kl {s['beta_kl']:g}")
    return write_report(out, result, title, table(rows),
                        f"({result['minutes']:.1f} minutes in all, torch {m['torch']}, {m['threads']} threads)",
                        lambda path, title: plot(result, path, title))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except USER_ERRORS as exc:
        return fail("python -m experiments.grpo_sweep", exc)
    result["machine"] = machine()
    print(write(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

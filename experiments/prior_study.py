"""Issue 46's study: in the prior world (experiments/prior_world.py), do dense corrections trained with DDPO cut
hallucination more, and with fewer pairs, than preference learning on whole answers? It runs the plan written in
docs/experiments.md ("The prior-world study") before its first comparison run; change the plan there, not here.

    python -m experiments.prior_study               # the study (defaults = the plan), about 40 minutes on 2 cores
    python -m experiments.prior_study --quick       # 1 seed, tiny sizes, a few steps: checks the pipeline only

Per seed (every method and size of a seed shares its SFT model, pair pool and held-out images, so methods are
compared paired, seed by seed):
1. the tiny model is warmed up by SFT on correct captions of the prior world (World: its captions carry the priors);
2. it answers pool images of the world without priors (prior_world.EVAL_WORLD), sampled at temperature 1; an exact
   annotator corrects each answer that mentions a wrong object (synthetic.correct: wrong attributes fixed, invented
   objects deleted), giving (corrected, own answer) pairs as RLHF-V collected them; --pairs offline uses the scenes'
   synthetic pairs instead;
3. for each size, the first `size` pairs (nested sets) train every method from the SFT weights for `epochs` passes;
4. each run answers the held-out images greedily: chair_s, chair_i, recall and the error kinds of prior_world.

Writes <out>.json (every run and the plan's statistics), <out>.md (tables) and <out>.png (rates against pairs, per
method, with 95% confidence bands).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace

from experiments.ablation import METHODS as PREFERENCE_METHODS, _supervised, on_policy_pairs, record_row, write_rows
from experiments.prior_world import EVAL_WORLD, ERROR_KINDS, World, error_split, record, training_scene, warm_up
from rlhfv_train.run import flags
from rlhfv_train.run.flags import option

SFT_CONTROL = "sft-chosen"  # supervised training on the pairs' chosen answers, no rejected ones
METHOD_NAMES = (*PREFERENCE_METHODS, SFT_CONTROL)
RATES = ("chair_s", "chair_i", "recall")
PRIMARY = ("ddpo-paper", "dpo")  # the plan's primary comparison: (method, baseline)
QUICK = {"seeds": 1, "sizes": (8, 16), "examples": 256, "sft_steps": 200, "pool": 64, "held_out": 16, "epochs": 1,
         "workers": 1}


@dataclass
class StudyConfig:
    """The study's options (each field a flag): the defaults are the plan in docs/experiments.md."""
    seeds: int = option(10, "seeds (each: its own SFT model, pair pool and held-out images)", interval="[1, inf)")
    sizes: tuple[int, ...] = option((64, 128, 256, 512), "numbers of training pairs (nested sets)")
    epochs: int = option(4, "passes over the pairs per run (steps = epochs x size / batch size)", interval="[1, inf)")
    pair_prob: float = option(World.pair_prob, "the world's co-occurrence prior", interval="[0, 1]")
    color_prob: float = option(World.color_prob, "the world's colour prior", interval="[0, 1]")
    examples: int = option(1536, "SFT captions (scenes of the world)", interval="[1, inf)")
    sft_steps: int = option(2000, "SFT warm-up steps", interval="[0, inf)")
    sft_lr: float = option(5e-4, "SFT warm-up learning rate", interval="(0, inf)")
    pairs: str = option("on-policy", "on-policy: the SFT model's sampled answers, corrected; offline: the scenes' "
                        "synthetic (correct, hallucinated) pairs", choices=("on-policy", "offline"))
    pool: int = option(1536, "images the SFT model answers to collect pairs from", interval="[1, inf)")
    held_out: int = option(300, "held-out images per seed", interval="[1, inf)")
    lr: float = option(2e-5, "learning rate of every method (the plan's pilot rule)", interval="(0, inf)")
    batch_size: int = option(8, "pairs per step", interval="[1, inf)")
    methods: str = option(",".join(METHOD_NAMES), "comma-separated subset")
    workers: int = option(2, "processes, each running whole seeds on one thread (1: the seeds run in this process, "
                          "with its threads)", interval="[1, inf)")
    work_dir: str = option("runs/prior-study", "runs and data")
    out: str = option("benchmarks/results/prior-study-cpu", "results prefix")
    quick: bool = option(False, "1 seed, 8 and 16 pairs, a short warm-up: a pipeline check")
    progress: bool = option(True, "no progress bars")


def build_parser() -> argparse.ArgumentParser:
    return flags.build_parser(StudyConfig, "python -m experiments.prior_study", __doc__)


def methods_of(cfg: StudyConfig) -> list[str]:
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {unknown or 'empty list'}; choose from {list(METHOD_NAMES)}")
    return methods


def check(cfg: StudyConfig) -> None:
    methods_of(cfg)
    if not cfg.sizes or min(cfg.sizes) < 1 or list(cfg.sizes) != sorted(set(cfg.sizes)):
        raise ValueError(f"--sizes must be increasing positive numbers, got {list(cfg.sizes)}")
    World(cfg.pair_prob, cfg.color_prob).check()


def steps_for(size: int, cfg: StudyConfig) -> int:
    return max(1, math.ceil(cfg.epochs * size / cfg.batch_size))


def evaluate(model, processor, held) -> dict:
    """chair_s, chair_i, recall, mentioned and the error kinds (per answer) of greedy answers on `held`."""
    from rlhfv_train.eval import evaluate_hallucination

    rates, answers = evaluate_hallucination(model, processor, held)
    split = error_split([a[0] for a in answers], [r.objects for r in held])
    return {**{k: rates[k] for k in (*RATES, "mentioned")}, **split}


def collect_pairs(model, processor, pool, cfg: StudyConfig, seed: int) -> list[dict]:
    """The seed's training pairs, shuffled (the sizes take prefixes of this list)."""
    from rlhfv_train.eval import GenerationSettings, generate_answers

    if cfg.pairs == "offline":
        pairs = [record_row(r) for r in pool]
    else:
        settings = GenerationSettings(do_sample=True, num_samples=1, temperature=1.0, seed=seed)
        pairs = on_policy_pairs(pool, generate_answers(model, processor, pool, settings))
    random.Random(seed + 31).shuffle(pairs)
    if len(pairs) < max(cfg.sizes):
        raise ValueError(f"seed {seed}: the pool of {cfg.pool} images gave {len(pairs)} pairs, fewer than the largest "
                         f"size {max(cfg.sizes)}; raise --pool")
    return pairs


def run_seed(seed: int, cfg: StudyConfig) -> list[dict]:
    """Every (size, method) run of one seed, and its SFT start, as result rows."""
    from rlhfv_train.ddpo import TrainConfig, train
    from rlhfv_train.files import save_verified
    from rlhfv_train.models import load_weights

    seed_dir = os.path.join(cfg.work_dir, f"seed{seed}")
    os.makedirs(seed_dir, exist_ok=True)
    processor, model, rng, _ = warm_up(seed, World(cfg.pair_prob, cfg.color_prob), examples=cfg.examples,
                                       sft_steps=cfg.sft_steps, sft_lr=cfg.sft_lr, batch_size=cfg.batch_size)
    pool = [record(training_scene(rng, EVAL_WORLD), rng) for _ in range(cfg.pool)]
    held = [record(training_scene(rng, EVAL_WORLD), rng) for _ in range(cfg.held_out)]
    sft_path = os.path.join(seed_dir, "sft.pt")
    save_verified(sft_path, {"model": model.state_dict()}, what="SFT weights")
    rows = [{"method": "start (sft)", "pairs": 0, "seed": seed, **evaluate(model, processor, held)}]
    pairs = collect_pairs(model, processor, pool, cfg, seed)
    held_path = write_rows(os.path.join(seed_dir, "heldout.jsonl"), [record_row(r) for r in held])
    for size in cfg.sizes:
        data = write_rows(os.path.join(seed_dir, f"pairs{size}.jsonl"), pairs[:size])
        steps = steps_for(size, cfg)
        for method in methods_of(cfg):
            if method == SFT_CONTROL:
                from rlhfv_train.data import load_records
                load_weights(model, sft_path)
                _supervised(model, processor, load_records(data)[0], steps=steps, lr=cfg.lr,
                            batch_size=cfg.batch_size, order_seed=seed)
                trained = model
            else:
                trained = train(TrainConfig(
                    data=data, eval_data=held_path, output_dir=os.path.join(seed_dir, f"{method}-{size}"),
                    init_weights=sft_path, lr=cfg.lr, max_steps=steps, batch_size=cfg.batch_size,
                    eval_every=steps, save_every=steps, hallucination_eval=False, seed=seed, device="cpu",
                    progress=False, overwrite=True, **PREFERENCE_METHODS[method]))["model"]
            rows.append({"method": method, "pairs": size, "steps": steps, "seed": seed,
                         **evaluate(trained, processor, held)})
    return rows


def _seed_worker(job):
    import torch
    torch.set_num_threads(1)
    seed, cfg = job
    return run_seed(seed, cfg)


def run(cfg: StudyConfig) -> dict:
    from tqdm import tqdm

    check(cfg)
    started = time.time()
    rows = []
    with tqdm(total=cfg.seeds, desc="prior study: seeds", unit="seed", disable=not cfg.progress) as bar, \
            contextlib.ExitStack() as stack:
        if cfg.workers == 1:  # in this process, whose thread count is the caller's to keep
            results = (run_seed(seed, cfg) for seed in range(cfg.seeds))
        else:
            import multiprocessing
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(cfg.workers))
            results = pool.imap_unordered(_seed_worker, [(seed, cfg) for seed in range(cfg.seeds)])
        for seed_rows in results:
            rows.extend(seed_rows)
            bar.update()
    rows.sort(key=lambda r: (r["seed"], r["pairs"], r["method"]))
    return {"settings": {k: v for k, v in asdict(cfg).items() if k != "progress"}, "runs": rows,
            "minutes": (time.time() - started) / 60}


# --- statistics (the plan's tests) ---------------------------------------------------------------------------------

def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% confidence interval of the mean, Student t)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def _by_seed(runs: list[dict], method: str, size: int, metric: str) -> dict[int, float]:
    return {r["seed"]: r[metric] for r in runs if r["method"] == method and r["pairs"] == size}


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (method, pairs): mean and 95% CI over seeds of each rate and error kind."""
    keys = sorted({(r["method"], r["pairs"]) for r in runs}, key=lambda k: (k[1], METHOD_NAMES.index(k[0])
                                                                               if k[0] in METHOD_NAMES else -1))
    rows = []
    for method, size in keys:
        row = {"method": method, "pairs": size}
        for metric in (*RATES, "mentioned", *ERROR_KINDS):
            values = list(_by_seed(runs, method, size, metric).values())
            row[metric] = mean_ci(values)
        row["seeds"] = len(values)
        rows.append(row)
    return rows


def paired(runs: list[dict], method: str, baseline: str, size: int, metric: str) -> dict:
    """method minus baseline, paired by seed: mean difference, its 95% CI and the paired t-test's two-sided p."""
    from scipy import stats

    a, b = _by_seed(runs, method, size, metric), _by_seed(runs, baseline, size, metric)
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean, half = mean_ci(diffs)
    p = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue) if len(seeds) > 1 else math.nan
    return {"method": method, "baseline": baseline, "pairs": size, "metric": metric, "diff": mean, "ci": half,
            "p": p, "seeds": len(seeds)}


def holm(pvalues: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down rejections at family-wise level alpha, in the order given."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    reject = [False] * len(pvalues)
    for rank, i in enumerate(order):
        if not pvalues[i] <= alpha / (len(pvalues) - rank):
            break
        reject[i] = True
    return reject


def comparisons(runs: list[dict], sizes) -> dict:
    """The plan's tests: the primary comparison (PRIMARY on chair_s at every size, Holm-corrected over the sizes),
    every method against DPO and against the SFT control on each rate (secondary, uncorrected), and the default-run
    rule: the primary method's fall in chair_s from its SFT start against 3 x its spread over seeds."""
    methods = {r["method"] for r in runs}
    primary = [paired(runs, *PRIMARY, size, "chair_s") for size in sizes] if set(PRIMARY) <= methods else []
    for test, significant in zip(primary, holm([t["p"] for t in primary])):
        test["significant (Holm)"] = significant
    against = {"dpo": [m for m in PREFERENCE_METHODS if m != "dpo"], SFT_CONTROL: list(PREFERENCE_METHODS)}
    secondary = [paired(runs, m, base, size, metric) for base, others in against.items() if base in methods
                 for m in others if m in methods for size in sizes for metric in RATES]
    clear = []
    for size in sizes:
        start = _by_seed(runs, "start (sft)", 0, "chair_s")
        after = _by_seed(runs, PRIMARY[0], size, "chair_s")
        falls = [start[s] - after[s] for s in sorted(set(start) & set(after))]
        if len(falls) > 1:
            mean = sum(falls) / len(falls)
            spread = math.sqrt(sum((f - mean) ** 2 for f in falls) / (len(falls) - 1))
            clear.append({"pairs": size, "chair_s fall": mean, "spread": spread, "clear": mean > 3 * spread})
    return {"primary": primary, "secondary": secondary, "default-run rule": clear}


def _cell(value: tuple[float, float]) -> str:
    mean, half = value
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"


def tables(summary: list[dict], tests: dict) -> str:
    lines = ["| pairs | method | chair_s | chair_i | recall | co-occurrence / shape-from-colour / colour-from-shape / "
             "perception errors per answer |", "|---|---|---|---|---|---|"]
    for row in summary:
        kinds = " / ".join(f"{row[k][0]:.3f}" for k in ERROR_KINDS)
        lines.append(f"| {row['pairs']} | {row['method']} | " + " | ".join(_cell(row[m]) for m in RATES)
                     + f" | {kinds} |")
    lines += ["", f"Primary: {PRIMARY[0]} minus {PRIMARY[1]}, chair_s, paired over seeds (Holm over the sizes):", "",
              "| pairs | difference ± 95% CI | p | significant |", "|---|---|---|---|"]
    lines += [f"| {t['pairs']} | {t['diff']:+.3f} ± {t['ci']:.3f} | {t['p']:.3g} | {t['significant (Holm)']} |"
              for t in tests["primary"]]
    lines += ["", "Secondary (uncorrected; p < 0.05 marked *):", "",
              "| pairs | method − baseline | chair_s | chair_i | recall |", "|---|---|---|---|---|"]
    groups = {}
    for t in tests["secondary"]:
        groups.setdefault((t["pairs"], t["method"], t["baseline"]), {})[t["metric"]] = t
    for (size, method, base), cells in sorted(groups.items()):
        lines.append(f"| {size} | {method} − {base} | " + " | ".join(
            f"{c['diff']:+.3f} ± {c['ci']:.3f}{'*' if c['p'] < 0.05 else ''}" for c in (cells[m] for m in RATES))
            + " |")
    lines += ["", "Default-run rule (chair_s fall from the SFT start > 3 x its spread over seeds):", ""]
    lines += [f"- {c['pairs']} pairs: fall {c['chair_s fall']:+.3f}, spread {c['spread']:.3f}: "
              f"{'clear' if c['clear'] else 'not clear'}" for c in tests["default-run rule"]]
    return "\n".join(lines)


def plot(summary: list[dict], path: str, title: str) -> str | None:
    from experiments.figures import pyplot, save
    plt = pyplot()
    if plt is None:
        return None
    start = next((r for r in summary if r["method"] == "start (sft)"), None)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric in zip(axes, RATES):
        for method in METHOD_NAMES:
            rows = [r for r in summary if r["method"] == method]
            if not rows:
                continue
            x = [r["pairs"] for r in rows]
            mean = [r[metric][0] for r in rows]
            half = [0.0 if math.isnan(r[metric][1]) else r[metric][1] for r in rows]
            ax.plot(x, mean, marker="o", label=method)
            ax.fill_between(x, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], alpha=0.15)
        if start:
            ax.axhline(start[metric][0], color="gray", linestyle="--", label="SFT start")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training pairs")
        ax.set_title(metric + (" (higher is better)" if metric == "recall" else " (lower is better)"), fontsize=9)
    axes[0].legend(fontsize=7)
    return save(fig, plt, path, title, fontsize=9)


def main(argv=None) -> int:
    from experiments.figures import write_report
    from rlhfv_train.run.cli import USER_ERRORS, fail, machine

    args = build_parser().parse_args(argv)
    cfg = StudyConfig(**{f: getattr(args, f) for f in StudyConfig.__dataclass_fields__})
    if cfg.quick:
        cfg = replace(cfg, **QUICK)
    try:
        result = run(cfg)
    except USER_ERRORS as exc:
        return fail("python -m experiments.prior_study", exc)
    summary = summarize(result["runs"])
    tests = comparisons(result["runs"], cfg.sizes)
    result.update(machine=machine(), summary=summary, tests=tests)
    title = (f"prior world (pair_prob {cfg.pair_prob:g}, color_prob {cfg.color_prob:g}), {cfg.pairs} pairs, "
             f"{cfg.seeds} seed(s), {cfg.epochs} epochs at lr {cfg.lr:g}; mean and 95% CI over seeds")
    print(write_report(cfg.out, result, title, tables(summary, tests),
                       f"({result['minutes']:.1f} minutes, {cfg.workers} worker(s))",
                       lambda path, title: plot(summary, path, title)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The training curves of metrics.jsonl as a PNG (matplotlib, headless)."""
from __future__ import annotations

import json


def plot_metrics(metrics_path: str, out_path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train])
    axes[0].set_title("loss (DDPO + SFT term if any)")
    axes[1].plot(steps, [r["margin"] for r in train], label="train")
    if evals:
        axes[1].plot([r["step"] for r in evals], [r["eval_margin"] for r in evals], "o-", label="held-out")
    axes[1].set_title("reward margin")
    axes[1].legend()
    axes[2].plot(steps, [r["accuracy"] for r in train], label="train")
    if evals:
        axes[2].plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="held-out")
    axes[2].set_title("preference accuracy")
    axes[2].set_ylim(0, 1.02)
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path

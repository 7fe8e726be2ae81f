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
    evals = [r for r in rows if "eval_accuracy" in r]  # step 0 (the start, after any SFT warm-up) included
    generated = [r for r in rows if "chair_s" in r]
    fig, axes = plt.subplots(1, 4 if generated else 3, figsize=(17 if generated else 13, 3.6))
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
    if generated:
        steps_g = [r["step"] for r in generated]
        for name, label in (("chair_s", "answers with a hallucination"), ("chair_i", "hallucinated / mentioned"),
                            ("recall", "recall of present objects")):
            axes[3].plot(steps_g, [r[name] for r in generated], "o-", label=label)
        axes[3].set_title("held-out generation (greedy), CHAIR-style")
        axes[3].set_ylim(0, 1.02)
        axes[3].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path

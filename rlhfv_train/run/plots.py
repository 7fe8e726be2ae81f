"""The training curves of metrics.jsonl as a PNG (matplotlib, headless)."""
from __future__ import annotations

import json


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _hallucination_panel(ax, rows) -> None:
    steps = [r["step"] for r in rows]
    for name, label in (("chair_s", "answers with a hallucination"), ("chair_i", "hallucinated / mentioned"),
                        ("recall", "recall of present objects")):
        ax.plot(steps, [r[name] for r in rows], "o-", label=label)
    ax.set_title("held-out generation (greedy), CHAIR-style")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)


def _save(fig, axes, out_path: str, plt) -> str:
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def plot_metrics(metrics_path: str, out_path: str) -> str | None:
    plt = _pyplot()
    if plt is None:
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
        _hallucination_panel(axes[3], generated)
    return _save(fig, axes, out_path, plt)


def plot_grpo_metrics(metrics_path: str, out_path: str) -> str | None:
    """The GRPO trainer's curves: loss; rollout and held-out rewards; KL and clipping; hallucination rates."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = [json.loads(line) for line in open(metrics_path)]
    train = [r for r in rows if "loss" in r]
    generated = [r for r in rows if "chair_s" in r]
    fig, axes = plt.subplots(1, 4 if generated else 3, figsize=(17 if generated else 13, 3.6))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train])
    axes[0].set_title("GRPO loss")
    for name, label, style in (("scene_reward", "rollouts: scene reward", "-"),
                               ("eval_scene_reward", "held-out greedy: scene reward", "o-"),
                               ("eval_win_rate", "held-out: win rate vs chosen", "o-"),
                               ("eval_reward", "held-out: reward", "o-")):
        points = [r for r in rows if name in r]
        if points:
            axes[1].plot([r["step"] for r in points], [r[name] for r in points], style, label=label)
    axes[1].set_title("reward")
    axes[1].legend(fontsize=8)
    axes[2].plot(steps, [r["kl"] for r in train], label="KL to reference (k3)")
    axes[2].plot(steps, [r["clip_ratio"] for r in train], label="clipped tokens")
    axes[2].set_title("KL and clipping")
    axes[2].legend(fontsize=8)
    if generated:
        _hallucination_panel(axes[3], generated)
    return _save(fig, axes, out_path, plt)

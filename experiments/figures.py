"""What the experiments' figures share: pyplot on the Agg backend (None without matplotlib) and the titled save."""
from __future__ import annotations

from rlhfv_train.run.plots import _pyplot as pyplot  # noqa: F401  (the trainers' own: Agg, None without matplotlib)


def save(fig, plt, path: str, title: str, fontsize: int = 10) -> str:
    """Titles, lays out, writes (90 dpi) and closes `fig`; returns `path`."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

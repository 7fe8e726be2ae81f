"""What the experiments' outputs share: pyplot on the Agg backend (None without matplotlib), the titled save, and
the <out>.json / .md / .png report each experiment writes."""
from __future__ import annotations

import json
import os

from rlhfv_train.run.plots import _pyplot as pyplot  # noqa: F401  (the trainers' own: Agg, None without matplotlib)


def save(fig, plt, path: str, title: str, fontsize: int = 10) -> str:
    """Titles, lays out, writes (90 dpi) and closes `fig`; returns `path`."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(out: str, result: dict, title: str, body: str, footer: str, plot) -> str:
    """Writes <out>.json (`result`), <out>.md (`title`, `body`, `footer`) and <out>.png (`plot(path, title)`, which
    returns the path, or None without matplotlib); returns the .md text and a line naming the files written."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    text = f"{title}\n\n{body}\n\n{footer}\n"
    with open(out + ".md", "w") as f:
        f.write(text)
    picture = plot(out + ".png", title)
    return text + f"wrote {out}.json, {out}.md" + (f", {picture}" if picture else "")

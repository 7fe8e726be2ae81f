"""What the command-line tools of rlhfv_train share: bad input ends with one line on stderr and exit status 2 (the
traceback with RLHFV_TRACEBACK=1), help that shows every option's default, and the machine a recorded result came
from."""
from __future__ import annotations

import argparse
import os
import platform
import sys

USER_ERRORS = (ValueError, FileNotFoundError)  # bad data, flags or paths


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and shows every option's default (unless its help already says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and not any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def fail(prog: str, exc: Exception) -> int:
    """Call in an `except USER_ERRORS` block: one line on stderr, exit status 2; re-raises under RLHFV_TRACEBACK."""
    if os.environ.get("RLHFV_TRACEBACK"):
        raise exc
    print(f"{prog}: error: {exc}  (RLHFV_TRACEBACK=1 shows the traceback)", file=sys.stderr)
    return 2


def print_start_to_end(label: str, start: dict, end: dict, names) -> None:
    """'label, start -> end: name a -> b, ...' for the metrics both rows have (nothing when none)."""
    shown = [name for name in names if name in start and name in end]
    if shown:
        print(f"{label}, start -> end: " + ", ".join(f"{n} {start[n]:.3f} -> {end[n]:.3f}" for n in shown))


def machine() -> dict:
    import torch
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version()}

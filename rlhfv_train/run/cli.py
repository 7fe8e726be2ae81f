"""What the command-line tools of rlhfv_train share: bad input ends with one line on stderr and exit status 2 (the
traceback with RLHFV_TRACEBACK=1), help that shows every option's default, user plugins given as module:function,
and the machine a recorded result came from."""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from collections.abc import Callable

from ..files import SaveFailed, UnreadableFile
from .guard import NonFiniteStep

# bad data, flags, paths or files; a full disk or a failing one; a run that diverged
USER_ERRORS = (ValueError, FileNotFoundError, SaveFailed, UnreadableFile, NonFiniteStep)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and shows every option's default (unless its help already says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        switch = action.nargs == 0  # --x / --no-x: the help says what it does
        if not switch and "default" not in text and not any(action.default is v for v in (None, argparse.SUPPRESS)):
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


def print_skipped(metrics: dict) -> None:
    """The NaN guard's count (--skip-nonfinite), when updates were skipped."""
    skipped = metrics.get("nonfinite_skipped", 0)
    if skipped:
        print(f"{skipped} optimizer update{'s' if skipped > 1 else ''} skipped: non-finite loss or gradient norm "
              "(--skip-nonfinite; each is named above and counted in metrics.jsonl)")


def machine() -> dict:
    import torch
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version()}


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

"""A run's folder at the start, before any work: with --resume, the files it will read are checked and the flags must
be the run's own; without it, a folder that holds a run is refused unless --overwrite (which deletes that run first).

A resumed run continues the run in its folder, so every flag that changes what the run computes (the learning rate,
the seed and with it the held-out split, the batch, the loss, the data, LoRA, ...) must equal the one the run was
started with (its checkpoint keeps the config): a change is refused naming the flag and both values. Flags that only
extend or watch the run (MAY_CHANGE) may change, and the run says so.
"""
from __future__ import annotations

import os
from dataclasses import asdict

from ..files import load_verified, verify
from .checkpoint import CHECKPOINT_ADVICE
from .flags import flag_fields, flag_name
from .sft import REDO_SFT

RUN_FILES = ("checkpoint.pt", "sft.pt", "metrics.jsonl", "metrics.png")  # what a run writes; --overwrite deletes them
# what may differ from the checkpoint's config on --resume (and is said): how long the run goes on, how often it
# saves and evaluates, where its kernels run, and the guard's budget; none changes what a step computes
MAY_CHANGE = ("max_steps", "save_every", "eval_every", "device", "backend", "skip_nonfinite")
NOT_COMPARED = ("resume", "overwrite", "output_dir", "progress")  # how this command runs, not what the run is
# what shapes the SFT stage (and the data it sees): compared with sft.pt's config when no checkpoint exists yet
SFT_FIELDS = ("data", "eval_data", "eval_fraction", "seed", "model", "init_weights", "sft_steps", "sft_lr",
              "max_grad_norm", "skip_bad", "synthetic_examples", "chat_template", "batch_size", "sft_batch_size",
              "video_frames")


def check_folder(cfg) -> None:
    """The main process's check of cfg.output_dir before any work (see the module docstring)."""
    folder = cfg.output_dir
    if cfg.resume:
        _check_resumable(cfg)
        return
    present = [name for name in RUN_FILES if os.path.isfile(os.path.join(folder, name))]
    if not present:
        return
    if not cfg.overwrite:
        raise ValueError(f"--output-dir {folder} holds a run ({', '.join(present)}): continue it with --resume, "
                         "start it over with --overwrite (its checkpoint, SFT weights and metrics are deleted), or "
                         "pick another --output-dir")
    for name in present:
        os.remove(os.path.join(folder, name))
    print(f"--overwrite: deleted the run in {folder} ({', '.join(present)})")


def _check_resumable(cfg) -> None:
    """The files --resume will read, checked before any work (a damaged one would otherwise fail after the data, the
    model and the SFT stage, or worse, train on), and the flags against the config they hold."""
    folder = cfg.output_dir
    found = {}
    for name, advice in (("checkpoint.pt", CHECKPOINT_ADVICE), ("sft.pt", REDO_SFT)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            verify(path, advice=advice)
            found[name] = (path, advice)
    if "checkpoint.pt" in found:
        compare_config(cfg, *found["checkpoint.pt"], fields=None)
    elif "sft.pt" in found:  # stopped before the first checkpoint: only the SFT stage's result is reused
        compare_config(cfg, *found["sft.pt"], fields=SFT_FIELDS)


def compare_config(cfg, path: str, advice: str, *, fields) -> None:
    """Refuses a flag of `cfg` that differs from the config saved in `path` (only `fields`, when given), except
    MAY_CHANGE, whose changes are printed."""
    saved = load_verified(path, advice=advice, mmap=True).get("config")  # mmap: the weights are not read
    if not isinstance(saved, dict):
        print(f"--resume: {path} records no config (an older file); the flags are not compared with it")
        return
    current = asdict(cfg)
    changed, noted = [], []
    for field in flag_fields(type(cfg)):
        name = field.name
        if name not in saved or name in NOT_COMPARED or (fields is not None and name not in fields) \
                or _same(saved[name], current[name]):
            continue
        if isinstance(field.default, bool):  # a switch: given or not
            text = (f"{flag_name(field)} {'given' if current[name] != field.default else 'left out'} (the run was "
                    f"started {'with' if saved[name] != field.default else 'without'} it)")
        else:
            text = f"{flag_name(field)} {current[name]!r} (the run's: {saved[name]!r})"
        (noted if name in MAY_CHANGE else changed).append((name, text))
    if changed:
        raise ValueError(f"--resume: these flags differ from the run in {cfg.output_dir} ({path}) and would change "
                         f"what it computes: {'; '.join(text for _, text in changed)}. Give the run's values to "
                         "continue it, or start a new run (--overwrite, or another --output-dir)")
    for name, text in noted:
        note = " (the learning-rate schedule is stretched to the new length from here on)" if name == "max_steps" \
            else ""
        print(f"--resume: {text}{note}")


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b

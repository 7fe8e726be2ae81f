"""Checkpoints: unsharded model/optimizer state (under FSDP too), RNG state; written whole and verified when read
(files.py); the metrics rows kept in step with them."""
from __future__ import annotations

import json
import os
import random

import torch

from ..files import DamagedFile, SaveFailed, cause_of, load_verified, save_verified, write_text_whole

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "step")

def full_state(model, optimizer, sharded: bool) -> tuple[dict, dict]:
    """Unsharded model and optimizer state (a collective when the parameters are DTensors, FSDP2's or tensor
    parallelism's: every process calls it)."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict, sharded: bool) -> None:
    if not sharded:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    # A parameter that never had a gradient (a vision tower's unused post-layernorm) has no AdamW state in the
    # checkpoint, as in the run that wrote it; strict loading would refuse that.
    set_optimizer_state_dict(model, optimizer, optimizer_state,
                             options=StateDictOptions(full_state_dict=True, strict=False))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str, model, optimizer, scheduler, step: int, *, sharded: bool, dist, **extra) -> None:
    """The trainers' checkpoint: unsharded model and optimizer, scheduler, RNG, step, and `extra` (config, data
    path, ...). A collective under FSDP; the main process writes."""
    model_state, optimizer_state = full_state(model, optimizer, sharded)
    if dist.is_main:
        save_verified(path, {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                             "rng": rng_state(), "step": step, **extra}, what="checkpoint")
    dist.barrier()


def append_row(metrics_file, row: dict) -> None:
    """One metrics.jsonl row in one write() of the whole line (an O_APPEND file): a kill leaves it whole or absent;
    only a full disk can cut it short, and --resume drops such a torn last line."""
    line = (json.dumps(row) + "\n").encode()
    try:
        written = os.write(metrics_file.fileno(), line)
    except OSError as exc:  # a full or read-only disk: the row is lost, the checkpoints are not
        raise SaveFailed(f"could not append step {row.get('step')}'s row to {metrics_file.name} "
                         f"({cause_of(exc, metrics_file.name)}); the last checkpoint is intact: fix the disk, then "
                         "run again with --resume") from exc
    if written != len(line):
        raise SaveFailed(f"could not write a whole metrics row to {metrics_file.name} ({written} of {len(line)} "
                         "bytes: is the disk full?); --resume drops the torn line")


def open_metrics(path: str, main: bool):
    """metrics.jsonl opened for appending rows (the main process; the others write nowhere); SaveFailed names the
    file when it cannot be opened."""
    if not main:
        return open(os.devnull, "w")
    try:
        return open(path, "a")
    except OSError as exc:
        raise SaveFailed(f"could not open {path} to append metrics ({cause_of(exc, path)}); fix the disk or the "
                         "file's permissions, then run again with --resume") from exc


def metrics_lines_upto(path: str, step: int) -> list[str]:
    """The lines of a metrics.jsonl whose step is at most `step`. A last line that does not parse is what a kill
    during its append leaves: it is dropped, with a message. A damaged line before the last is an error naming the file
    and the line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            row_step = row["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            if number == len(lines):
                print(f"--resume: dropped the torn last line of {path} (line {number}: the run was stopped while "
                      "writing it)")
                break
            raise ValueError(f"{path}, line {number}: not a metrics row ({line[:60]!r}); repair or delete that line, "
                             "or remove the file to start its metrics over") from None
        if row_step <= step:
            kept.append(line + "\n")
    return kept


CHECKPOINT_ADVICE = "remove it to start over from step 0, or put back a good copy"


def read_checkpoint(path: str) -> dict:
    """save_training_state's file, verified (DamagedFile names the file and what to do)."""
    state = load_verified(path, advice=CHECKPOINT_ADVICE)
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise DamagedFile(path, f"not a trainer checkpoint: no {', '.join(map(repr, missing))}", CHECKPOINT_ADVICE)
    return state


def start_or_resume(ckpt_path: str, metrics_path: str, model, optimizer, scheduler, *, resume: bool,
                    max_steps: int, sharded: bool, dist, guard=None) -> tuple[int, dict, dict]:
    """The trainers' start: with `resume` and a checkpoint, loads save_training_state's file (and the NaN guard's
    count of skipped updates) and drops the metrics lines written after it; otherwise starts a fresh metrics file
    (and says when --resume found nothing). Returns (step, first metrics row kept, last row kept): what a summary
    reports when there is nothing left to run."""
    step, first, last = 0, {}, {}
    if resume and os.path.isfile(ckpt_path):
        state = read_checkpoint(ckpt_path)
        load_full_state(model, optimizer, state["model"], state["optimizer"], sharded)
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        step = state["step"]
        if guard is not None:  # every process reads it from the checkpoint: they decide alike
            guard.skipped, guard.last_saved = state.get("nonfinite_skipped", 0), (step, ckpt_path)
        if dist.is_main:
            print(f"resumed from {ckpt_path} at step {step}")
            if os.path.isfile(metrics_path):
                kept = metrics_lines_upto(metrics_path, step)
                write_text_whole(metrics_path, "".join(kept), what="metrics")  # never truncated in place
                if kept:
                    first, last = json.loads(kept[0]), json.loads(kept[-1])
            if step >= max_steps:
                print(f"--resume: the run already reached --max-steps {max_steps}; nothing to train (raise "
                      "--max-steps to continue)")
    elif dist.is_main:
        if resume:  # say so rather than start over silently
            print(f"--resume: no checkpoint at {ckpt_path}; starting from step 0")
        if os.path.isfile(metrics_path):
            os.remove(metrics_path)
    dist.barrier()
    return step, first, last

"""Which records a run trains on and which it holds out: the trainers' data (a file, or the synthetic scenes generated
once) and the seeded held-out split, so the trainers, the evaluation and the experiments rebuild the same sets."""
from __future__ import annotations

import os

import torch


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) record indices from a seeded shuffle: a run's held-out set can always be rebuilt."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = int(round(n * fraction)) if n > 1 else 0
    return sorted(order[held:]), sorted(order[:held])


def load_run_records(data: str | None, *, eval_data: str | None, eval_fraction: float, seed: int, skip_bad: bool,
                     output_dir: str, synthetic_examples: int, dist, progress: bool = True, video_frames: int = 8):
    """(records, training indices, held-out indices, data path) of a run. data None: the synthetic scenes, generated
    once into output_dir/synthetic by the main process. eval_data: a held-out file of its own, appended after the
    training records and indexed like a split; else a seeded eval_fraction of `data` is held out. video_frames: the
    frames sampled from each video record's clip."""
    from .records import load_records
    data_path = data
    if data_path is None:
        from . import synthetic
        data_path = os.path.join(output_dir, "synthetic", "data.jsonl")
        if dist.is_main and not os.path.isfile(data_path):
            synthetic.generate(os.path.dirname(data_path), synthetic_examples, seed=seed, progress=progress)
        dist.barrier()
    records, report = load_records(data_path, skip_bad=skip_bad, video_frames=video_frames)
    if dist.is_main:
        print(f"data: {data_path}: {report.summary()}")
    if eval_data is None:
        train_idx, eval_idx = split_indices(len(records), eval_fraction, seed)
    else:
        held, held_report = load_records(eval_data, skip_bad=skip_bad, video_frames=video_frames)
        if dist.is_main:
            print(f"held-out data: {eval_data}: {held_report.summary()}")
        train_idx, eval_idx = list(range(len(records))), list(range(len(records), len(records) + len(held)))
        records = records + held
    return records, train_idx, eval_idx, data_path

"""The one training loop both trainers run: setup (start), then the steps with their cadence (run_steps).

    run = start(cfg, sft_collate=..., sft_batch_size=...)   # device, processes, records, model, SFT stage
    ... the trainer's own setup: LoRA, reference, optimizer = optimizer_and_schedule(...) ...
    summary = run_steps(run, model, optimizer, scheduler, train_step=..., evaluate=..., ...)

run_steps owns what every run does the same way: resume from output_dir/checkpoint.pt (exact: model, optimizer,
scheduler, RNG, and the metrics rows up to the checkpoint's step), the held-out evaluation at step 0 (after the SFT
stage) and every eval_every steps, one metrics.jsonl row per step, checkpoints every save_every steps, the progress
bar, the plot and the summary. A trainer supplies train_step(step) -> that step's metrics (averaged over processes,
with its grad_norm) and evaluate() -> the held-out metrics.
"""
from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import rlhfv_kernels as rk

from ..data import load_run_records
from ..models import check_fused_linear, is_dtensor, load_processor_and_model, load_weights
from ..models.packed_model import check_packing
from . import output
from .checkpoint import append_row, open_metrics, save_training_state, start_or_resume
from .config import RunConfig
from .distributed import Distributed, process_device
from .guard import StepGuard
from .schedule import cosine_with_warmup
from .resume import check_folder
from .sft import sft_stage


@dataclass
class Run:
    """What start() set up: the config, the device and processes, the records and their split, the model (after the
    SFT stage) and its processor."""
    cfg: RunConfig
    device: torch.device
    dist: Distributed
    autocast_dtype: torch.dtype | None   # bf16 on GPU
    records: list
    train_idx: list[int]
    eval_idx: list[int]
    data_path: str | None                # the data file the run really used (the generated synthetic data too)
    processor: object
    model: torch.nn.Module
    collate: Callable                    # sft_collate(processor): [(index, record)] -> PairBatch
    sft_losses: list[float]
    guard: StepGuard                     # the NaN guard of every optimizer update (guard.py)

    @property
    def fsdp(self) -> bool:
        return self.cfg.fsdp and self.dist.world > 1

    @property
    def sharded(self) -> bool:
        """Whether the trained parameters are shards (FSDP2's or tensor parallelism's DTensors): checkpoints gather
        them."""
        return self.fsdp or self.dist.tensor_parallel


def one_run_per_folder(train: Callable) -> Callable:
    """Decorates a trainer's train(cfg): its main process holds cfg.output_dir's lock (output.py) from before any work
    to the end of the run, however it ends; a second run in the folder fails at once, naming the holder."""
    @functools.wraps(train)
    def locked(cfg, *args, **kwargs):
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun's other processes: the main one holds it
            return train(cfg, *args, **kwargs)
        lock = output.claim(cfg.output_dir)
        try:
            return train(cfg, *args, **kwargs)
        finally:
            lock.release()
    return locked


def start(cfg: RunConfig, *, sft_collate: Callable, sft_batch_size: int,
          check_records: Callable | None = None) -> Run:
    """Checks cfg, then sets up the run up to the end of the SFT stage. sft_collate(processor) makes the collator of
    the SFT stage (and of the checks of the fused-linear route and of packing, refused before any work when the model
    cannot honour them); check_records(records, train_idx) may refuse the data."""
    device = process_device(cfg.device)
    dist = Distributed(device, tensor_parallel=cfg.tensor_parallel)
    cfg.check(dist.world)
    if cfg.backend is not None:  # on this device, for this route: refused now rather than at the first step
        try:
            rk.resolve_backend(cfg.backend, device, "linear" if cfg.fused_linear else "logits")
        except rk.BackendUnavailableError as exc:
            raise ValueError(f"--backend {cfg.backend}: {exc}") from None
    os.makedirs(cfg.output_dir, exist_ok=True)
    if dist.is_main:
        check_folder(cfg)  # --resume: the files it reads and the flags; else no run in the folder, or --overwrite
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    records, train_idx, eval_idx, data_path = load_run_records(
        cfg.data, eval_data=cfg.eval_data, eval_fraction=cfg.eval_fraction, seed=cfg.seed, skip_bad=cfg.skip_bad,
        output_dir=cfg.output_dir, synthetic_examples=cfg.synthetic_examples, dist=dist, progress=cfg.progress,
        video_frames=cfg.video_frames)
    if check_records is not None:
        check_records(records, train_idx)
    processor, model = load_processor_and_model(cfg.model, cfg.seed)
    model.to(device)
    if dist.is_main:
        _check_room(cfg, model)
    if cfg.grad_checkpointing:  # transformers 5 renamed the switch; older releases only have the first name
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    collate = sft_collate(processor)
    if cfg.fused_linear or cfg.packing:
        sample = collate([(i, records[i]) for i in train_idx[:2]]).to(device).model_inputs()
        if cfg.fused_linear:  # refuse a model whose logits the route cannot reproduce
            check_fused_linear(model, sample, autocast_dtype)
        if cfg.packing:  # refuse a model that lets packed sequences see each other
            check_packing(model, sample, autocast_dtype)
    if cfg.init_weights is not None:
        load_weights(model, cfg.init_weights)
    sft_losses = sft_stage(model, collate, records, train_idx, dist=dist, output_dir=cfg.output_dir,
                           steps=cfg.sft_steps, lr=cfg.sft_lr, batch_size=sft_batch_size, seed=cfg.seed,
                           resume=cfg.resume, max_grad_norm=cfg.max_grad_norm, autocast_dtype=autocast_dtype,
                           backend=cfg.backend, progress=cfg.progress,
                           extra={"config": asdict(cfg), "data_path": data_path})
    return Run(cfg, device, dist, autocast_dtype, records, train_idx, eval_idx, data_path, processor, model, collate,
               sft_losses, StepGuard(cfg.skip_nonfinite))


def _check_room(cfg: RunConfig, model) -> None:
    """Room for the next save of the files that exist, else for an estimate (weights and AdamW's two moments, plus
    the SFT weights when a stage will write them)."""
    names = ["checkpoint.pt"] + (["sft.pt"] if cfg.sft_steps else [])
    known = {name: os.path.getsize(os.path.join(cfg.output_dir, name)) for name in names
             if os.path.isfile(os.path.join(cfg.output_dir, name))}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    output.check_room(cfg.output_dir, known=known, estimated=3 * weights + (weights if cfg.sft_steps else 0))


def optimizer_and_schedule(cfg: RunConfig, model, total_updates: int):
    """AdamW over the model's parameters, with the linear warm-up (warmup_ratio of total_updates) and cosine decay."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total_updates)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total_updates, warmup))
    return optimizer, scheduler


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float, *, guard: StepGuard, loss: float,
                   where: str) -> float:
    """Clip, step (unless the guard refuses the update: see guard.py), advance the schedule, clear the gradients;
    returns the norm before clipping. `loss` must be the same on every process (averaged over them), as the norm is."""
    grad_norm = _clip_grad_norm(model, max_grad_norm)
    if guard.allows(where, loss, grad_norm):
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _clip_grad_norm(model, max_grad_norm: float) -> float:
    """torch's clip_grad_norm_ over every parameter; under tensor parallelism some gradients are DTensors (the
    sharded weights: their norm is a collective over the shards) and some plain tensors (replicated norms, a vision
    tower), which torch does not mix in one call: the two groups' norms are combined here, then both clipped."""
    params = [p for p in model.parameters() if p.grad is not None]
    groups = [[p for p in params if is_dtensor(p.grad)], [p for p in params if not is_dtensor(p.grad)]]
    if not groups[0] or not groups[1]:
        return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    norms = [torch.nn.utils.get_total_norm([p.grad for p in group]) for group in groups]
    total = torch.sqrt(norms[0].full_tensor() ** 2 + norms[1] ** 2)
    for group in groups:
        torch.nn.utils.clip_grads_with_norm_(group, max_grad_norm, total.to(group[0].grad.device))
    return float(total)


def run_steps(run: Run, model, optimizer, scheduler, *, train_step: Callable[[int], dict],
              evaluate: Callable[[], dict], progress_postfix: Callable[[dict], dict], plot: Callable,
              desc: str, **checkpoint_extra) -> dict:
    """Resumes or starts, runs train_step for every step up to cfg.max_steps with the evaluation / metrics /
    checkpoint cadence, and returns the summary (last and first metrics, the paths written, the model).
    checkpoint_extra goes into every checkpoint beside the config and the data path."""
    cfg, dist = run.cfg, run.dist
    ckpt_path = os.path.join(cfg.output_dir, "checkpoint.pt")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    step, first, last = start_or_resume(ckpt_path, metrics_path, model, optimizer, scheduler, resume=cfg.resume,
                                        max_steps=cfg.max_steps, sharded=run.sharded, dist=dist, guard=run.guard)

    def checkpoint():
        save_training_state(ckpt_path, model, optimizer, scheduler, step, sharded=run.sharded, dist=dist,
                            config=asdict(cfg), data_path=run.data_path, nonfinite_skipped=run.guard.skipped,
                            **checkpoint_extra)
        run.guard.last_saved = (step, ckpt_path)

    from tqdm import tqdm
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, unit="step", disable=not cfg.progress or not dist.is_main)
    with open_metrics(metrics_path, dist.is_main) as metrics_file:
        if step == 0:  # the starting point (after the SFT stage): what training is measured against
            first = {"step": 0, **evaluate()}
            if run.sft_losses:
                first["sft_loss"] = sum(run.sft_losses[-10:]) / len(run.sft_losses[-10:])
            append_row(metrics_file, first)
        while step < cfg.max_steps:
            metrics = train_step(step)
            step += 1
            last = {"step": step, **metrics, "lr": scheduler.get_last_lr()[0], **run.guard.row()}
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                last.update(evaluate())
            append_row(metrics_file, last)
            bar.update()
            bar.set_postfix(progress_postfix(last))
            if cfg.stop_after is not None and step >= cfg.stop_after:  # as if killed: no final save
                if step % cfg.save_every == 0:
                    checkpoint()
                bar.close()
                return {"step": step, "stopped": True, "metrics": last}
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                checkpoint()
    bar.close()
    plotted = plot(metrics_path, os.path.join(cfg.output_dir, "metrics.png")) if dist.is_main else None
    return {"step": step, "metrics": last, "start_metrics": first, "metrics_path": metrics_path, "plot": plotted,
            "checkpoint": ckpt_path, "model": model}

"""The SFT stage: next-token NLL on the chosen answers, so that preference training starts from a model that already
answers (the RLHF-V and MM-RLHF recipes start from an SFT model). fine_tune() takes the steps; sft_stage() is a
trainer's stage (trained once, saved as sft.pt, read back by the other processes and by --resume).

For the embedded tiny model (random weights) and small models; a real model should come in already fine-tuned
(--model) or with its SFT weights (--init-weights). Runs in one process: under torchrun the main process trains
and the others load its result.
"""
from __future__ import annotations

import os

import torch

from ..data import BatchStream
from ..models import load_weights, model_loss
from ..files import save_verified
from .guard import StepGuard


REDO_SFT = "delete it and run again with --resume: the SFT stage runs again first"


def chosen_nll(model, batch, *, autocast_dtype=None, backend=None, inplace_backward=True) -> torch.Tensor:
    """Token-mean NLL of the chosen answers of a PairBatch (the rejected half is not run through the model)."""
    chosen = batch.chosen()
    labels = chosen.next_token_targets()[0]
    logps = model_loss("token_logprobs", model, chosen.model_inputs(), labels, autocast_dtype=autocast_dtype,
                       inplace_backward=inplace_backward, backend=backend)
    mask = (labels != -100).to(logps.dtype)
    return -(logps * mask).sum() / mask.sum().clamp_min(1.0)


def fine_tune(model, batches, *, steps: int, lr: float, max_grad_norm: float = 1.0, autocast_dtype=None,
           backend=None, progress=None) -> list[float]:
    """`steps` AdamW steps (constant lr) on chosen_nll over `batches` (a callable step -> PairBatch on the model's
    device); returns the loss of every step."""
    if steps < 0 or lr <= 0:
        raise ValueError(f"SFT needs steps >= 0 and lr > 0, got {steps} and {lr}")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, guard = [], StepGuard()  # a diverging SFT stage always stops: its weights would be the reference
    for step in range(steps):
        loss = chosen_nll(model, batches(step), autocast_dtype=autocast_dtype, backend=backend)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
        losses.append(loss.item())
        guard.allows(f"SFT step {step + 1} of {steps}", losses[-1], grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress.update()
            progress.set_postfix(nll=f"{losses[-1]:.3f}")
    return losses


def sft_stage(model, collate, records, train_idx, *, dist, output_dir: str, steps: int, lr: float, batch_size: int,
              seed: int, resume: bool, max_grad_norm: float = 1.0, autocast_dtype=None, backend=None,
              progress: bool = True, extra: dict | None = None) -> list[float]:
    """A trainer's SFT stage when steps > 0, saved as output_dir/sft.pt (with `extra`, e.g. the run's config). The main
    process trains; the others, and a resumed run (whose reference comes from these weights), load the file.
    batch_size is per process: the main process trains on the global batch, so a run under torchrun fine-tunes
    exactly like one process. Returns the losses."""
    if steps == 0:
        return []
    path = os.path.join(output_dir, "sft.pt")
    if resume and os.path.isfile(path):
        return load_weights(model, path, damaged_advice=REDO_SFT)["sft_losses"]
    losses = []
    if dist.is_main:
        from tqdm import tqdm
        stream = BatchStream(train_idx, batch_size * dist.data_world, seed + 7919)  # an order of its own
        with tqdm(total=steps, desc="sft", unit="step", disable=not progress) as bar:
            losses = fine_tune(model, lambda k: collate([(i, records[i]) for i in stream.batch(k)]).to(
                next(model.parameters()).device), steps=steps, lr=lr, max_grad_norm=max_grad_norm,
                autocast_dtype=autocast_dtype, backend=backend, progress=bar)
        save_verified(path, {"model": model.state_dict(), **(extra or {}), "sft_losses": losses, "step": 0},
                      what="SFT weights")
    dist.barrier()
    if not dist.is_main:
        losses = load_weights(model, path, damaged_advice=REDO_SFT)["sft_losses"]
    return losses

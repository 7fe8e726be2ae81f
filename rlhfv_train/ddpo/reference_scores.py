"""Reference-model sequence scores, computed once with the frozen starting model and cached on disk (for_run: the
DDPO trainer's; one process scores, the others read its cache).

The cache key covers the data (every record's text and image), the model (its config and every weight) and the
scoring settings (gamma, min_match, mode, temperature), so a changed input never reuses stale scores.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

from ..data import PreferenceRecord
from ..files import DamagedFile, load_verified, save_verified
from ..models import model_loss


def _hash_records(records: list[PreferenceRecord], digest) -> None:
    for r in records:
        digest.update(json.dumps([r.question, r.chosen, r.rejected, r.reward_margin]).encode())
        for image in r.images:
            if isinstance(image, bytes):
                digest.update(hashlib.sha256(image).digest())
            else:
                with open(image, "rb") as f:
                    digest.update(hashlib.sha256(f.read()).digest())
        if r.video is not None:  # the clip and how many of its frames the prompt shows
            with open(r.video, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest() + str(r.video_frames).encode())


def cache_key(records, model, settings: dict) -> str:
    digest = hashlib.sha256()
    _hash_records(records, digest)
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:24]


@torch.no_grad()
def score_pairs(model, batches, settings: dict, device, *, autocast_dtype=None, backend=None,
                progress=None) -> dict[int, tuple[float, float]]:
    """{record index: (chosen score, rejected score)} under `model`, scored like the DDPO loss scores the policy."""
    was_training = model.training
    model.eval()
    scores = {}
    try:
        for batch in batches:
            batch = batch.to(device)
            labels, weights = batch.next_token_targets()
            seq = model_loss("sequence_logps", model, batch.model_inputs(), labels, weights,
                             autocast_dtype=autocast_dtype, mode=settings["mode"], temperature=settings["temperature"],
                             backend=backend)
            pairs = batch.indices.numel()
            for k, index in enumerate(batch.indices.tolist()):
                scores[index] = (float(seq[k]), float(seq[pairs + k]))
            if progress is not None:
                progress.update(pairs)
    finally:
        model.train(was_training)
    return scores


def load_or_compute(path_dir: str, key: str, compute) -> dict[int, tuple[float, float]]:
    """Scores from path_dir/refs-<key>.pt, or compute() and store them there (written whole). A damaged cache file is
    rebuilt, with a message: the scores can always be computed again."""
    os.makedirs(path_dir, exist_ok=True)
    path = os.path.join(path_dir, f"refs-{key}.pt")
    if os.path.isfile(path):
        try:
            scores = load_verified(path, advice="computing the reference scores again")
            if isinstance(scores, dict):
                return scores
            raise DamagedFile(path, f"holds a {type(scores).__name__}, not the scores",
                              "computing the reference scores again")
        except DamagedFile as exc:
            print(f"note: {exc}")
    scores = compute()
    save_verified(path, scores, what="reference scores")
    return scores


def for_run(run, model) -> tuple[dict[int, tuple[float, float]], str]:
    """(the scores of every record of a run.loop.Run under `model`, the cache key). Everything that changes the
    scored tokens or their scores keys the cache (the prompts too)."""
    cfg, records, dist = run.cfg, run.records, run.dist
    settings = {"gamma": cfg.gamma, "min_match": cfg.min_match, "mode": cfg.mode, "temperature": cfg.temperature,
                "chat_template": cfg.chat_template}
    key = cache_key(records, model, settings)

    def compute():
        from tqdm import tqdm
        bar = tqdm(total=len(records), desc="reference scores", unit="pair", disable=not cfg.progress)
        batches = (run.collate([(i, records[i]) for i in range(s, min(s + cfg.batch_size, len(records)))])
                   for s in range(0, len(records), cfg.batch_size))
        try:
            return score_pairs(model, batches, settings, run.device, autocast_dtype=run.autocast_dtype,
                               backend=cfg.backend, progress=bar)
        finally:
            bar.close()

    cache_dir = os.path.join(cfg.output_dir, "ref_cache")
    if dist.is_main:
        refs = load_or_compute(cache_dir, key, compute)
    dist.barrier()
    if not dist.is_main:
        refs = load_or_compute(cache_dir, key, compute)
    return refs, key

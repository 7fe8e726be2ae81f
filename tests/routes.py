"""Both trainers on the logits route, --fused-linear and --packing from one data file and model folder: the same
losses and gradient norms at every step (each sequence scored with its own image and video rows: a mis-split changes
them). Shared by the image-layout and video tests."""
import json

import pytest


def step_rows(output_dir):
    with open(f"{output_dir}/metrics.jsonl") as f:
        return [row for row in map(json.loads, f) if row["step"] > 0]


def assert_routes_agree(data, model, tmp_path, *, eval_fraction, max_tokens_per_row):
    """DDPO (3 steps, a 1-step warm-up) and GRPO (2 steps, groups of 2, the scene judge) on each route."""
    from rlhfv_train.ddpo import TrainConfig, train
    from rlhfv_train.grpo import GRPOConfig, train_grpo

    def ddpo(route, out):
        train(TrainConfig(data=data, model=model, output_dir=str(out), max_steps=3, batch_size=3,
                          eval_fraction=eval_fraction, eval_every=3, save_every=3, sft_steps=1,
                          fused_linear=route == "fused-linear", packing=route == "packing",
                          max_tokens_per_row=max_tokens_per_row if route == "packing" else None,
                          hallucination_eval=False, progress=False, device="cpu", lr=1e-3))

    def grpo(route, out):
        train_grpo(GRPOConfig(data=data, model=model, judge="scene", output_dir=str(out), max_steps=2,
                              num_generations=2, prompts_per_step=3, max_new_tokens=5, micro_batch=4,
                              fused_linear=route == "fused-linear", packing=route == "packing",
                              eval_fraction=eval_fraction, eval_every=2, save_every=2, eval_max_new_tokens=3,
                              sft_steps=0, progress=False, device="cpu", lr=1e-3))

    for trainer, steps in ((ddpo, 3), (grpo, 2)):
        runs = {}
        for route in ("logits", "fused-linear", "packing"):
            out = tmp_path / f"{trainer.__name__}-{route}"
            trainer(route, out)
            runs[route] = step_rows(out)
        assert len(runs["logits"]) == steps
        for route in ("fused-linear", "packing"):
            for expected, got in zip(runs["logits"], runs[route]):
                assert got["loss"] == pytest.approx(expected["loss"], abs=1e-5), (trainer.__name__, route)
                assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), (trainer.__name__, route)

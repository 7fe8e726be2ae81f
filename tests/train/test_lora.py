"""LoRA on the policy in both trainers (rlhfv_train/models/lora.py): only the adapters train, the DDPO run starts at
ln 2 and the fused-linear route gives the same steps, GRPO's KL reference is the same network with its adapters
disabled (no copy; KL 0 at the first update), the evaluation rebuilds a LoRA run, and bad options fail at once."""
import copy
import json
import math
import os

import pytest
import torch

from rlhfv_train import eval as evaluate
from rlhfv_train.data import synthetic
from rlhfv_train.grpo import GRPOConfig, train_grpo
from rlhfv_train.models import load_processor_and_model
from rlhfv_train.models.tiny_families import build_family
from rlhfv_train.ddpo import TrainConfig, train

pytest.importorskip("peft")
pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(Qwen2-VL folder, its data): a VLM with packed image patches, the most demanding layout."""
    folder = tmp_path_factory.mktemp("qwen2vl")
    processor, model = build_family("qwen2-vl", seed=3)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder), synthetic.generate(str(tmp_path_factory.mktemp("scenes")), 12, seed=6)


def _rows(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip() and json.loads(line)["step"] > 0]


def ddpo(folder, data, out, **overrides):
    values = dict(data=data, model=folder, output_dir=str(out), max_steps=3, batch_size=2, eval_fraction=0.25,
                  eval_every=3, save_every=3, hallucination_eval=False, progress=False, device="cpu", lr=5e-3,
                  lora_r=4, lora_alpha=8.0, lora_target="q_proj,v_proj")
    values.update(overrides)
    return train(TrainConfig(**values))


def test_ddpo_trains_only_the_adapters_on_both_paths(saved, tmp_path):
    """Adapters on the attention and on lm_head (which the fused-linear route widens by the rank): both routes give
    the same losses, only the adapters move."""
    folder, data = saved
    _, base = load_processor_and_model(folder, 0)
    runs = {}
    for fused in (False, True):
        summary = ddpo(folder, data, tmp_path / f"fused-{fused}", fused_linear=fused,
                       lora_target="q_proj,v_proj,lm_head")
        runs[fused] = (summary["model"], [r["loss"] for r in _rows(tmp_path / f"fused-{fused}")])
    model, losses = runs[False]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert runs[True][1] == pytest.approx(losses, abs=1e-5)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    for name, value in model.get_base_model().state_dict().items():  # the base weights did not move
        if "lora_" not in name:
            torch.testing.assert_close(value, base.state_dict()[name.replace(".base_layer", "")], rtol=0, atol=0)
    b = next(p for n, p in model.named_parameters() if "lm_head.lora_B" in n)
    assert b.abs().max() > 0  # the adapters did, the head's too


def test_grpo_reference_is_the_model_with_adapters_disabled(saved, tmp_path, monkeypatch):
    folder, data = saved
    copies = []
    real_deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda obj, *a: copies.append(type(obj).__name__) or real_deepcopy(obj, *a))
    summary = train_grpo(GRPOConfig(data=data, model=folder, judge="scene", output_dir=str(tmp_path), max_steps=2,
                                    num_generations=2, prompts_per_step=2, max_new_tokens=6, micro_batch=4,
                                    eval_fraction=0.25, eval_every=2, save_every=2, eval_max_new_tokens=4,
                                    sft_steps=0, progress=False, device="cpu", lr=5e-2, beta_kl=0.1, lora_r=4,
                                    lora_target="q_proj,v_proj"))
    assert summary["step"] == 2 and not any("ForConditionalGeneration" in c or "Peft" in c for c in copies)
    rows = _rows(tmp_path)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # the first update: policy == reference (zero update)


def test_reference_mode_gives_the_base_models_log_probs(saved):
    """With moved adapters, reference_mode() scores as the base model does, and outside it the policy differs."""
    from rlhfv_kernels import reference
    from rlhfv_train.data import PairCollator, load_records
    from rlhfv_train.models.lora import LoraSettings, add_lora, reference_mode
    folder, data = saved
    processor, base = load_processor_and_model(folder, 0)
    _, policy = load_processor_and_model(folder, 0)
    policy = add_lora(policy, LoraSettings(r=4, target="q_proj,v_proj"))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    batch = PairCollator(processor, gamma=1.0)(list(enumerate(load_records(data)[0][:2])))
    labels = batch.next_token_targets()[0]
    score = lambda m: reference.token_logprobs(m(**batch.model_inputs()).logits.double(), labels)  # noqa: E731
    with torch.no_grad():
        with reference_mode(policy):
            ref = score(policy)
        torch.testing.assert_close(ref, score(base.eval()), rtol=0, atol=1e-6)
        assert (score(policy) - ref).abs().max() > 1e-3


def test_evaluate_rebuilds_a_lora_checkpoint(saved, tmp_path):
    folder, data = saved
    ddpo(folder, data, tmp_path, max_steps=2, save_every=2)
    code = evaluate.main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--max-new-tokens", "4", "--no-progress",
                          "--show", "0", "--device", "cpu"])
    assert code == 0


@pytest.mark.parametrize("overrides,message", [
    (dict(lora_r=-1), "--lora-r must be an int >= 0"), (dict(lora_alpha=0.0), "--lora-alpha must be > 0"),
    (dict(lora_dropout=1.0), "--lora-dropout must be in"),
    (dict(lora_target="no_such_module"), "--lora-target 'no_such_module'")])
def test_bad_lora_options_fail_clearly(saved, tmp_path, overrides, message):
    folder, data = saved
    with pytest.raises(ValueError, match=message):
        ddpo(folder, data, tmp_path, **overrides)



"""rlhfv_train.integrations.trl beside TRL's own trainers (runs where TRL is installed): the same batch through TRL's
DPOTrainer / GRPOTrainer and through the drop-ins gives the same loss, the same gradients and the same metrics, for
every loss option; DDPO's weighted scores against the eager reference; refusals and the version pin.

Everything runs in fp32 (bf16=False): TRL's own head and rlhfv's are then comparable to rounding. (Under a CPU bf16
autocast the two heads round at different places; that compares nothing about the options.)
"""
import copy
import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import rlhfv_kernels as rk  # noqa: E402
from rlhfv_train.integrations import trl as trl_dropin  # noqa: E402
from rlhfv_train.models import tiny  # noqa: E402
from rlhfv_train.integrations.trl import DDPOTrainer, DPOTrainer, completion_token_weights  # noqa: E402

TOKENIZER = tiny.build_tokenizer()
ROWS = [{"prompt": "what do you see ?", "chosen": f"a red {s} on the left", "rejected": f"a blue {s} at the top"}
        for s in ("circle", "square", "triangle", "circle")]
DPO_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        pad_token_id=TOKENIZER.pad_token_id, bos_token_id=TOKENIZER.bos_token_id,
                                        eos_token_id=TOKENIZER.eos_token_id))


def tiny_mixtral(seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                            num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                                            router_aux_loss_coef=0.02, pad_token_id=TOKENIZER.pad_token_id))


def dpo_config(tmp_path, **options):
    defaults = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                    report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, bf16=False, beta=0.5, seed=0)
    return trl.DPOConfig(**{**defaults, **options})


def make_dpo(cls, tmp_path, *, model_fn=tiny_llama, with_ref=True, peft_config=None, **options):
    trainer_kwargs = {k: options.pop(k) for k in list(options) if k in ("use_fused_linear", "gamma", "ddpo_mode",
                                                                         "inplace_backward", "chunk_size",
                                                                         "max_tokens_per_row", "backend",
                                                                         "min_match")}
    model = model_fn()
    return cls(model=model, ref_model=copy.deepcopy(model) if with_ref else None, args=dpo_config(tmp_path, **options),
               train_dataset=datasets.Dataset.from_list(ROWS), processing_class=TOKENIZER, peft_config=peft_config,
               **trainer_kwargs)


def loss_grads_metrics(trainer, rows=(0, 1)):
    """compute_loss on one fixed batch, in training mode: (loss, flat gradient, the metrics it logged)."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def assert_same_as_trl(ours, theirs, *, rtol=1e-5, atol=1e-6):
    (loss_a, grad_a, metrics_a), (loss_b, grad_b, metrics_b) = ours, theirs
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert grad_a.shape == grad_b.shape
    assert float((grad_a - grad_b).norm()) <= 1e-4 * float(grad_b.norm()) + 1e-7
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_b:
        assert metrics_a[key] == pytest.approx(metrics_b[key], rel=1e-4, abs=1e-5, nan_ok=True), key


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_every_dpo_loss_type_equals_trl(loss_type, tmp_path):
    options = {"loss_type": [loss_type]}
    if loss_type in ("exo_pair", "robust", "bco_pair"):
        options["label_smoothing"] = 0.1
    theirs = loss_grads_metrics(make_dpo(trl.DPOTrainer, tmp_path, **options))
    ours = loss_grads_metrics(make_dpo(DPOTrainer, tmp_path, **options))
    assert_same_as_trl(ours, theirs)


@pytest.mark.parametrize("options", [
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.3]},
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    {"loss_type": ["aot"], "label_smoothing": 0.2},
    {"f_divergence_type": "forward_kl"},
    {"f_divergence_type": "js_divergence"},
    {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5},
    {"ld_alpha": 0.4},
    {"use_weighting": True},
    {"loss_type": ["discopop"], "discopop_tau": 0.1},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused-linear"])
def test_dpo_options_equal_trl(options, fused_linear, tmp_path):
    theirs = loss_grads_metrics(make_dpo(trl.DPOTrainer, tmp_path, **options))
    ours = loss_grads_metrics(make_dpo(DPOTrainer, tmp_path, use_fused_linear=fused_linear, **options))
    assert_same_as_trl(ours, theirs)


def test_two_training_steps_give_trls_weights(tmp_path):
    """Step 1 is ln 2 for both by construction; the weights after two optimizer steps compare the updates."""
    trainers = [make_dpo(cls, tmp_path) for cls in (trl.DPOTrainer, DPOTrainer)]
    for trainer in trainers:
        trainer.train()
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in trainers]
    assert losses[0][0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for a, b in zip(trainers[0].model.parameters(), trainers[1].model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)  # AdamW divides by |g|: tiny-g elements amplify


def test_moe_router_aux_loss_equals_trl(tmp_path):
    theirs = loss_grads_metrics(make_dpo(trl.DPOTrainer, tmp_path, model_fn=tiny_mixtral))
    ours = loss_grads_metrics(make_dpo(DPOTrainer, tmp_path, model_fn=tiny_mixtral))
    assert "aux_loss" in ours[2]
    assert_same_as_trl(ours, theirs)
    with pytest.raises(ValueError, match="router aux loss"):
        make_dpo(DPOTrainer, tmp_path, model_fn=tiny_mixtral, use_fused_linear=True)


@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused-linear"])
def test_precomputed_reference_equals_trl(fused_linear, tmp_path):
    theirs = make_dpo(trl.DPOTrainer, tmp_path, precompute_ref_log_probs=True)
    ours = make_dpo(DPOTrainer, tmp_path, precompute_ref_log_probs=True, use_fused_linear=fused_linear)
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert ours.train_dataset[column] == pytest.approx(theirs.train_dataset[column], rel=1e-5)
    assert_same_as_trl(loss_grads_metrics(ours), loss_grads_metrics(theirs))


def test_peft_without_ref_model_equals_trl(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    theirs = loss_grads_metrics(make_dpo(trl.DPOTrainer, tmp_path, with_ref=False, peft_config=config))
    ours = loss_grads_metrics(make_dpo(DPOTrainer, tmp_path, with_ref=False, peft_config=config))
    assert_same_as_trl(ours, theirs)


def test_completion_token_weights_mark_the_replaced_token():
    ids = torch.tensor([[9, 9, 1, 2, 3, 4, 0], [9, 9, 1, 2, 5, 4, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 0]])
    w = completion_token_weights(ids, mask, 5.0, min_match=1)
    assert w.tolist() == [[0, 0, 1, 1, 5, 1, 0], [0, 0, 1, 1, 5, 1, 0]]


@pytest.mark.parametrize("mode", ["mean", "sum"])
@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused-linear"])
def test_ddpo_is_the_weighted_dpo_of_the_reference(mode, fused_linear, tmp_path):
    """TRL's sigmoid loss on the fused head's weighted log-probs equals the eager DDPO oracle on the same logits."""
    trainer = make_dpo(DDPOTrainer, tmp_path, gamma=5.0, ddpo_mode=mode, use_fused_linear=fused_linear,
                       disable_dropout=True)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    loss = trainer.compute_loss(trainer.model, batch)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    weights = completion_token_weights(labels.clamp(min=0), labels != -100, 5.0)
    assert weights.max() == 5.0  # the pairs differ in a replaced token
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        logits = trainer.model(**kwargs).logits[:, :-1]
        ref_scores = rk.reference.sequence_logps(trainer.ref_model(**kwargs).logits[:, :-1], labels, weights,
                                                 mode=mode)
        expected = rk.reference.ddpo_loss(logits, labels, ref_scores, token_weights=weights, beta=0.5, mode=mode)
    torch.testing.assert_close(loss.detach(), expected.loss, rtol=1e-5, atol=1e-6)
    trainer.train()
    assert all("rewards/margins" in e for e in trainer.state.log_history if "loss" in e)


def test_ddpo_precomputed_reference_uses_the_same_weights(tmp_path):
    precomputed = make_dpo(DDPOTrainer, tmp_path, precompute_ref_log_probs=True)
    on_the_fly = make_dpo(DDPOTrainer, tmp_path)
    batch = on_the_fly.data_collator([on_the_fly.train_dataset[i] for i in range(4)])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        scores = on_the_fly.ref_model(**kwargs, labels=labels, fused_lm_head=True).log_probs.sum(-1)
    assert precomputed.train_dataset["ref_chosen_logps"] == pytest.approx(scores[:4].tolist(), rel=1e-5)
    assert precomputed.train_dataset["ref_rejected_logps"] == pytest.approx(scores[4:].tolist(), rel=1e-5)


def test_refusals_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="ddpo_mode"):
        make_dpo(DPOTrainer, tmp_path, ddpo_mode="median")
    with pytest.raises(ValueError, match="gamma"):
        make_dpo(DPOTrainer, tmp_path, gamma=-1.0)
    with pytest.raises(ValueError, match="max_tokens_per_row=64 applies to packed batches only"):
        make_dpo(DPOTrainer, tmp_path, max_tokens_per_row=64)  # without DPOConfig(padding_free=True)
    with pytest.raises(ValueError, match="cast_lm_head_to_fp32"):
        trl_dropin.add_fused_lm_head(tiny_llama(), cast_lm_head_to_fp32=True)
    with pytest.raises(ValueError, match="unknown fields"):
        trl_dropin.add_fused_lm_head(tiny_llama(), outputs=("log_probs", "logits"))


@pytest.mark.parametrize("options, error, message", [
    (dict(gamma=float("inf")), ValueError, r"gamma must be a finite number >= 0, got inf"),  # trained to NaN weights
    (dict(gamma=float("nan")), ValueError, r"gamma must be a finite number >= 0, got nan"),
    (dict(gamma="5"), ValueError, r"gamma must be a finite number"),
    (dict(backend="bogus"), ValueError, r"backend must be one of .* got 'bogus'"),
    (dict(chunk_size=0, use_fused_linear=True), ValueError, r"chunk_size must be a positive int or None, got 0"),
    (dict(chunk_size=2.5, use_fused_linear=True), ValueError, r"chunk_size must be a positive int or None, got 2.5"),
    (dict(chunk_size=64), ValueError, r"chunk_size applies to the fused-linear route only"),
    (dict(min_match=0, gamma=5.0), ValueError, r"min_match must be a positive int, got 0"),
    (dict(min_match=1.5, gamma=5.0), ValueError, r"min_match must be a positive int, got 1.5"),
    (dict(use_fused_linear="yes"), TypeError, r"use_fused_linear must be True or False, got 'yes'"),
    (dict(inplace_backward=None), TypeError, r"inplace_backward must be True or False, got None"),
])
def test_every_drop_in_option_is_checked_at_construction(tmp_path, options, error, message):
    """Each of these passed construction and failed (or trained to NaN) at the first step (issue 42)."""
    with pytest.raises(error, match=message):
        make_dpo(DPOTrainer, tmp_path, **options)


def test_what_needs_the_model_is_checked_at_construction(tmp_path):
    """The backend on the training device, and the fused-linear route's plain nn.Linear head, after TRL built the
    trainer and before any step."""
    if torch.cuda.is_available():
        pytest.skip("checks a backend that cannot run on this machine's training device (CPU only)")
    with pytest.raises(rk.BackendUnavailableError, match="backend 'cuda' cannot run on cpu"):
        make_dpo(DPOTrainer, tmp_path, backend="cuda")

    def projected_head():
        model = tiny_llama()
        model.lm_head = torch.nn.Sequential(model.lm_head)  # a head the fused-linear route cannot read as [V, H]
        return model
    with pytest.raises(ValueError, match="the lm_head is a Sequential, not an nn.Linear"):
        make_dpo(DPOTrainer, tmp_path, model_fn=projected_head, use_fused_linear=True)


@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused-linear"])
def test_fused_head_of_a_batch_without_labels(fused_linear):
    """All labels ignored (a microbatch of prompts only): zeros in every field, and a backward that runs."""
    model = tiny_llama()
    trl_dropin.add_fused_lm_head(model, outputs=trl_dropin.FUSED_OUTPUTS,
                                 options=trl_dropin.FusedHeadOptions(use_fused_linear=fused_linear))
    ids = torch.randint(0, len(TOKENIZER), (2, 7))
    out = model(input_ids=ids, labels=torch.full_like(ids, -100), fused_lm_head=True)
    for name in trl_dropin.FUSED_OUTPUTS:
        value = getattr(out, name)
        assert value.shape == (2, 6) and not value.any(), name
    (out.log_probs.sum() + out.entropy.sum()).backward()


def test_fused_linear_refuses_a_head_left_sharded(tmp_path):
    """A ZeRO-3 partition of the lm_head that no hook gathered (DeepSpeed marks it NOT_AVAILABLE) is refused by
    name, not fed to a kernel as an empty weight."""
    import enum

    class Status(enum.Enum):
        NOT_AVAILABLE = 2

    trainer = make_dpo(DPOTrainer, tmp_path, use_fused_linear=True)
    trainer.model._rlhfv_route_checked = True  # (its comparison runs the model's own head, gathered by real hooks)
    head = trainer.model.lm_head
    head.weight = torch.nn.Parameter(torch.empty(0))
    head.weight.ds_status = Status.NOT_AVAILABLE
    head.weight.ds_shape = torch.Size([head.out_features, head.in_features])
    with pytest.raises(ValueError, match="lm_head's weight is still a DeepSpeed ZeRO-3 partition"):
        loss_grads_metrics(trainer)


def test_an_untested_trl_version_fails_at_import(monkeypatch):
    import importlib
    import sys
    monkeypatch.setattr(trl, "__version__", "9.0.0")
    monkeypatch.delitem(sys.modules, "rlhfv_train.integrations.trl")
    with pytest.raises(ImportError, match="trl >= 1.16.0, < 1.17.0; found trl 9.0.0"):
        importlib.import_module("rlhfv_train.integrations.trl")


# GRPO: TRL's trainer generates once; both trainers compute the loss on those same inputs, with an off-policy
# `old_per_token_logps` (ratios away from 1, so clipping acts) and a policy moved away from the reference (KL != 0).

GRPO_LOSS_TYPES = ["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"]
PROMPTS = ["what do you see ?", "describe the image", "name a shape", "what color is it ?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """TRL's GRPO loads its reference model from a path (beta > 0): a tiny Llama saved in code."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    TOKENIZER.save_pretrained(path)
    return str(path)


def reward_length(completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


def make_grpo(cls, model_dir, tmp_path, **options):
    trainer_kwargs = {k: options.pop(k) for k in list(options) if k in ("use_fused_linear", "inplace_backward",
                                                                         "backend", "chunk_size")}
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                    max_completion_length=6, use_cpu=True, bf16=False, report_to=[], save_strategy="no", max_steps=1,
                    seed=0, logging_steps=1, beta=0.1)
    trainer = cls(model=model_dir, reward_funcs=[reward_length], args=trl.GRPOConfig(**{**defaults, **options}),
                  train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                  processing_class=TOKENIZER, **trainer_kwargs)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same move away from the reference for every trainer
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def grpo_inputs(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(0)
    inputs = trainer._prepare_inputs(batch)
    mask = inputs["completion_mask"]
    generator = torch.Generator().manual_seed(2)
    base = inputs.get("ref_per_token_logps", torch.zeros(mask.shape))
    inputs["old_per_token_logps"] = (base + 0.3 * torch.randn(mask.shape, generator=generator)) * mask
    return inputs


def grpo_loss_grads_metrics(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def compare_grpo(model_dir, tmp_path, fused_linear=False, extra_inputs=None, **options):
    theirs = make_grpo(trl.GRPOTrainer, model_dir, tmp_path, **options)
    inputs = grpo_inputs(theirs)
    inputs.update(extra_inputs(inputs) if extra_inputs else {})
    ours = make_grpo(trl_dropin.GRPOTrainer, model_dir, tmp_path, use_fused_linear=fused_linear, **options)
    expected = grpo_loss_grads_metrics(theirs, inputs)
    got = grpo_loss_grads_metrics(ours, inputs)
    # (a random tiny model rarely samples EOS: with mask_truncated_completions every completion may be masked)
    assert float(expected[1].norm()) > 0 or options.get("mask_truncated_completions")
    assert_same_as_trl(got, expected)
    return got


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused-linear"])
def test_every_grpo_loss_type_equals_trl(loss_type, fused_linear, model_dir, tmp_path):
    loss, _, metrics = compare_grpo(model_dir, tmp_path, fused_linear, loss_type=loss_type)
    assert metrics["kl"] > 0 and loss != 0


@pytest.mark.parametrize("options", [
    {"importance_sampling_level": "sequence"},
    {"importance_sampling_level": "sequence", "loss_type": "grpo"},
    {"epsilon_high": 0.28},
    {"delta": 1.5},
    {"use_bias_correction_kl": False},
    {"top_entropy_quantile": 0.5},
    {"entropy_coef": 0.05},
    {"entropy_coef": 0.05, "top_entropy_quantile": 0.4, "loss_type": "bnpo"},
    {"mask_truncated_completions": True, "max_completion_length": 4},
    {"temperature": 0.7},
    {"beta": 0.0, "loss_type": "dr_grpo"},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused-linear"])
def test_grpo_options_equal_trl(options, fused_linear, model_dir, tmp_path):
    compare_grpo(model_dir, tmp_path, fused_linear, **options)


def test_grpo_off_policy_mask_with_sampling_logps_equals_trl(model_dir, tmp_path):
    """An inference engine's sampling log-probs (what vLLM returns) drive TRL's off-policy mask, unchanged."""
    def sampling(inputs):
        generator = torch.Generator().manual_seed(3)
        noise = 0.5 * torch.randn(inputs["completion_mask"].shape, generator=generator)
        return {"sampling_per_token_logps": inputs["old_per_token_logps"] + noise}
    compare_grpo(model_dir, tmp_path, off_policy_mask_threshold=0.2, extra_inputs=sampling)


def test_grpo_training_runs_and_refuses_fp32_head_cast(model_dir, tmp_path):
    trainer = make_grpo(trl_dropin.GRPOTrainer, model_dir, tmp_path, max_steps=2)
    trainer.train()
    assert [e for e in trainer.state.log_history if "loss" in e]
    with pytest.raises(ValueError, match="cast_lm_head_to_fp32"):
        make_grpo(trl_dropin.GRPOTrainer, model_dir, tmp_path, cast_lm_head_to_fp32=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        make_grpo(trl_dropin.GRPOTrainer, model_dir, tmp_path, backend="fast")
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None, got -1"):
        make_grpo(trl_dropin.GRPOTrainer, model_dir, tmp_path, use_fused_linear=True, chunk_size=-1)


@pytest.mark.parametrize("loss_type", rk.GRPO_LOSS_TYPES)
def test_grpo_loss_conventions_equal_trls(loss_type, model_dir, tmp_path):
    """rk.grpo_loss with TRL's conventions (num_items_in_batch over the generation batch, dr_grpo's
    max_completion_length, use_bias_correction_kl=True, TRL's default) equals TRL's own GRPO loss on its inputs."""
    trainer = make_grpo(trl.GRPOTrainer, model_dir, tmp_path, loss_type=loss_type, epsilon_high=0.28)
    inputs = grpo_inputs(trainer)
    trainer.model.train()
    expected = trainer.compute_loss(trainer.model, dict(inputs))
    prompt = inputs["prompt_ids"].shape[1]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logits = type(trainer.model).forward(trainer.model, input_ids=ids, attention_mask=mask).logits
    labels = inputs["completion_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    ours = rk.grpo_loss(logits[:, prompt - 1:-1], labels, inputs["advantages"],
                        old_logps=inputs["old_per_token_logps"], ref_logps=inputs["ref_per_token_logps"],
                        epsilon=0.2, epsilon_high=0.28, beta_kl=0.1, loss_type=loss_type,
                        num_items_in_batch=inputs["num_items_in_batch"], max_completion_length=6,
                        use_bias_correction_kl=True)
    torch.testing.assert_close(ours.loss, expected.detach(), rtol=1e-5, atol=1e-7)


# Vision-language models: TRL's vision collators and model inputs (pixel_values, image_grid_thw, ...) pass through the
# fused head unchanged. Families whose tiny processors carry a chat template (TRL needs one for these datasets).
VLM_FAMILIES = ["qwen2-vl", "gemma3", "idefics3", "internvl"]


def vlm_rows(images=1):
    """Four preference rows in TRL's conversational vision layout, `images` images each (of two sizes)."""
    from PIL import Image
    rows = []
    for i, shape in enumerate(["circle", "square", "triangle", "circle"]):
        user = [{"type": "image"}] * images + [{"type": "text", "text": "what do you see ?"}]
        rows.append({"images": [Image.new("RGB", (32 * (1 + k % 2), 32), (40 * i, 100, 50 * k))
                                for k in range(images)],
                     "prompt": [{"role": "user", "content": user}],
                     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"a red {shape}"}]}],
                     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"a blue {shape}"}]}]})
    return rows


@pytest.mark.parametrize("family", VLM_FAMILIES)
@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused-linear"])
def test_vision_language_dpo_equals_trl(family, fused_linear, tmp_path):
    from rlhfv_train.models.tiny_families import build_family

    def make(cls, **kwargs):
        processor, model = build_family(family, seed=0)
        return cls(model=model, ref_model=copy.deepcopy(model), args=dpo_config(tmp_path, max_length=None),
                   train_dataset=datasets.Dataset.from_list(vlm_rows()), processing_class=processor, **kwargs)

    theirs = make(trl.DPOTrainer)
    batch = theirs.data_collator([theirs.train_dataset[i] for i in range(2)])
    assert "pixel_values" in batch
    assert_same_as_trl(loss_grads_metrics(make(DPOTrainer, use_fused_linear=fused_linear)),
                       loss_grads_metrics(theirs))


def text_only_beside(rows):
    """Every second row without its images (a text-only prompt)."""
    for row in rows[1::2]:
        row["images"] = []
        row["prompt"] = [{"role": "user", "content": [{"type": "text", "text": "what do you see ?"}]}]
    return rows


@pytest.mark.parametrize("layout", ["two images", "text-only beside"])
@pytest.mark.parametrize("family", ["qwen2-vl", "internvl"])
def test_several_images_per_row_dpo_equals_trl(family, layout, tmp_path):
    """Two images of different sizes per row, or rows of one image beside text-only rows, TRL's collator: the
    drop-in's padded and padding-free (packed) runs give TRL's numbers (packed: each sequence's patches or tiles go
    with it, none with a text-only one)."""
    from rlhfv_train.models.tiny_families import build_family
    rows = vlm_rows(images=2) if layout == "two images" else text_only_beside(vlm_rows())

    def make(cls, **kwargs):
        processor, model = build_family(family, seed=0)
        return cls(model=model, ref_model=copy.deepcopy(model), args=dpo_config(tmp_path, max_length=None, **kwargs),
                   train_dataset=datasets.Dataset.from_list(rows), processing_class=processor)

    expected = loss_grads_metrics(make(trl.DPOTrainer), rows=(0, 1, 2))
    assert_same_as_trl(loss_grads_metrics(make(DPOTrainer), rows=(0, 1, 2)), expected)
    assert_same_as_trl(loss_grads_metrics(make(DPOTrainer, padding_free=True), rows=(0, 1, 2)), expected)


@pytest.mark.parametrize("max_tokens_per_row", [4096, 8], ids=["one-row", "row-per-sequence"])
@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused-linear"])
def test_padding_free_dpo_equals_trls_padded(fused_linear, max_tokens_per_row, tmp_path):
    """DPOConfig(padding_free=True), which TRL 1.16 turns off, runs packed through the drop-in with TRL's numbers."""
    theirs = loss_grads_metrics(make_dpo(trl.DPOTrainer, tmp_path), rows=(0, 1, 2))
    trainer = make_dpo(DPOTrainer, tmp_path, padding_free=True, use_fused_linear=fused_linear,
                       max_tokens_per_row=max_tokens_per_row)
    assert trainer.args.padding_free and trainer.rlhfv_options.max_tokens_per_row == max_tokens_per_row
    assert_same_as_trl(loss_grads_metrics(trainer, rows=(0, 1, 2)), theirs)
    assert trainer.model._rlhfv_packing_checked


@pytest.mark.parametrize("family", ["qwen2-vl", "gemma3", "internvl"])
def test_padding_free_vision_language_dpo(family, tmp_path):
    """Qwen2-VL (left-padded prompts, mRoPE) and InternVL (5 tiles per image) packed give TRL's numbers; Gemma 3 is
    refused by name."""
    from rlhfv_train.models import UnsupportedModelError
    from rlhfv_train.models.tiny_families import build_family

    def make(cls, **kwargs):
        processor, model = build_family(family, seed=0)
        return cls(model=model, ref_model=copy.deepcopy(model), args=dpo_config(tmp_path, max_length=None, **kwargs),
                   train_dataset=datasets.Dataset.from_list(vlm_rows()), processing_class=processor)

    ours = make(DPOTrainer, padding_free=True)
    if family == "gemma3":
        with pytest.raises(UnsupportedModelError, match="Train without packing"):
            loss_grads_metrics(ours)
        return
    assert_same_as_trl(loss_grads_metrics(ours, rows=(0, 1, 2)), loss_grads_metrics(make(trl.DPOTrainer),
                                                                                   rows=(0, 1, 2)))


@pytest.mark.parametrize("family", ["qwen2-vl", "internvl"])
@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused-linear"])
@pytest.mark.parametrize("images", [[1, 1, 1, 1], [2, 1, 1, 2]], ids=["one image", "two or one images"])
def test_vision_language_grpo_equals_trl(family, fused_linear, images, tmp_path):
    """Qwen2-VL and InternVL (5 or 9 tiles per image): TRL generates from image prompts once; pixel_values (and
    image_grid_thw) reach both heads, one image per row or several of two sizes. (TRL 1.16's own GRPOTrainer fails
    on a text-only row beside image rows, in _prepare_inputs: not tested here.)"""
    from PIL import Image
    from rlhfv_train.models.tiny_families import build_family
    processor, model = build_family(family, seed=0)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    rows = []
    for i, n in enumerate(images):
        user = [{"type": "image"}] * n + [{"type": "text", "text": "what do you see ?"}]
        rows.append({"images": [Image.new("RGB", (32 * (1 + k % 2), 32), (40 * i, 100, 50 * k)) for k in range(n)],
                     "prompt": [{"role": "user", "content": user}]})

    def make(cls, **kwargs):
        config = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                                max_completion_length=6, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                                max_steps=1, seed=0, beta=0.1)
        trainer = cls(model=str(tmp_path / "model"), reward_funcs=[reward_length], args=config,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=processor, **kwargs)
        trainer.current_gradient_accumulation_steps = 1
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        return trainer

    theirs = make(trl.GRPOTrainer)
    inputs = grpo_inputs(theirs)
    assert "pixel_values" in inputs and ("image_grid_thw" in inputs) == (family == "qwen2-vl")
    if family == "internvl":  # the tiles of every sequence's images, flat: 5 at 32 x 32, 9 at 64 x 32
        tiles = {1: 5, 2: 14}
        assert inputs["pixel_values"].shape[0] == sum(tiles[n] for n in inputs["num_images"])
    expected = grpo_loss_grads_metrics(theirs, inputs)
    assert_same_as_trl(grpo_loss_grads_metrics(make(trl_dropin.GRPOTrainer, use_fused_linear=fused_linear), inputs),
                       expected)


@pytest.mark.parametrize("loss_type", ["dapo", "vespo"])
def test_grpo_vllm_importance_sampling_correction_equals_trl(loss_type, model_dir, tmp_path):
    """vLLM's truncated importance-sampling ratios (the inference engine's vs the trainer's log-probs) enter TRL's
    loss unchanged: with transformers generation the ratios are handed in as vLLM would produce them, and both
    trainers are told they came from vLLM (TRL applies them only then)."""
    def with_ratio(inputs):
        generator = torch.Generator().manual_seed(4)
        ratio = torch.exp(0.2 * torch.randn(inputs["completion_mask"].shape, generator=generator)).clamp(max=2.0)
        return {"importance_sampling_ratio": ratio}

    theirs = make_grpo(trl.GRPOTrainer, model_dir, tmp_path, loss_type=loss_type)
    inputs = grpo_inputs(theirs)
    plain = grpo_loss_grads_metrics(theirs, inputs)
    inputs.update(with_ratio(inputs))
    ours = make_grpo(trl_dropin.GRPOTrainer, model_dir, tmp_path, loss_type=loss_type)
    for trainer in (theirs, ours):
        trainer.use_vllm = True  # (only the loss reads it here: generation is done)
    expected = grpo_loss_grads_metrics(theirs, inputs)
    assert not torch.allclose(expected[0], plain[0])  # the ratios took effect
    assert_same_as_trl(grpo_loss_grads_metrics(ours, inputs), expected)

"""rlhfv_train.trl_dropin.DDPOTrainer: TRL's DPOTrainer with the fused DDPO loss (runs where TRL is installed)."""
import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import rlhfv_kernels as rk  # noqa: E402
from rlhfv_train.models import tiny  # noqa: E402
from rlhfv_train.trl_dropin import DDPOTrainer, completion_token_weights  # noqa: E402


def tiny_lm(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id))


def make_trainer(tmp_path, **kwargs):
    tokenizer = tiny.build_tokenizer()
    model = tiny_lm(tokenizer)
    rows = [{"prompt": "what do you see ?", "chosen": f"a red {s} on the left", "rejected": f"a blue {s} on the left"}
            for s in ("circle", "square", "triangle", "circle")]
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                         report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                         precompute_ref_log_probs=False, beta=0.5)
    trainer = DDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer, **kwargs)
    return trainer, tokenizer


def test_completion_token_weights_mark_the_replaced_token():
    ids = torch.tensor([[9, 9, 1, 2, 3, 4, 0], [9, 9, 1, 2, 5, 4, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 0]])
    w = completion_token_weights(ids, mask, 5.0, min_match=1)
    assert w.tolist() == [[0, 0, 1, 1, 5, 1, 0], [0, 0, 1, 1, 5, 1, 0]]


def test_loss_is_ddpo_on_the_batch_and_training_runs(tmp_path):
    trainer, _ = make_trainer(tmp_path, gamma=5.0, ddpo_mode="mean")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert "token_weights" in batch and batch["token_weights"].max() == 5.0
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    # Independent check: the eager reference on the same logits, targets and weights.
    targets, weights = trainer._targets(batch)
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = trainer.model(**kwargs).logits
        ref = rk.reference.sequence_logps(trainer.ref_model(**kwargs).logits, targets, weights, mode="mean")
        expected = rk.reference.ddpo_loss(logits, targets, ref, token_weights=weights, beta=0.5, mode="mean").loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
    assert len(logged) == 3 and all("loss" in entry for entry in logged)


def test_refuses_precomputed_unweighted_reference(tmp_path):
    tokenizer = tiny.build_tokenizer()
    model = tiny_lm(tokenizer)
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                         precompute_ref_log_probs=True)
    rows = [{"prompt": "what ?", "chosen": "a red circle", "rejected": "a blue circle"}] * 2
    with pytest.raises(ValueError, match="precompute_ref_log_probs=False"):
        DDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                    train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)

"""A drop-in for TRL's DPOTrainer that trains with rlhfv's fused Dense DPO loss.

    from rlhfv_train.trl_dropin import DDPOTrainer
    trainer = DDPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(..., precompute_ref_log_probs=False),
                          train_dataset=dataset, processing_class=tokenizer, gamma=5.0, ddpo_mode="mean")
    trainer.train()

Everything else is TRL's: datasets, collation, accelerate, logging. The differences:
- the collator adds `token_weights` [2B, T] to every batch: gamma on the tokens an annotator replaced (the token-id
  diff of each pair's two completions, rlhfv_train.data.weights.correction_weights), 1 on other completion tokens;
- the loss is rlhfv_kernels.ddpo_loss on the policy logits (fused, no log_softmax materialized, in-place backward),
  and the reference scores use the same weights and sum/mean mode, from the reference model's logits;
- TRL's loss options (loss_type, f-divergences, precomputed unweighted reference log-probs) do not apply.
Written against TRL 1.16's DPOTrainer internals (`_compute_loss`, `_metrics`); other TRL versions may need changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from trl import DPOTrainer

import rlhfv_kernels as rk

from .data.weights import correction_weights

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "token_weights", "reward_margin"}


def completion_token_weights(input_ids: torch.Tensor, completion_mask: torch.Tensor, gamma: float,
                             min_match: int = 3) -> torch.Tensor:
    """[2B, T] weights aligned with input_ids: correction weights on completion tokens, 0 elsewhere."""
    weights = torch.zeros(input_ids.shape, dtype=torch.float32)
    pairs = input_ids.shape[0] // 2
    mask = completion_mask.bool().cpu()
    ids = input_ids.cpu()
    for i in range(pairs):
        rows = (i, pairs + i)
        positions = [mask[r].nonzero().squeeze(-1) for r in rows]
        completions = [ids[r, p].tolist() for r, p in zip(rows, positions)]
        for r, p, w in zip(rows, positions, correction_weights(completions[0], completions[1], gamma, min_match)):
            weights[r, p] = torch.tensor(w, dtype=torch.float32)
    return weights.to(input_ids.device)


class WeightedPreferenceCollator:
    """TRL's preference collator plus the `token_weights` of each pair."""

    def __init__(self, base, gamma: float, min_match: int = 3):
        self.base, self.gamma, self.min_match = base, gamma, min_match

    def __call__(self, examples):
        batch = self.base(examples)
        batch["token_weights"] = completion_token_weights(batch["input_ids"], batch["completion_mask"], self.gamma,
                                                          self.min_match)
        return batch


class DDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with the loss replaced by rlhfv's fused DDPO (see the module docstring)."""

    def __init__(self, *args, gamma: float = 5.0, ddpo_mode: str = "mean", min_match: int = 3,
                 drs_weight: float = 0.0, drs_k: float = 1.0, sft_weight: float = 0.0,
                 inplace_backward: bool = True, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.precompute_ref_logps:
            raise ValueError("DDPOTrainer needs precompute_ref_log_probs=False: TRL precomputes unweighted sums, while "
                             "DDPO scores the reference with the same token weights and mode as the policy")
        if self.ref_model is None:
            raise ValueError("DDPOTrainer needs a reference model (PEFT adapters without one are not supported yet)")
        if ddpo_mode not in ("sum", "mean"):
            raise ValueError(f"ddpo_mode must be 'sum' or 'mean', got {ddpo_mode!r}")
        self.ddpo_mode, self.drs_weight, self.drs_k, self.sft_weight = ddpo_mode, drs_weight, drs_k, sft_weight
        self.inplace_backward, self.rlhfv_backend = inplace_backward, backend
        self.data_collator = WeightedPreferenceCollator(self.data_collator, gamma, min_match)

    def _targets(self, inputs):
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        # Shift the labels, not the logits (slicing logits would cost an N x V gradient copy in backward).
        return F.pad(labels[:, 1:], (0, 1), value=-100), F.pad(inputs["token_weights"][:, 1:], (0, 1))

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        targets, weights = self._targets(inputs)
        with torch.no_grad():
            ref_logits = self.ref_model(**model_kwargs).logits
            ref = rk.sequence_logps(ref_logits, targets, weights, mode=self.ddpo_mode, backend=self.rlhfv_backend)
            del ref_logits
        outputs = model(**model_kwargs)
        out = rk.ddpo_loss(outputs.logits, targets, ref, token_weights=weights, beta=self.beta, mode=self.ddpo_mode,
                           reward_margin=inputs.get("reward_margin"), drs_weight=self.drs_weight, drs_k=self.drs_k,
                           sft_weight=self.sft_weight, inplace_backward=self.inplace_backward and model.training,
                           backend=self.rlhfv_backend)
        gather = self.accelerator.gather
        for key, value in (("rewards/chosen", out.chosen_rewards), ("rewards/rejected", out.rejected_rewards),
                           ("rewards/margins", out.margins), ("rewards/accuracies", (out.margins > 0).float()),
                           ("logps/chosen", out.chosen_logps), ("logps/rejected", out.rejected_logps)):
            self._metrics[mode][key].append(gather(value).mean().item())
        return (out.loss, outputs) if return_outputs else out.loss

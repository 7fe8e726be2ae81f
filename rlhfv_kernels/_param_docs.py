"""Each public parameter's documentation, written once and stamped on every function that takes it: api.X (logits),
linear.linear_X (hidden states and the lm_head) and reference.X (the eager oracle) are three writings of one function,
and their shared parameters mean the same (tests/kernels/test_signatures.py checks names, defaults and order; this
module keeps the words alike). A parameter whose meaning depends on the function is documented per function."""
from __future__ import annotations

import inspect
import textwrap

SHARED = {
    "logits": "[..., V] bf16 / fp16 / fp32 (fp64: computed in fp64), any leading shape, strided views read in place.",
    "hidden": "[..., H] the last hidden states (the lm_head's input), any float dtype the weight has.",
    "weight": "[V, H] the lm_head's weight.",
    "bias": "[V] the lm_head's bias, or None.",
    "labels": "[...] the target token of each position (the input's leading shape), int64 or int32; ignore_index "
              "marks tokens that do not count (prompt, image, padding).",
    "ignore_index": "the label value of tokens that do not count: log-prob 0, no gradient, no weight.",
    "temperature": "the log-probs are those of softmax(z / temperature) (> 0).",
    "softcap": "the model's final soft cap: z = softcap * tanh(logit_scale * x / softcap) (Gemma 2: 30); None: no cap. "
               "Pass the model's where the logits are the raw head output (always on the fused-linear route); a "
               "Hugging Face model's own `.logits` already include it.",
    "logit_scale": "the model's final logit scale (Cohere, Granite): z = logit_scale * x before the cap.",
    "inplace_backward": "write the gradient into the logits' own storage in backward (their values are garbage "
                        "after it): the step's extra memory drops to O(N).",
    "backend": "\"cpp\" / \"triton\" / \"cuda\" / \"eager\", or None: the default for the input's device "
               "(rlhfv_kernels/_backend.py).",
    "return_entropy": "also return each token's entropy -sum_v p_v log p_v (0 where ignored), from the same pass, "
                      "differentiable.",
    "token_weights": "[B, T] per-token weights w_t of the sequence scores (DDPO's γ on corrected tokens, 1 elsewhere); "
                     "None: every token 1.",
    "mode": "\"sum\": S = sum_t w_t logp_t; \"mean\": that divided by sum_t w_t (0 for a row with no weight).",
    "beta": "the DPO temperature β of the implicit reward β (S - S_ref).",
    "reward_margin": "[B] MM-DPO's per-pair reward margin δ_i (with drs_weight > 0); None: no dynamic scaling.",
    "drs_weight": "MM-DPO's dynamic reward scaling weight w: β_i = β (1 + w (1 - exp(-k δ_i))), at least 1e-3; 0: off.",
    "drs_k": "MM-DPO's k in the dynamic reward scaling.",
    "sft_weight": "the weight of an SFT term added to the loss: the chosen answers' token-mean negative "
                  "log-likelihood (>= 0; 0: none).",
    "advantages": "[B] each rollout's advantage.",
    "old_logps": "[B, T] the sampling policy's per-token log-probs (the ratio's denominator); None: this policy's, "
                 "detached (ratio 1).",
    "epsilon": "the ratio's lower clip, 1 - epsilon.",
    "epsilon_high": "the ratio's upper clip, 1 + epsilon_high (DAPO's clip-higher); None: epsilon.",
    "beta_kl": "the weight of the k3 KL penalty to ref_logps; 0: no KL term.",
    "loss_type": "how token losses are averaged: \"grpo\" (per sequence, then over sequences), \"bnpo\" (over the "
                 "batch's tokens), \"dr_grpo\" (over B * max_completion_length), \"dapo\" (over num_items_in_batch "
                 "tokens across processes); TRL's and Liger's conventions.",
    "num_items_in_batch": "dapo: the loss tokens of the whole batch over every process (TRL's); None: this call's.",
    "max_completion_length": "dr_grpo's constant divisor per sequence; None: the width T.",
    "use_bias_correction_kl": "multiply the k3 term by the importance ratio (TRL's default).",
    "world_size": "dapo: the processes num_items_in_batch counts over; None: torch.distributed's.",
    "batch_rows": "the whole batch's row count when this call scores a micro-batch of it (the grpo and dr_grpo "
                  "divisor): the loss is then this part's exact share; None: this call's rows.",
    "batch_tokens": "the whole batch's loss-token count when this call scores a micro-batch of it (the bnpo divisor, "
                    "and dapo's without num_items_in_batch); None: this call's.",
    "cu_seqlens": "packed sequences: [S + 1] offsets of the sequences in one stream of tokens (flash-attention "
                  "varlen's; a list costs no host sync). Results are those of the sequences padded into rows.",
    "position_ids": "packed sequences: labels-shaped positions restarting at 0 per sequence (transformers' packing "
                    "collators), instead of cu_seqlens.",
    "max_seqlen": "packed sequences: the width of the padded rows they stand for (>= the longest); None: the longest.",
    "pairs": "packed sequences: [B, 2] (chosen, rejected) sequence indices; None: the first half are the chosen.",
    "low_rank": "(u, B): a LoRA adapter on the head, logits + u @ B.T with u [..., r] = scaling * lora_A(hidden) "
                "and B [V, r]; None: none.",
    "chunk_size": "tokens per chunk of recomputed logits (a hard bound); None: chunks of up to a fixed memory budget.",
}

PER_FUNCTION = {
    "ref_logps": {
        "ddpo_loss": "[2B] the reference model's sequence scores, scored as these are (same weights and mode).",
        "dpo_loss": "[2B] the reference model's summed sequence log-probs.",
        "grpo_loss": "[B, T] the reference model's per-token log-probs, for the KL term (beta_kl > 0); None: no KL.",
    },
}

REFERENCE = {  # the oracle takes the kernels' options so that it can stand in for them; these two change nothing
    "inplace_backward": "accepted for signature compatibility; no effect here.",
    "backend": "None, \"eager\" or \"reference\" (this is the eager oracle); anything else is refused.",
}


def stamp(function):
    """Appends a "Parameters" section to `function`'s docstring from SHARED / PER_FUNCTION (REFERENCE for the
    oracle's). A parameter without a doc raises here, at import: a new option cannot go undocumented."""
    name = function.__name__.removeprefix("linear_")
    oracle = function.__module__.endswith(".reference")
    lines = []
    for param in inspect.signature(function).parameters:
        if oracle and param in REFERENCE:
            text = REFERENCE[param]
        elif param in PER_FUNCTION:
            text = PER_FUNCTION[param][name]
        elif param in SHARED:
            text = SHARED[param]
        else:
            raise KeyError(f"{function.__module__}.{function.__name__}: parameter {param!r} has no doc in "
                           "rlhfv_kernels/_param_docs.py")
        lines += textwrap.wrap(f"{param}: {text}", 116, initial_indent="    ", subsequent_indent="        ")
    function.__doc__ = (inspect.cleandoc(function.__doc__ or "") + "\n\nParameters:\n" + "\n".join(lines) + "\n")
    return function

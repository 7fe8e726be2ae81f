"""The losses, one module each: output type, argument checks and the math on per-token log-probs (DESIGN.md §2).

    sequence.py   sequence scores (sum / mean of weighted token log-probs)
    ddpo.py       Dense DPO, vanilla DPO, MM-DPO dynamic reward scaling
    grpo.py       GRPO-style grouped policy loss (grpo, bnpo, dr_grpo, dapo)

Each module's compute(source, ...) takes a log-prob source (rlhfv_kernels/_sources.py: logits, or hidden states and
the lm_head weight), so one definition serves both public families (api.py and linear.py are thin wrappers).
The math never sees an N x V tensor and is shared by every backend; autograd through it yields the per-token
coefficient c_t of the two-pass scheme. How to add a loss: DESIGN.md §3 ("Adding a loss").
"""
from .ddpo import DRS_MIN_BETA, DDPOOutput, ddpo_from_token_logps, drs_beta
from .grpo import GRPOOutput, grpo_from_token_logps
from .sequence import sequence_scores

__all__ = ["DRS_MIN_BETA", "DDPOOutput", "GRPOOutput", "ddpo_from_token_logps", "drs_beta", "grpo_from_token_logps",
           "sequence_scores"]

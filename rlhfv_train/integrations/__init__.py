"""Drop-ins for other trainers: TRL's DPO, DDPO and GRPO trainers on rlhfv's fused kernels (trl.py; imports TRL)."""

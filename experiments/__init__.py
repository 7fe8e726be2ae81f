"""Experiment drivers on top of the library (run from a clone's root): `python -m experiments.ablation` (DPO vs DDPO
vs MM-DPO on the tiny model) and `python -m experiments.grpo_sweep` (GRPO's group size k)."""

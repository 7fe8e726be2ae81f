"""rlhfv_train: a compact DDPO trainer for vision-language models on top of rlhfv_kernels (work in progress:
segment weights from corrections are in place; data, model, loop and CLI follow)."""

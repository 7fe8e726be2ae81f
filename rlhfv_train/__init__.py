"""rlhfv_train: compact trainers for Hugging Face vision-language models on rlhfv_kernels' fused losses.

    python -m rlhfv_train          # DDPO: the embedded tiny LLaVA on the synthetic scenes, on CPU, in minutes
    python -m rlhfv_train.grpo     # online GRPO with grouped comparison, same data and model
    python -m rlhfv_train.eval     # the hallucination metric of a run or a model folder

    rlhfv_train/
      data/          records and their formats, token weights, prompts, collation, packing, the synthetic scenes
      models/        loading, the fused-linear adapter, the one scoring helper (scoring.py), LoRA, tiny families
      run/           what both trainers share: config and flags, the training loop, SFT stage, schedule,
                     checkpoints, processes, plots, command-line conventions
      eval/          generation and the hallucination metric
      ddpo/          the DDPO trainer (config, trainer, reference scores, cli)
      grpo/          the GRPO trainer (config, trainer, rollouts, rewards, cli)
      integrations/  the TRL drop-ins (trl.py)

Imports point one way: data <- models <- run <- eval <- ddpo / grpo; integrations use data and models only.
"""

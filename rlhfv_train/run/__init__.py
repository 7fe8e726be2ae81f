"""What both trainers share: their common options (config.py) and the flags made from them (flags.py), the training
loop (loop.py: setup, cadence of evaluation / metrics / checkpoints, resume, summary), the SFT stage (sft.py), the
learning-rate schedule (schedule.py), checkpoints (checkpoint.py), processes (distributed.py), plots (plots.py) and the
command-line conventions (cli.py)."""

"""python -m rlhfv_train: the DDPO trainer's command line (ddpo/cli.py; `--help` for every option)."""
import sys

from .ddpo.cli import main

if __name__ == "__main__":
    sys.exit(main())

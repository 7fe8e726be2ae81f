"""Launching a test's processes under torchrun: a free rendezvous port (--standalone), so two suites on one machine
(a CI run beside a developer's) never join each other's process groups; one thread per process; and on a timeout the
launch is stopped with its workers, not only the launcher (the workers would otherwise live on, waiting on peers)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys


def run_under_torchrun(args: list[str], *, nproc: int = 2, timeout: float = 600, env: dict | None = None,
                       cwd: str | None = None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node nproc *args`, output captured as text."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        stdout, stderr = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in its own session, so only torchrun can stop them all: on SIGTERM it
        # terminates its workers (SIGKILL after its grace period) and exits.
        launcher.send_signal(signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=120)
        raise AssertionError(f"torchrun {' '.join(args)} ran past {timeout} s; stopped. stderr:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)

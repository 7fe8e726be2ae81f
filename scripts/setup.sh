#!/usr/bin/env bash
# Sets up .venv for rlhfv on a fresh machine: pinned CPU torch, the project's dependencies, and the compiled
# extension built in place (pip install --no-build-isolation -e .). Safe to run again: it only adds what is missing
# and rebuilds the extension.   PYTHON=python3.11 bash scripts/setup.sh   picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${RLHFV_TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
echo "setup: installing $TORCH_SPEC and requirements.txt"
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
echo "setup: building the extension rlhfv_kernels._C"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e .
.venv/bin/python -c "import rlhfv_kernels as rk; assert rk.extension_available(), 'extension failed to import'; print('setup: ok, rlhfv', rk.__version__)"

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
# The newest triton, beside the pinned one, only for tests/test_triton_aot.py (compile checks for sm_80/sm_90).
TRITON_LATEST=${RLHFV_TRITON_LATEST:-3.9.0}
if [ ! -f ".venv/triton-latest/triton-$TRITON_LATEST.dist-info/METADATA" ]; then
  echo "setup: installing triton $TRITON_LATEST into .venv/triton-latest (ahead-of-time GPU checks)"
  rm -rf .venv/triton-latest
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target .venv/triton-latest \
    "triton==$TRITON_LATEST"
fi
echo "setup: building the extension rlhfv_kernels._C"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e .
.venv/bin/python -c "import rlhfv_kernels as rk; assert rk.extension_available(), 'extension failed to import'; print('setup: ok, rlhfv', rk.__version__)"

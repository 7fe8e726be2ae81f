#!/usr/bin/env bash
# Sets up .venv for rlhfv on a fresh machine: pinned CPU torch, the project's dependencies, and the compiled
# extension built in place (pip install --no-build-isolation -e .). Safe to run again: it only adds what is missing
# and rebuilds the extension when its sources changed.   PYTHON=python3.11 bash scripts/setup.sh   picks the interpreter.
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
# Rebuild only when a C++/CUDA source or the build files changed since the last build (RLHFV_REBUILD=1 forces it).
built=$(ls rlhfv_kernels/_C*.so 2>/dev/null | head -1 || true)
if [ -z "${RLHFV_REBUILD:-}" ] && [ -n "$built" ] && [ -z "$(find csrc setup.py CMakeLists.txt -newer "$built" | head -1)" ] \
   && .venv/bin/python -m pip show -q rlhfv >/dev/null 2>&1; then
  echo "setup: extension up to date ($built); RLHFV_REBUILD=1 forces a rebuild"
else
  echo "setup: building the extension rlhfv_kernels._C"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e .
fi
.venv/bin/python -c "import rlhfv_kernels as rk; assert rk.extension_available(), 'extension failed to import'; print('setup: ok, rlhfv', rk.__version__)"

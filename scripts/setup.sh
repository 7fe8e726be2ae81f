#!/usr/bin/env bash
# Sets up .venv for rlhfv on a fresh machine: pinned torch (the CPU or the CUDA build, chosen explicitly), the
# project's dependencies, and the compiled extension built in place (pip install --no-build-isolation -e .). Safe to
# run again: it only adds what is missing and rebuilds the extension when its sources changed.
#   RLHFV_DEVICE=cpu|cuda   the torch build (default: cuda when nvidia-smi lists a GPU, else cpu)
#   PYTHON=python3.11       the interpreter;   RLHFV_TORCH_SPEC=...  another torch requirement altogether
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${RLHFV_DEVICE:-auto}
if [ "$DEVICE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    DEVICE=cuda
  else
    DEVICE=cpu
  fi
fi
case "$DEVICE" in
  cpu|cuda) ;;
  *) echo "setup: RLHFV_DEVICE must be cpu, cuda or auto, got '$DEVICE'" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
bash scripts/install_torch.sh .venv/bin/python "$DEVICE"  # RLHFV_DEVICE=cpu|cuda chooses the build
echo "setup: installing requirements.txt"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
# The newest triton, beside the pinned one, only for tests/build/test_triton_aot.py (compile checks for sm_80/sm_90).
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

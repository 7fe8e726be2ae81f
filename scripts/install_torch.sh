#!/usr/bin/env bash
# Installs torch 2.13.0, in the build asked for, into the environment of a Python, and checks it got that build:
#   bash scripts/install_torch.sh PYTHON cpu|cuda
# cpu: torch==2.13.0+cpu from a local wheel / mirror if one has it, else from PyTorch's CPU index. cuda: PyPI's default
# Linux wheel (the CUDA build, with several GB of CUDA libraries). RLHFV_TORCH_SPEC replaces the requirement.
# Does nothing when that torch is already there. Used by scripts/setup.sh and scripts/check_pip_install.sh.
set -euo pipefail
PY=$1
DEVICE=$2
TORCH_VERSION=2.13.0
case "$DEVICE" in
  cpu)  SPEC=${RLHFV_TORCH_SPEC:-torch==$TORCH_VERSION+cpu}; INDEX=https://download.pytorch.org/whl/cpu ;;
  cuda) SPEC=${RLHFV_TORCH_SPEC:-torch==$TORCH_VERSION}; INDEX= ;;
  *) echo "install_torch: the build must be cpu or cuda, got '$DEVICE'" >&2; exit 2 ;;
esac
torch_is_right() {  # the installed torch satisfies SPEC and is the build asked for
  "$PY" - "$SPEC" "$DEVICE" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
import torch
spec, device = sys.argv[1:]
pin, have = spec.partition("==")[2].strip(), version("torch")  # a spec without == accepts the installed torch
ok = not pin or have == pin or ("+" not in pin and have.split("+")[0] == pin)
sys.exit(0 if ok and (torch.version.cuda is None) == (device == "cpu") else 1)
PY
}
if torch_is_right; then
  echo "install_torch: torch $("$PY" -c 'import torch; print(torch.__version__)') ($DEVICE build) already installed"
  exit 0
fi
echo "install_torch: installing $SPEC (the $DEVICE build of torch)"
"$PY" -m pip install -q --disable-pip-version-check "$SPEC" 2>/dev/null \
  || "$PY" -m pip install -q --disable-pip-version-check ${INDEX:+--extra-index-url "$INDEX"} "$SPEC"
torch_is_right || { echo "install_torch: the installed torch is not the $DEVICE build of $SPEC" >&2; exit 1; }

#!/usr/bin/env bash
# The project on the GPU machine's versions, on this CPU machine, before a lease is spent finding a mismatch:
#
#   bash scripts/gpu_versions_check.sh [WORKDIR]        (default /tmp/rlhfv-gpu-versions; ~3 GB, 30-60 min on 2 cores)
#
# A venv in WORKDIR/venv with Python 3.12 and the GPU image's packages that matter here (device README, KINDS.md:
# torch 2.11.0 — the CUDA wheel, which runs on CPU — torchvision 0.26.0, triton 3.6.0, transformers 5.17.0, peft,
# pillow, pyarrow, matplotlib; no TRL, datasets, num2words, Liger or cut-cross-entropy there), a clone of HEAD in
# WORKDIR/repo built against it (with its CUDA kernels for sm_90a when a CUDA toolkit with headers is here), then:
#   aot    tests/gpu_verify/triton_aot.py for sm_80 and sm_90 with triton 3.6.0   -> WORKDIR/aot.json, aot.log
#   tests  the CPU suite                                                           -> WORKDIR/tests.log
# Not in CI (the download and the time); DESIGN.md §5 records what it last showed. Exit status 1 if a step failed.
#   PYTHON312=python3.12   the interpreter of the venv;   RLHFV_VERSIONS="torch==2.11.0 ..."   other pins
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/rlhfv-gpu-versions}
PYTHON312=${PYTHON312:-python3.12}
VERSIONS=${RLHFV_VERSIONS:-torch==2.11.0 torchvision==0.26.0 triton==3.6.0 transformers==5.17.0}
OTHERS="numpy pytest ninja setuptools wheel tqdm pillow pyarrow matplotlib peft"
mkdir -p "$WORK"
VENV=$WORK/venv
PY=$VENV/bin/python
FAILED=0

if [ ! -x "$PY" ]; then
  "$PYTHON312" -m venv "$VENV" || { echo "versions: no $PYTHON312 (set PYTHON312)" >&2; exit 2; }
fi
echo "versions: installing $VERSIONS and $OTHERS into $VENV"
# shellcheck disable=SC2086
"$PY" -m pip install -q --disable-pip-version-check $VERSIONS $OTHERS || { echo "versions: pip failed" >&2; exit 2; }
"$PY" -c 'import sys, numpy, torch, triton, transformers; print("versions: python", sys.version.split()[0], "torch",
torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "numpy", numpy.__version__)'

rm -rf "$WORK/repo"
git clone -q "$ROOT" "$WORK/repo" && cd "$WORK/repo" || exit 2
echo "versions: HEAD $(git log --oneline -1)"
export RLHFV_CUDA_ARCHS=${RLHFV_CUDA_ARCHS:-90a}
start=$(date +%s)
if "$PY" -m pip install -q --no-build-isolation -e . > "$WORK/build.log" 2>&1; then
  cuda=$("$PY" -c 'import torch, rlhfv_kernels
print(torch._C._dispatch_has_kernel_for_dispatch_key("rlhfv::logprob_fwd", "CUDA"))')
  echo "versions: built in $(( $(date +%s) - start )) s; CUDA kernels $cuda"
else
  echo "versions: the build failed, see $WORK/build.log"; tail -n 20 "$WORK/build.log"; exit 1
fi

"$PY" tests/gpu_verify/triton_aot.py --targets 80,90 --json "$WORK/aot.json" > "$WORK/aot.log" 2>&1 || FAILED=1
echo "versions: aot: $(tail -n 1 "$WORK/aot.log")"

"$PY" -m pytest -q -rfE -p no:cacheprovider tests > "$WORK/tests.log" 2>&1 || FAILED=1
echo "versions: tests: $(tail -n 1 "$WORK/tests.log")"
grep -E "^(FAILED|ERROR) " "$WORK/tests.log" | cut -c1-200
exit $FAILED

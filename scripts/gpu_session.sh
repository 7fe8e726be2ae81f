#!/usr/bin/env bash
# Everything a GPU session owes, in one device call: build, the whole test suite on the GPU, the benchmark.
#
# Before the call (on the development machine, in the repo root), bring the peers as wheels (they are git-ignored):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl liger-kernel cut-cross-entropy trl
#   (flash-attn ships only as a source tarball whose package imports its CUDA build; the benchmark skips it unless
#    RLHFV_PEER_FLASH_ATTN_CE names its flash_attn/ops/triton/cross_entropy.py, extracted under .whl/.)
# Then two device calls (each must end within 10 minutes):
#   run(command="bash scripts/gpu_session.sh tests", carry=[".whl"], timeout_s=600)   # build + whole test suite
#   run(command="bash scripts/gpu_session.sh bench", carry=[".whl"], timeout_s=600)   # kernel + trainer benchmarks
# and commit $OUT/bench-*.json and $OUT/trainer-*.json under benchmarks/results/, with tests.log's summary in the note.
# The backend default on GPU (rlhfv_kernels/_backend.py CUDA_DEFAULT) should follow what bench-*.json shows.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/rlhfv-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
stage=${1:-all}
export RLHFV_CUDA_ARCHS=${RLHFV_CUDA_ARCHS:-90a}  # the lent machines are Hopper; one target builds faster
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
if [ "$stage" = tests ] || [ "$stage" = all ]; then
  # The CPU stand-ins for a GPU (CUDA emulation under sanitizers, ahead-of-time compiles) are skipped: here the
  # kernels run for real, and device time is scarce.
  python3 -m pytest -q tests -p no:cacheprovider --ignore tests/build/test_cuda_emu.py --ignore tests/build/test_triton_aot.py \
    2>&1 | tee "$OUT/tests.log" | tail -15
fi
if [ "$stage" = bench ] || [ "$stage" = all ]; then
  stamp=$(date -u +%Y%m%d)
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9_.-')
  python3 benchmarks/run.py --no-progress --json "$OUT/bench-$gpu-$stamp.json" --plot "$OUT/bench-$gpu-$stamp.png" 2>&1 | tee "$OUT/bench.log" | tail -60
  python3 benchmarks/trainer.py --vocab 128256 --pairs 8 --json "$OUT/trainer-$gpu-$stamp.json" 2>&1 | tail -8
  python3 benchmarks/linear.py --case 16384x4096x128256:bfloat16 --json "$OUT/linear-$gpu-$stamp.json" 2>&1 | tail -8
  python3 benchmarks/packing.py --hidden 1024 --layers 8 --json "$OUT/packing-$gpu-$stamp.json" 2>&1 | tail -8
  if python3 -c "import trl" 2>/dev/null; then  # TRL's DPO / GRPO step vs the drop-ins (trl travels as a wheel)
    python3 benchmarks/trl_step.py --vocab 128256 --json "$OUT/trl-step-$gpu-$stamp.json" 2>&1 | tail -14
  else
    echo "trl not installed: benchmarks/trl_step.py skipped (bring it in .whl/)"
  fi
fi

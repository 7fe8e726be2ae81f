#!/usr/bin/env bash
# Everything the first lent GPU must prove, in ONE device call that ends within 9 minutes (a lease is 15 minutes in
# all, the machine's start included), most important first, each result written to $OUT the moment it exists (a call
# cut short still returns what it measured):
#
#   run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=570)
#
# Steps (each with its own time limit, all within RLHFV_GPU_BUDGET_S = 540 s; $OUT/steps.tsv says how each ended):
#   env           GPU, driver, python / torch / triton / transformers versions, pip list      -> env.txt
#   peers         the peers' wheels from .whl/ (liger-kernel, cut-cross-entropy, trl)          -> peers.txt
#                 (missing wheels: those peers are skipped, and peers.txt says so)
#   build         the extension against the installed torch, sm_90a only                      -> build.log
#   kernels       the GPU targets of the kernel suites (triton-cuda, cuda-cuda, GPU-size cases; the CPU
#                 stand-ins are not run), RLHFV_TEST_TIMEOUT_S per test                       -> kernels.xml
#   bench-logits  N=16384 V=128256, N=4096 V=262144 bf16: eager, compiled, ours, Liger        -> bench-logits.json
#   bench-linear  16x1024 tokens, H=4096, V=128256 bf16: the bare GEMMs, ours, Liger, CCE     -> bench-linear.json
#   bench-trainer one DDPO trainer step at V=128256                                            -> bench-trainer.json
#   tests         the rest of the suite on the GPU (trainers included)                         -> tests.xml
#   bench-rest    packing, TRL's own DPO / GRPO steps beside the drop-ins (trl from .whl/)     -> bench-*.json
# Commit $OUT's *.json, env.txt, peers.txt and steps.tsv under benchmarks/results/gpu-<date>/; the GPU default backend
# (rlhfv_kernels/_backend.py CUDA_DEFAULT) follows bench-logits.json (DESIGN.md §5).
#
# Bring the peers as wheels first (git-ignored; on the development machine, in the repo root):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl liger-kernel cut-cross-entropy \
#       "trl>=1.16,<1.17" datasets dill multiprocess num2words
#   python3 -m pip wheel --no-deps -w .whl docopt          (num2words needs it and it has no wheel on PyPI)
# (about 3 MB; the GPU image has none of them: TRL needs datasets, which needs dill and multiprocess; SmolVLM's
# processor needs num2words. peers.txt says which import there.)
#
# RLHFV_GPU_REHEARSAL=1 runs the same steps on the CPU (CPU targets, tiny cases, a 900 s budget, each step's limit
# times 3, since in CI it shares 2 cores with other test workers): CI does, through tests/build/test_gpu_session.py,
# so that this script cannot rot before a GPU ever runs it.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rlhfv-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
REHEARSAL=${RLHFV_GPU_REHEARSAL:-0}
# The step limits below are sized for the GPU machine. The rehearsal stretches them: a CI run beside the AOT check (load
# 5.3 on 2 cores) took 75 s for a bench-linear step that takes 15 s alone, and failed on the limit, not on the script.
if [ "$REHEARSAL" = 1 ]; then BUDGET=${RLHFV_GPU_BUDGET_S:-900}; STRETCH=3
else BUDGET=${RLHFV_GPU_BUDGET_S:-540}; STRETCH=1; fi
DEADLINE=$(( $(date +%s) + BUDGET ))
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\tseconds\n' > "$STEPS"
FAILED=0

# step NAME LIMIT_S COMMAND: runs the bash COMMAND with its output in $OUT/NAME.log, within LIMIT_S x STRETCH and what
# is left of the budget (a step that would get under 15 s is skipped); one line per step in steps.tsv.
step() {
  local name=$1 limit=$(( $2 * STRETCH )) command=$3
  local left=$(( DEADLINE - $(date +%s) - 5 ))
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped: out of time\t0\n' "$name" >> "$STEPS"
    echo "[$name] skipped: out of time"
    FAILED=1
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start rc status
  start=$(date +%s)
  timeout --kill-after=5 "$limit" bash -c "$command" > "$OUT/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then status=ok
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timed out after ${limit} s"
  else status="failed (exit $rc)"; fi
  [ $rc -eq 0 ] || FAILED=1
  printf '%s\t%s\t%s\n' "$name" "$status" $(( $(date +%s) - start )) >> "$STEPS"
  echo "[$name] $status ($(( $(date +%s) - start )) s)"
  tail -n 4 "$OUT/$name.log" | sed 's/^/    /'
  return $rc
}

if [ "$REHEARSAL" = 1 ]; then
  export RLHFV_FORCE_CPU=1 CUDA_VISIBLE_DEVICES=""
  DEVICE=cpu
  # the same compile, beside the tree: CI's own build stays loaded in its test process while this one runs
  BUILD="$PY setup.py -q build_ext --build-lib $OUT/rehearsal-build/lib --build-temp $OUT/rehearsal-build/temp"
  KERNEL_TESTS="tests/kernels/test_edges.py tests/kernels/test_token_logprobs.py -k cpp-cpu"
  # (no torch.compile or TRL rows: compiling the reference takes a minute of CI here; the benchmark's own tests run them)
  LOGITS_CASES="--quick --ops token_logprobs,ddpo_loss --impls reference,fused,fused_inplace"
  LINEAR_CASE="--case 64x32x256:float32 --repeats 1 --warmup 0"
  TRAINER_ARGS="--vocab 512 --pairs 2 --repeats 1"
  REST_TESTS="tests/docs"
  REST_BENCH="$PY benchmarks/packing.py --device cpu --pairs 2 --repeats 1 --json $OUT/bench-packing.json"
else
  export RLHFV_CUDA_ARCHS=${RLHFV_CUDA_ARCHS:-90a}  # the lent machines are Hopper; one target builds faster
  DEVICE=cuda
  BUILD="$PY setup.py -q build_ext --inplace"
  KERNEL_TESTS="tests/kernels -k 'triton-cuda or cuda-cuda'"
  LOGITS_CASES="--case 16384x128256:bfloat16 --case 4096x262144:bfloat16 --ops token_logprobs,ddpo_loss"
  LINEAR_CASE="--case 16384x4096x128256:bfloat16"
  TRAINER_ARGS="--vocab 128256 --pairs 8"
  REST_TESTS="tests --ignore=tests/build --ignore=tests/kernels"  # build/: the CPU stand-ins, this rehearsal
  REST_BENCH="$PY benchmarks/packing.py --hidden 1024 --layers 8 --json $OUT/bench-packing.json; \
if $PY -c 'import trl' 2>/dev/null; then $PY benchmarks/trl_step.py --vocab 128256 --json $OUT/bench-trl-step.json; \
else echo 'trl is not installed: benchmarks/trl_step.py skipped (bring it in .whl/)'; fi"
fi

step env 30 "{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo 'no nvidia-smi'; \
  nvcc --version 2>&1 | tail -1 || true; echo CUDA_HOME=${CUDA_HOME:-unset}; uname -a; nproc; \
  $PY -c 'import sys, torch, triton, transformers; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"transformers\", transformers.__version__, \"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'; \
  $PY -m pip list 2>/dev/null; } > $OUT/env.txt 2>&1; head -3 $OUT/env.txt"

# The peers travel as wheels; without them their benchmark rows are skipped (never a failed session).
if ls .whl/*.whl > /dev/null 2>&1; then
  step peers 60 "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rlhfv-site .whl/*.whl"
  export PYTHONPATH="/tmp/rlhfv-site${PYTHONPATH:+:$PYTHONPATH}"
else
  printf 'peers\tskipped: no .whl/ wheels\t0\n' >> "$STEPS"
  echo "[peers] no .whl/ wheels: Liger, cut-cross-entropy and TRL rows are skipped"
fi
$PY - > "$OUT/peers.txt" 2>&1 <<'EOF'
import importlib
for name, module in (("liger-kernel", "liger_kernel"), ("cut-cross-entropy", "cut_cross_entropy"), ("trl", "trl")):
    try:
        importlib.import_module(module)
        print(f"{name}: importable")
    except Exception as exc:  # missing or broken: that peer's rows are skipped
        print(f"{name}: skipped ({type(exc).__name__}: {exc})")
EOF

if step build 240 "$BUILD"; then
  export RLHFV_TEST_TIMEOUT_S=${RLHFV_TEST_TIMEOUT_S:-90}
  step kernels 150 "$PY -m pytest -q -p no:cacheprovider $KERNEL_TESTS --junitxml=$OUT/kernels.xml"
  step bench-logits 120 "$PY benchmarks/run.py --device $DEVICE $LOGITS_CASES --no-progress --no-plot --json $OUT/bench-logits.json"
  step bench-linear 75 "$PY benchmarks/linear.py --device $DEVICE $LINEAR_CASE --json $OUT/bench-linear.json"
  step bench-trainer 60 "$PY benchmarks/trainer.py --device $DEVICE $TRAINER_ARGS --json $OUT/bench-trainer.json"
  step tests 600 "$PY -m pytest -q -p no:cacheprovider $REST_TESTS --junitxml=$OUT/tests.xml"
  step bench-rest 600 "$REST_BENCH"
else
  echo "[build] nothing runs without the extension: see $OUT/build.log"
fi
echo "steps ($OUT/steps.tsv):"
column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
exit $FAILED

#!/usr/bin/env bash
# Builds .venv/video: an environment where transformers' video processors run (they need torchvision, and PyPI's
# torchvision does not import beside the CPU torch wheel that scripts/setup.sh installs). torch and torchvision come
# as a matching pair (x86_64: torch 2.14.1 + torchvision 0.29.1, PyPI's CUDA build, which runs on the CPU; aarch64:
# 2.9.1 + 0.24.1, a CPU build), with the same transformers as .venv and PyAV. The compiled kernels are not built here
# (tests/video/ runs the eager oracle, RLHFV_BACKEND=eager). Safe to run again: it does nothing once built.
#   bash scripts/video_env.sh        then: tests/video/test_video_env.py runs tests/video/test_video_records.py in it
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=.venv/video
exec 9>".venv/video.lock" && flock 9  # one build at a time (test workers, a background prefetch)
STAMP=$ENV/.complete
TRANSFORMERS=$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$TRANSFORMERS" ]; then
  exit 0
fi
case "$(uname -m)" in
  x86_64) PAIR="torch==2.14.1 torchvision==0.29.1" ;;
  aarch64) PAIR="torch==2.9.1 torchvision==0.24.1" ;;
  *) echo "video_env: no known torch + torchvision pair for $(uname -m)" >&2; exit 2 ;;
esac
rm -rf "$ENV"
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv "$ENV"
echo "video_env: installing $PAIR, transformers==$TRANSFORMERS and PyAV into $ENV"
"$ENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile $PAIR "transformers==$TRANSFORMERS" pillow av numpy num2words \
  pytest tqdm 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
"$ENV/bin/python" -c "import torch, torchvision, av, transformers.video_utils" \
  || { echo "video_env: the environment does not import torchvision" >&2; exit 1; }
echo "$TRANSFORMERS" > "$STAMP"

#!/usr/bin/env bash
# CI: the path a user takes without scripts/setup.sh. A fresh venv, the CPU torch, then a plain
# `pip install ".[train]"` (isolated build: pip installs pyproject.toml's build requirements, torch included, and
# compiles the extension), then, outside the source tree, the extension loads, a fused loss runs and the trainer
# (whose dependencies come from the [train] extra) trains a few steps.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv "$TMP/venv"
bash scripts/install_torch.sh "$TMP/venv/bin/python" cpu
echo "pip-install check: pip install \".[train]\" (isolated build)"
"$TMP/venv/bin/python" -m pip install -q --disable-pip-version-check "$ROOT[train]"
cd "$TMP"
"$TMP/venv/bin/python" - <<'PY'
import torch
import rlhfv_kernels as rk
assert rk.extension_available(), "the compiled extension did not load"
logits = torch.randn(4, 6, 50, requires_grad=True)
labels = torch.randint(0, 50, (4, 6))
out = rk.ddpo_loss(logits, labels, torch.zeros(4))
out.loss.backward()
assert torch.isfinite(logits.grad).all()
print("pip-install check: extension loaded, ddpo_loss ran on", rk._backend.resolve_backend(None, logits.device))
PY
# (20 SFT steps, not the tiny model's default 1000: this checks the install path, not the learning; 75 -> ~20 s)
"$TMP/venv/bin/python" -m rlhfv_train --max-steps 3 --sft-steps 20 --output-dir "$TMP/run" --no-progress \
  > "$TMP/train.log" 2>&1 || { tail -20 "$TMP/train.log"; exit 1; }
"$TMP/venv/bin/python" -m rlhfv_train.grpo --max-steps 2 --sft-steps 20 --output-dir "$TMP/grpo" --no-progress \
  > "$TMP/grpo.log" 2>&1 || { tail -20 "$TMP/grpo.log"; exit 1; }
echo "pip-install check: ok (the DDPO trainer ran 3 steps, the GRPO trainer 2)"

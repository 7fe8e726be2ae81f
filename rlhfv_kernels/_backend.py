"""Which implementation computes per-token log-probs: the one place a backend is chosen.

Backends:
  "reference" - plain eager PyTorch (log_softmax + gather); always available, materializes N x V.
  "cpp"       - the compiled extension rlhfv_kernels._C, CPU kernels (C++).
  "cuda"      - the compiled extension's CUDA kernels (CUDA C++), where the extension was built with them.
  "triton"    - Triton kernels: CUDA tensors, or CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set
                before rlhfv_kernels.triton is first imported; meant for tests, it is slow).
None picks the best available for the tensor's device (CPU: "cpp"; CUDA: CUDA_DEFAULT, then the other GPU backend);
the environment variable RLHFV_BACKEND overrides that default.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import torch

BACKENDS = ("reference", "cpp", "cuda", "triton")
# The GPU default: Triton until a recorded GPU benchmark (benchmarks/results/) shows the CUDA C++ kernels faster.
CUDA_DEFAULT = ("triton", "cuda")

_extension_error: str | None = None
try:
    from . import _C  # noqa: F401  (importing registers torch.ops.rlhfv.*)
except ImportError as exc:  # the package is usable, slowly, without its compiled part
    _extension_error = f"{type(exc).__name__}: {exc}"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, wrong device, or not implemented for this device)."""


def extension_available() -> bool:
    return _extension_error is None


def _why_unavailable(backend: str, device: torch.device, path: str = "logits") -> str | None:
    """None if `backend` can run `path` ("logits" or "linear", the fused-linear family) on `device`, else why."""
    if backend == "reference":
        return None
    if path == "linear" and backend == "cuda":
        return "the fused-linear path has no CUDA C++ kernels in this release (use 'triton' on GPU)"
    if backend == "cpp":
        if _extension_error is not None:
            return (f"the compiled extension rlhfv_kernels._C failed to import ({_extension_error}); "
                    "build it with `pip install --no-build-isolation -e .`")
        if device.type != "cpu":
            return f"'cpp' is the compiled CPU kernels; for {device.type} tensors use 'cuda' or 'triton'"
        return None
    if backend == "cuda":
        if _extension_error is not None:
            return f"the compiled extension rlhfv_kernels._C failed to import ({_extension_error})"
        if device.type != "cuda":
            return f"the CUDA kernels run on CUDA tensors, not {device.type}"
        if not torch._C._dispatch_has_kernel_for_dispatch_key("rlhfv::logprob_fwd", "CUDA"):
            return ("the extension was built without its CUDA kernels (build with a CUDA torch and nvcc, "
                    "without RLHFV_FORCE_CPU=1)")
        return None
    if backend == "triton":
        return _why_triton_unavailable(device)
    return None


def _why_triton_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"Triton kernels run on CUDA tensors (and CPU tensors under the interpreter), not {device.type}"
    loaded = sys.modules.get("rlhfv_kernels.triton.kernels")
    interpreting = loaded.INTERPRETING if loaded is not None else os.environ.get("TRITON_INTERPRET") == "1"
    if not interpreting:
        return ("on CPU tensors the Triton kernels need the interpreter: set TRITON_INTERPRET=1 before "
                "rlhfv_kernels.triton is first imported")
    return None


_warned_fallback: set[tuple[str, str]] = set()


def resolve_backend(backend: str | None, device: torch.device, path: str = "logits") -> str:
    """Returns the backend that will run `path` on `device`, or raises BackendUnavailableError / ValueError."""
    explicit = backend is not None
    if backend is None:
        backend = os.environ.get("RLHFV_BACKEND") or None
    if backend is not None and backend not in BACKENDS:
        source = "backend" if explicit else "RLHFV_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {backend!r}")
    if backend is not None:
        reason = _why_unavailable(backend, device, path)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} cannot run on {device}: {reason}")
        return backend
    # Default: the fused kernel where one exists for this device, else the reference (with one warning).
    candidates = (("triton",) if path == "linear" else CUDA_DEFAULT) if device.type == "cuda" else ("cpp",)
    reasons = []
    for preferred in candidates:
        reason = _why_unavailable(preferred, device, path)
        if reason is None:
            return preferred
        reasons.append(f"{preferred}: {reason}")
    reason = "; ".join(reasons)
    if (device.type, path) not in _warned_fallback:
        _warned_fallback.add((device.type, path))
        warnings.warn(f"rlhfv: no fused {path}-path kernel for {device.type} tensors ({reason}); using the eager "
                      "reference, which materializes the full log_softmax", RuntimeWarning, stacklevel=3)
    return "reference"

"""Which implementation computes per-token log-probs: the backend table, and the one place a backend is chosen.

Everything that needs to know the backends (the public API, the operator glue in _ops.py, the CLI, the benchmarks,
the tests) derives it from TABLE below. None picks the best available for the tensor's device (DEFAULTS); the
environment variable RLHFV_BACKEND overrides that default. "eager" runs the oracle module (rlhfv_kernels.reference) in
plain PyTorch; its old name "reference" is still accepted, with a FutureWarning (RENAMED).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]   # device types whose tensors it runs on
    paths: tuple[str, ...]     # "logits" (token_logprobs & co.) and/or "linear" (the fused-linear family)
    namespace: str | None      # torch.ops namespace of its operators (operators() below); None: plain PyTorch
    summary: str


TABLE = {b.name: b for b in (
    Backend("eager", ("cpu", "cuda"), ("logits", "linear"), None,
            "plain eager PyTorch (log_softmax + gather, rlhfv_kernels.reference); always available, materializes "
            "N x V"),
    Backend("cpp", ("cpu",), ("logits", "linear"), "rlhfv",
            "the compiled extension's C++ CPU kernels"),
    Backend("cuda", ("cuda",), ("logits",), "rlhfv",
            "the compiled extension's CUDA C++ kernels, where it was built with them"),
    Backend("triton", ("cuda", "cpu"), ("logits", "linear"), "rlhfv_triton",
            "Triton kernels: CUDA tensors, or CPU tensors under the interpreter (TRITON_INTERPRET=1 set before "
            "rlhfv_kernels.triton is first imported; for tests, slow)"),
)}
BACKENDS = tuple(TABLE)
RENAMED = {"reference": "eager"}  # old backend names, accepted with a FutureWarning
FUSED_BACKENDS = tuple(name for name, b in TABLE.items() if b.namespace is not None)
# The GPU default: Triton until a recorded GPU benchmark (benchmarks/results/) shows the CUDA C++ kernels faster.
CUDA_DEFAULT = ("triton", "cuda")
DEFAULTS = {("cpu", "logits"): ("cpp",), ("cpu", "linear"): ("cpp",),
            ("cuda", "logits"): CUDA_DEFAULT, ("cuda", "linear"): ("triton",)}


def describe() -> str:
    """One line per backend, for --help texts."""
    return "; ".join(f"{name}: {b.summary}" for name, b in TABLE.items()) + "".join(
        f" ({old!r}: the old name of {new!r})" for old, new in RENAMED.items())


def targets(path: str = "logits") -> list[tuple[str, str]]:
    """Every (fused backend, device type) pair that `path` has kernels for, whether or not it runs here."""
    return [(name, device) for name in FUSED_BACKENDS for device in TABLE[name].devices
            if path in TABLE[name].paths]


TRITON_FAMILY = "rlhfv_kernels.triton.ops"  # importing it registers torch.ops.rlhfv_triton.*


def operators(backend: str):
    """torch.ops namespace of `backend`'s operators. The compiled extension registers rlhfv::* when this module is
    imported; the Triton family when TRITON_FAMILY is: the dispatch point (_sources.resolved) imports it with an import
    statement, which torch.compile runs while tracing (fullgraph=True works on a process's first call), and other
    callers get it here."""
    if backend == "triton" and TRITON_FAMILY not in sys.modules:
        importlib.import_module(TRITON_FAMILY)
    return getattr(torch.ops, TABLE[backend].namespace)


# csrc/cpu/simd.h reads RLHFV_CPU_LEVEL once, at the first kernel call, and cannot raise from there: a
# value it would not understand is refused here, at import, instead of running the widest level without a word
CPU_LEVELS = ("v4", "v3", "baseline")
if os.environ.get("RLHFV_CPU_LEVEL", "") not in ("", *CPU_LEVELS):
    raise ValueError(f"RLHFV_CPU_LEVEL must be one of {', '.join(CPU_LEVELS)} (or unset), got "
                     f"{os.environ['RLHFV_CPU_LEVEL']!r}")

_extension_error: str | None = None
try:
    from . import _C  # noqa: F401  (importing registers torch.ops.rlhfv.*)
except ImportError as exc:  # the package is usable, slowly, without its compiled part
    _extension_error = f"{type(exc).__name__}: {exc}"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, wrong device, or not implemented for this device)."""


def extension_available() -> bool:
    return _extension_error is None


def cpu_kernel_variant() -> str | None:
    """The SIMD variant of the compiled CPU kernels that this CPU runs ("x86-64-v4 (AVX-512) + AVX512-BF16",
    "x86-64-v4 (AVX-512)", "x86-64-v3 (AVX2, FMA)", "x86-64 baseline (SSE2)", ...: one build carries them all and
    picks at load time), None without the extension."""
    return _C.cpu_variant() if _extension_error is None else None


def why_unavailable(backend: str, device: torch.device, path: str = "logits") -> str | None:
    """None if `backend` can run `path` ("logits" or "linear", the fused-linear family) on `device`, else why."""
    if backend == "eager":
        return None
    if path not in TABLE[backend].paths:
        return f"the {path} path has no {backend!r} kernels in this release"
    if device.type == "cuda" and device.type in TABLE[backend].devices and not torch.cuda.is_available():
        return "this machine has no CUDA device (or this torch has no CUDA)"
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


# Looked up once: torch.compile (torch 2.11's dynamo) refuses to trace importlib.util.find_spec
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _why_triton_unavailable(device: torch.device) -> str | None:
    if not TRITON_INSTALLED:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"Triton kernels run on CUDA tensors (and CPU tensors under the interpreter), not {device.type}"
    # Under torch.compile, not whether the kernels module is loaded: the trace may load it next, and torch.compile
    # guards on what it read.
    compiling = torch.compiler.is_compiling()
    loaded = None if compiling else sys.modules.get("rlhfv_kernels.triton.kernels")
    interpreting = loaded.INTERPRETING if loaded is not None else os.environ.get("TRITON_INTERPRET") == "1"
    if not interpreting:
        return ("on CPU tensors the Triton kernels need the interpreter: set TRITON_INTERPRET=1 before "
                "rlhfv_kernels.triton is first imported")
    if loaded is None and not compiling:  # whether this interpreter runs them is known once they are loaded
        loaded = importlib.import_module("rlhfv_kernels.triton.kernels")
    return getattr(loaded, "INTERPRETER_PROBLEM", None)


_warned_fallback: set[tuple[str, str]] = set()


def resolve_backend(backend: str | None, device: torch.device, path: str = "logits") -> str:
    """Returns the backend that will run `path` on `device`, or raises BackendUnavailableError / ValueError."""
    explicit = backend is not None
    if backend is None:
        backend = os.environ.get("RLHFV_BACKEND") or None
    source = "backend" if explicit else "RLHFV_BACKEND"
    if backend in RENAMED:
        warnings.warn(f"{source}={backend!r} is now {RENAMED[backend]!r}; the old name will be removed", FutureWarning,
                      stacklevel=3)
        backend = RENAMED[backend]
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {backend!r}")
    if backend is not None:
        reason = why_unavailable(backend, device, path)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} cannot run on {device}: {reason}")
        return backend
    # Default: the fused kernel where one exists for this device, else the eager backend (with one warning).
    candidates = DEFAULTS.get((device.type, path), ())
    reasons = []
    for preferred in candidates:
        reason = why_unavailable(preferred, device, path)
        if reason is None:
            return preferred
        reasons.append(f"{preferred}: {reason}")
    reason = "; ".join(reasons)
    if (device.type, path) not in _warned_fallback:
        _warned_fallback.add((device.type, path))
        warnings.warn(f"rlhfv: no fused {path}-path kernel for {device.type} tensors ({reason}); using the eager "
                      "backend, which materializes the full log_softmax", RuntimeWarning, stacklevel=3)
    return "eager"

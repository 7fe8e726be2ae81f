"""The measuring kit shared by every benchmark script (run.py, linear.py, trainer.py) and the tests that use it:
device and version info, timing, peak extra memory, table formatting and --plot."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # keep the CPU memory profiler from printing on every use
import torch  # noqa: E402

import rlhfv_kernels as rk  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    variant = rk.cpu_kernel_variant()  # which SIMD clone of our CPU kernels runs: the numbers depend on it
    return f"{name} ({torch.get_num_threads()} threads" + (f", {variant} kernels)" if variant else ")")


def versions() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "rlhfv": rk.__version__,
            "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda, "cpu_kernels": rk.cpu_kernel_variant()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    return info


def pick_device(name: str) -> torch.device:
    """--device: 'auto' is CUDA when torch sees a GPU, else CPU; anything else is taken as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch sees no CUDA device")
    return device


def training_step_setup(args) -> tuple[torch.device, int, torch.dtype | None]:
    """(device, lm_head size, autocast dtype) of a training-step benchmark (trainer.py, packing.py): --device,
    --vocab (default 32000 on CPU, 128256 on a GPU), and bf16 autocast on a GPU as the trainers use."""
    device = pick_device(args.device)
    vocab = args.vocab or (128256 if device.type == "cuda" else 32000)
    return device, vocab, torch.bfloat16 if device.type == "cuda" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak bytes allocated through torch above the level at entry, counting allocations inside the kernels.

    CUDA: the caching allocator's peak statistics. CPU: the profiler's allocation events, replayed in time order
    (exact, and unaffected by malloc reusing freed pages, unlike the resident set size).
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self.peak = None
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True)
            self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
            return False
        self.profiler.__exit__(*exc)
        events = sorted((e for e in self.profiler.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        live = peak = 0
        for event in events:
            live += event.nbytes()
            peak = max(peak, live)
        self.peak = peak
        return False


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, rows_per_chunk: int = 1024) -> float:
    """max |a - b| over two [..., V] tensors, a few rows at a time (no N x V fp32 temporary)."""
    a2, b2 = a.detach().reshape(-1, a.shape[-1]), b.detach().reshape(-1, b.shape[-1])
    worst = 0.0
    for start in range(0, a2.shape[0], rows_per_chunk):
        diff = (a2[start:start + rows_per_chunk].float() - b2[start:start + rows_per_chunk].float()).abs().max()
        worst = max(worst, float(diff))
    return worst


def time_call(fn, device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def spread(times: list[float]) -> float:
    """(max - min) / median of repeated timings: how far this machine's noise reaches into one row."""
    if len(times) < 2:
        return 0.0
    middle = statistics.median(times)
    return (max(times) - min(times)) / middle if middle > 0 else 0.0


# A run is flagged when the machine was busy: the 1-minute load over this share of the cores
BUSY_LOAD_PER_CORE = 0.5


def machine_load() -> dict:
    """The 1- and 5-minute load averages and the core count, to put beside a run's numbers (None where unknown)."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        one = five = None
    return {"load1": one, "load5": five, "cores": os.cpu_count()}


def busy(load: dict) -> bool:
    return load["load1"] is not None and load["load1"] > BUSY_LOAD_PER_CORE * (load["cores"] or 1)


def write_json(path: str, data) -> None:
    """Writes a benchmark's records (folders created) and says where."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {path}")


def fmt_ms(v):
    return "-" if v is None else f"{v:9.2f}"


def fmt_mb(v):
    return "n/a" if v is None else f"{v / 2**20:9.1f}"


def mem_ratio(ratio, peak_bytes) -> str:
    """The reference's peak / ours; under 1 MiB (O(N) vectors) a ratio like 76923x says nothing: show ours,
    "->0.1 MiB"."""
    if ratio is None:
        return ""
    return f"->{peak_bytes / 2**20:.1f} MiB" if peak_bytes < 2**20 else f"{ratio:.1f}x"


def plot_bars(panels: list[tuple[str, dict]], title: str, path: str) -> str:
    """One bar chart per panel, side by side: panels are (y-axis label, {group: {impl: value}}), e.g. fwd+bwd ms and
    peak MiB per op. Writes a PNG to `path` (matplotlib, headless) and returns it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = list(dict.fromkeys(g for _, data in panels for g in data))
    impls = list(dict.fromkeys(i for _, data in panels for g in data.values() for i in g))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 1.6 * len(groups) * len(panels)), 4.2), squeeze=False)
    width = 0.8 / max(len(impls), 1)
    for ax, (ylabel, data) in zip(axes[0], panels):
        for k, impl in enumerate(impls):
            xs = [i + k * width for i, g in enumerate(groups) if impl in data.get(g, {})]
            ys = [data[g][impl] for g in groups if impl in data.get(g, {})]
            ax.bar(xs, ys, width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

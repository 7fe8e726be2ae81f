"""The measuring kit shared by every benchmark script (run.py, linear.py, trainer.py, ...) and the tests that use it:
device and version info, timing, peak extra memory, table formatting and --plot, launching under torchrun."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # keep the CPU memory profiler from printing on every use
import torch  # noqa: E402

import rlhfv_kernels as rk  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name, generation = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        name = fields.get("model name", name)
        # A VM may show only "AMD EPYC": family and model say which generation (AMD family 23 model 49: Zen 2, Rome)
        if "cpu family" in fields and "model" in fields:
            generation = f"family {fields['cpu family']} model {fields['model']}, "
    except OSError:
        pass
    variant = rk.cpu_kernel_variant()  # which SIMD clone of our CPU kernels runs: the numbers depend on it
    return f"{name} ({generation}{torch.get_num_threads()} threads" + (f", {variant} kernels)" if variant else ")")


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


def scene_records(folder: str, pairs: int, family: str) -> list:
    """`pairs` synthetic scene records for the tiny `family`: with their images for a vision-language family, their
    texts alone for a text one (a text model refuses image records)."""
    import dataclasses
    from rlhfv_train.data import load_records, synthetic
    from rlhfv_train.models.tiny_families import FAMILIES
    records, _ = load_records(synthetic.generate(folder, pairs, seed=0))
    return records if FAMILIES[family].kind == "image-text" else [dataclasses.replace(r, images=()) for r in records]


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


def time_and_peak(step, device, repeats: int) -> tuple[list[float], int]:
    """(the times of `repeats` calls of step() after one warm-up call (the allocator, an optimizer's state), the peak
    extra bytes of one more call): what the step benchmarks record per implementation."""
    times = time_call(step, device, 1, repeats)
    with PeakMemory(device) as mem:
        step()
    return times, mem.peak


def add_torchrun_arguments(parser, nproc_help: str, device_help: str) -> None:
    """The options of a benchmark that launches itself under torchrun (launch_under_torchrun): processes, repeats,
    device, --json, the rendezvous port, and the workers' hidden --worker / --work."""
    import argparse
    parser.add_argument("--nproc", type=int, default=2, help=nproc_help)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help=device_help)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--port", help="the rendezvous port (default: a free one, torchrun --standalone)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)


def launch_under_torchrun(script: str, argv: list[str], nproc: int, port: str | None) -> tuple[list, dict] | int:
    """Runs `script --worker --work DIR argv...` under torch.distributed.run with `nproc` processes (the benchmarks
    that launch themselves: scale_out.py, vocab_parallel.py); returns (what the workers wrote with write_from_rank0,
    one entry per process; the machine load before and after), or the launch's failing exit code (its stderr
    printed). Warns first when the machine is busy."""
    import json
    import tempfile
    load = {"before": machine_load()}
    warn_if_busy(load["before"])
    rendezvous = ["--master_port", port] if port else ["--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory(prefix="rlhfv-" + os.path.basename(script).removesuffix(".py") + "-") as work:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *rendezvous,
                   os.path.abspath(script), "--worker", "--work", work, *[a for a in argv if a != "--worker"]]
        launch = subprocess.run(command, env=env, capture_output=True, text=True)
        if launch.returncode != 0:
            print(launch.stderr[-4000:], file=sys.stderr)
            return launch.returncode
        with open(os.path.join(work, "ranks.json")) as f:
            ranks = json.load(f)
    load["after"] = machine_load()
    return ranks, load


def write_from_rank0(work: str, mine: dict) -> None:
    """A worker's side of launch_under_torchrun: every process's `mine`, gathered, written by process 0."""
    import json

    import torch.distributed as dist
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        with open(os.path.join(work, "ranks.json"), "w") as f:
            json.dump(gathered, f)


def rows_per_route(ranks: list, names, **first_rank_fields) -> list[dict]:
    """One row per route from every process's results (ranks[p]["results"][k]): the slowest process's median step,
    its spread, the largest peak, and `first_rank_fields` (row key -> result key) from process 0."""
    rows = []
    for k, name in enumerate(names):
        per_rank = [r["results"][k] for r in ranks]
        rows.append({"route": name, "step_median_ms": max(statistics.median(r["times_ms"]) for r in per_rank),
                     "spread": max(spread(r["times_ms"]) for r in per_rank),
                     "peak_extra_bytes": max(r["peak_extra_bytes"] for r in per_rank),
                     **{key: per_rank[0][field] for key, field in first_rank_fields.items()}, "per_rank": per_rank})
    return rows


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


# A row whose repeats spread wider than this (max - min over the median) is flagged as noise
NOISY_SPREAD = 0.5


def row_suspicions(fwd_times: list, fwd_bwd_times: list, fwd_median=None, fwd_bwd_median=None) -> list[str]:
    """What makes a timed row unreadable: a forward+backward faster than its forward alone (the machine changed speed
    between the two), or repeats spread over NOISY_SPREAD of their median. Medians default to the times' own."""
    fwd_median = fwd_median if fwd_median is not None or not fwd_times else statistics.median(fwd_times)
    fwd_bwd_median = fwd_bwd_median if fwd_bwd_median is not None else statistics.median(fwd_bwd_times)
    found = []
    if fwd_median is not None and fwd_bwd_median < fwd_median:
        found.append(f"fwd+bwd {fwd_bwd_median:.2f} ms < fwd alone {fwd_median:.2f} ms")
    return found + [f"{name} repeats spread {spread(times):.0%} of their median"
                    for name, times in (("fwd", fwd_times), ("fwd+bwd", fwd_bwd_times)) if spread(times) > NOISY_SPREAD]


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


def load_text(load: dict) -> str:
    return "unknown" if load["load1"] is None else f"{load['load1']:.2f}"


def print_load(before: dict, after: dict, flagged: int, drifting: int | None = None) -> None:
    """The machine's load around a run and how many of its rows were flagged (!) (and, where a script measures a floor
    before and after each case, how many cases drifted): the line every script ends with."""
    drift = "" if drifting is None else f", {drifting} cases with a drifting floor"
    print(f"machine load before / after: {load_text(before)} / {load_text(after)} on {after['cores']} cores; "
          f"{flagged} rows flagged (!){drift}" + (" (their warnings above)" if flagged or drifting else ""))


def warn_if_busy(load: dict) -> None:
    if busy(load):
        print(f"warning: the machine is busy (load {load['load1']:.1f} on {load['cores']} cores): times will be noisy",
              file=sys.stderr)


# --check: a benchmark's ratios (never its absolute times: those belong to one machine) against a recorded run's.
def add_check_arguments(parser, ratios: str) -> None:
    parser.add_argument("--check", metavar="JSON", help=f"compare this run's ratios ({ratios}; never absolute "
                        "times) with a recorded run (its --json); exit 1 when a row lost more than --check-tolerance")
    parser.add_argument("--check-tolerance", type=float, default=0.3, metavar="F",
                        help="the share of a ratio a row may lose before --check calls it worse (default 0.3)")


def read_recorded(parser, args) -> dict | None:
    """The --check run, read before anything is measured (parser.error on an unreadable file or a bad tolerance)."""
    import json

    if not 0 < args.check_tolerance < 1:
        parser.error(f"--check-tolerance must be between 0 and 1, got {args.check_tolerance}")
    if not args.check:
        return None
    try:
        with open(args.check) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        parser.error(f"--check: cannot read {args.check}: {exc}")


def compare_ratios(now: dict, then: dict, tolerance: float, recorded: dict, key_names: tuple, hint: str) -> int:
    """Prints each row both runs have and returns how many lost more than `tolerance` of their speedup or got that
    much further from their floor. now / then: key tuple (named by key_names) -> {"speedup": x, "x_floor": x or None,
    "noisy": bool}; a row this run flagged is reported as noisy and not counted: rerun it."""
    common = [key for key in now if key in then]
    if not common:
        raise SystemExit(f"--check: no ({', '.join(key_names)}) row of this run is in the recorded one; {hint}")
    widths = [max(len(name), *(len(str(key[i])) for key in common)) + 2 for i, name in enumerate(key_names)]
    print(f"\ncheck against the recorded run ({recorded.get('device_name')}, git "
          f"{recorded.get('versions', {}).get('git_commit')}): ratios only, tolerance {tolerance:.0%}")
    print("".join(f"{name:<{w}}" for name, w in zip(key_names, widths))
          + f"{'speedup now':>12}{'recorded':>10}{'x floor now':>12}{'recorded':>10}  verdict")
    worse = noisy = 0
    floor_text = lambda v: "-" if v is None else f"{v:.2f}x"
    for key in common:
        a, b = now[key], then[key]
        both_floors = a["x_floor"] is not None and b["x_floor"] is not None
        further = both_floors and a["x_floor"] > b["x_floor"] * (1 + tolerance)
        slower = a["speedup"] < b["speedup"] * (1 - tolerance) or further
        verdict = "noisy: rerun" if a["noisy"] else "WORSE" if slower else "ok"
        worse += slower and not a["noisy"]
        noisy += a["noisy"]
        print("".join(f"{str(part):<{w}}" for part, w in zip(key, widths))
              + f"{a['speedup']:>11.2f}x{b['speedup']:>9.2f}x{floor_text(a['x_floor']):>12}"
              f"{floor_text(b['x_floor']):>10}  {verdict}")
    print(f"check: {worse} of {len(common)} rows worse than recorded by more than {tolerance:.0%}, {noisy} too noisy "
          "to tell")
    return worse


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

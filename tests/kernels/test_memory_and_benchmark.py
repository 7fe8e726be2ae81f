"""No hidden N x V copies (allocation counts, not timings) and smoke runs of the benchmark scripts (run.py,
sweeps.py)."""
import importlib.util
import json
import os
import shutil
import types

import pytest
import torch

import rlhfv_kernels as rk
from benchmarks import run as bench
from conftest import skip_unless_backend_runs


def peak_extra_bytes(fn):
    with bench.PeakMemory(torch.device("cpu")) as mem:
        fn()
    return mem.peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_paths_allocate_no_logits_sized_temporaries(dtype):
    logits = torch.randn(8, 64, 4001).to(dtype)
    labels = torch.randint(0, 4001, (8, 64))
    ref = torch.randn(8)
    nbytes = logits.numel() * logits.element_size()

    def step(backend, inplace, x):
        out = rk.ddpo_loss(x, labels, ref, beta=0.5, backend=backend, inplace_backward=inplace)
        (grad,) = torch.autograd.grad(out.loss, x)
        return grad

    leaf = logits.clone().requires_grad_(True)
    x = leaf.view_as(leaf)  # non-leaf, like a model's output logits
    inplace = peak_extra_bytes(lambda: step("cpp", True, x))
    fused = peak_extra_bytes(lambda: step("cpp", False, logits.requires_grad_(True)))
    reference = peak_extra_bytes(lambda: step("eager", False, logits.requires_grad_(True)))
    assert inplace < 0.01 * nbytes, f"inplace backward allocated {inplace} bytes for {nbytes} bytes of logits"
    assert fused < 1.05 * nbytes, f"out-of-place fused step allocated {fused} bytes, more than one gradient buffer"
    assert reference > 2 * nbytes  # the baseline really does materialize log_softmax (checks the measurement)



def test_slicing_the_logits_costs_a_logits_sized_gradient_shifting_the_labels_does_not():
    """The README's advice, measured (allocation bytes, not time): the in-place loss on logits[:, :-1] against
    labels[:, 1:] makes autograd build a full-size gradient for the slice's backward (zeros, then the slice copied in),
    the N x V buffer inplace_backward exists to save; the same loss on all the logits against labels shifted left by
    one (the last position ignored) allocates nothing of that size."""
    batch, length, vocab = 4, 33, 3001
    labels = torch.randint(0, vocab, (batch, length))
    ref = torch.randn(batch)
    leaf = torch.randn(batch, length, vocab).requires_grad_(True)
    logits = leaf.view_as(leaf)  # non-leaf, like a model's output
    nbytes = logits.numel() * logits.element_size()

    def step(scored, targets):
        out = rk.ddpo_loss(scored, targets, ref, beta=0.5, backend="cpp", inplace_backward=True)
        return torch.autograd.grad(out.loss, logits)[0]
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    sliced_peak = peak_extra_bytes(lambda: step(logits[:, :-1], labels[:, 1:]))
    shifted_peak = peak_extra_bytes(lambda: step(logits, shifted))
    assert sliced_peak >= nbytes, f"slicing allocated {sliced_peak} bytes, expected a {nbytes}-byte gradient"
    assert shifted_peak < 0.01 * nbytes, f"shifting the labels allocated {shifted_peak} bytes"

def test_benchmark_quick_run_writes_complete_json(tmp_path):
    path = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    assert bench.main(["--quick", "--no-progress", "--device", "cpu", "--json", str(path), "--plot", str(plot),
                       "--case", "200x777:float32", "--case", "64x501:bfloat16"]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    data = json.loads(path.read_text())
    assert data["versions"]["torch"] == torch.__version__
    assert set(data["load"]) == {"before", "after"} and data["load"]["after"]["cores"] == os.cpu_count()
    assert data["suspect_rows"] == sum(bool(r["suspect"]) for c in data["cases"] for r in c["records"])
    for case in data["cases"]:
        assert case["floor"]["bandwidth_after_bytes_per_s"] > 0 and case["floor"]["drift"] >= 0
        assert case["floor"]["method"] == bench.FLOOR_METHOD
        assert "exp" not in case["floor"]  # no compute-floor yardstick: benchmarks/sweeps.py measures the sweeps
        for r in case["records"]:
            assert r["fwd_bwd_spread"] == pytest.approx(bench.spread(r["fwd_bwd_times_ms"]))
    assert [c["case"]["vocab"] for c in data["cases"]] == [777, 501]
    # TRL is a CPU peer where it is installed (not on the GPU machine: its row is skipped there, and says why)
    trl_here = importlib.util.find_spec("trl") is not None
    impls = [impl for impl in bench.DEFAULT_IMPLS["cpu"] if trl_here or impl != "trl"]
    assert trl_here or "trl" in data["skipped"]
    for case in data["cases"]:
        assert case["floor"]["bandwidth_bytes_per_s"] > 0
        seen = {(r["op"], r["impl"]) for r in case["records"]}
        assert seen == {(op, impl) for impl in impls for op in bench.IMPL_TABLE[impl].ops}
        assert {"reference_compiled", *(["trl"] if trl_here else [])} <= {impl for _, impl in seen}  # the CPU peers
        for r in case["records"]:
            assert r["fwd_bwd_median_ms"] > 0 and r["peak_extra_bytes"] is not None
            assert r["backend"] == {"reference": "eager", "reference_compiled": "eager",
                                    "trl": "trl"}.get(r["impl"], "cpp")
            if r["impl"] != "reference":  # fused gradients agree with the reference's to rounding
                assert r["grad_max_abs_err"] < 1e-2


def test_benchmark_triton_backend_and_unavailable_peers(tmp_path):
    skip_unless_backend_runs("triton")
    path = tmp_path / "bench.json"
    assert bench.main(["--no-progress", "--device", "cpu", "--json", str(path), "--case", "64x300:float32",
                       "--repeats", "1", "--backend", "triton", "--impls", "reference,fused,liger",
                       "--ops", "ddpo_loss", "--no-plot"]) == 0
    data = json.loads(path.read_text())
    assert "liger" in data["skipped"]  # peers run on CUDA only
    (fused,) = [r for r in data["cases"][0]["records"] if r["impl"] == "fused"]
    assert fused["backend"] == "triton" and fused["grad_max_abs_err"] < 1e-5


def test_benchmark_default_is_the_headline_and_ends_in_a_summary(tmp_path, monkeypatch, capsys):
    """No arguments: the device's headline cases and ops only, then one summary row per (case, op) and the plot;
    --full: every op on every case."""
    monkeypatch.setitem(bench.HEADLINE, "cpu", {"cases": ["64x300:float32"], "ops": ["ddpo_loss"]})
    monkeypatch.setitem(bench.FULL_CASES, "cpu", ["32x200:float32"])
    path, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    assert bench.main(["--no-progress", "--device", "cpu", "--repeats", "1", "--json", str(path), "--plot",
                       str(plot), "--impls", "reference,fused"]) == 0
    data = json.loads(path.read_text())
    assert [c["case"]["vocab"] for c in data["cases"]] == [300]
    assert {r["op"] for r in data["cases"][0]["records"]} == {"ddpo_loss"}
    summary = capsys.readouterr().out.split("summary:")[1].splitlines()
    (row,) = [line for line in summary if line.startswith("N=64 V=300")]
    assert "ddpo_loss" in row and row.count("x") >= 2  # speedup and x floor
    assert plot.stat().st_size > 10_000
    assert bench.main(["--full", "--no-progress", "--device", "cpu", "--repeats", "1", "--json", str(path),
                       "--no-plot", "--impls", "reference,fused"]) == 0
    data = json.loads(path.read_text())
    assert [c["case"]["vocab"] for c in data["cases"]] == [200]
    assert {r["op"] for r in data["cases"][0]["records"]} == set(bench.OPS)


def test_the_cpu_kernel_variant_is_the_one_this_cpu_runs_and_every_result_names_it():
    """One build carries AVX-512 (with and without AVX512-BF16), AVX2 and baseline variants of the CPU kernels; which
    one ran decides the speed, so every benchmark result names it (issue 27: 4x less speed on an EPYC without
    AVX-512)."""
    import platform
    from benchmarks import harness
    variant = rk.cpu_kernel_variant()
    if not rk.extension_available():
        assert variant is None
        return
    if platform.machine() == "x86_64" and os.path.exists("/proc/cpuinfo"):
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
        v4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
        v3 = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"} <= flags
        v4_bf16 = v4 and v3 and "avx512_bf16" in flags
        assert variant == ("x86-64-v4 (AVX-512) + AVX512-BF16" if v4_bf16 else "x86-64-v4 (AVX-512)" if v4 and v3
                           else "x86-64-v3 (AVX2, FMA)" if v3 else "x86-64 baseline (SSE2)")
    assert f"{variant} kernels" in harness.device_name(torch.device("cpu"))
    assert harness.versions()["cpu_kernels"] == variant


def test_benchmark_flags_rows_that_contradict_themselves():
    """A forward+backward faster than its forward alone, or repeats spread over half their median: the machine changed
    speed under the row (seen under load: fwd+bwd < fwd, the copy bandwidth drifting 13 -> 6 GB/s in one run)."""
    row = bench.Record(op="ddpo_loss", impl="fused", backend="cpp", tokens=4, vocab=8, shape=[4, 8], dtype="float32",
                       device="cpu", device_name="cpu", fwd_median_ms=2.0, fwd_bwd_median_ms=3.0,
                       fwd_times_ms=[2.0, 2.1, 1.9], fwd_bwd_times_ms=[3.0, 3.1, 2.9])
    assert bench.suspicions(row) == []
    row.fwd_bwd_median_ms = 1.5
    assert bench.suspicions(row) == ["fwd+bwd 1.50 ms < fwd alone 2.00 ms"]
    row.fwd_bwd_median_ms, row.fwd_bwd_times_ms = 3.0, [3.0, 1.0, 4.0]
    assert bench.suspicions(row) == ["fwd+bwd repeats spread 100% of their median"]
    assert bench.spread([5.0]) == 0.0


def _recorded_run(fused_ms, *, suspect=(), drift=0.0, floor_ms=100.0, floor_method=bench.FLOOR_METHOD):
    record = lambda impl, ms, flagged=(): {"op": "ddpo_loss", "impl": impl, "fwd_bwd_median_ms": ms,
                                           "suspect": list(flagged)}
    floor = {"floor_fwd_bwd_ms": floor_ms, "drift": drift}
    if floor_method is not None:
        floor["method"] = floor_method
    return {"device_name": "test", "versions": {"git_commit": "abc"}, "cases": [{
        "case": {"tokens": 4096, "vocab": 32000, "dtype_name": "float32"},
        "floor": floor,
        "records": [record("reference", 1000.0), record("fused", fused_ms, suspect)]}]}


def test_benchmark_check_compares_ratios_not_times(capsys):
    """--check: a row is worse when its speedup over eager fell (or its distance to the floor grew) by more than the
    tolerance; a row this run flagged is noisy, not worse; absolute times never enter."""
    recorded = _recorded_run(200.0)  # 5x eager, 2x floor
    assert bench.check_against(_recorded_run(210.0), recorded, 0.3) == 0
    assert bench.check_against(_recorded_run(400.0), recorded, 0.3) == 1  # 2.5x eager: half the speedup lost
    assert "WORSE" in capsys.readouterr().out
    assert bench.check_against(_recorded_run(400.0, suspect=["spread"]), recorded, 0.3) == 0
    assert bench.check_against(_recorded_run(400.0, drift=0.6), recorded, 0.3) == 0
    assert "noisy: rerun" in capsys.readouterr().out
    # the same speedup at twice the distance to the floor (4x): worse, unless the recorded floor was measured another
    # way (the copy before FLOOR_METHOD), whose x floor is not comparable and is left out
    assert bench.check_against(_recorded_run(200.0, floor_ms=50.0), recorded, 0.3) == 1
    assert bench.check_against(_recorded_run(200.0, floor_ms=50.0), _recorded_run(200.0, floor_method=None), 0.3) == 0
    other = _recorded_run(200.0)
    other["cases"][0]["case"]["vocab"] = 128256
    with pytest.raises(SystemExit, match="no \\(case, op, impl\\) row of this run is in the recorded one"):
        bench.check_against(other, recorded, 0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_benchmark_floor_pass_leaves_the_logits_as_they_were(dtype):
    """The floor's in-place pass runs on the benchmark's own logits: every bit, NaN payloads and -0.0 included, must
    be as before, and it measures a bandwidth."""
    logits = torch.randn(3, 5, 257).to(dtype)
    logits[0, 0, :4] = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf")])
    before = logits.clone()
    args = types.SimpleNamespace(warmup=1, repeats=2)
    floor = bench.bandwidth_floor({"logits": logits}, torch.device("cpu"), args)
    assert torch.equal(logits.view(torch.uint8), before.view(torch.uint8))
    assert floor["method"] == bench.FLOOR_METHOD and floor["bandwidth_bytes_per_s"] > 0
    assert len(floor["pass_times_ms"]) == bench.FLOOR_REPEATS and floor["pass_min_ms"] == min(floor["pass_times_ms"])
    assert floor["floor_fwd_bwd_ms"] == pytest.approx(1.5 * floor["pass_min_ms"])


def test_benchmark_check_refuses_an_unreadable_record(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    for path in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(SystemExit):
            bench.main(["--quick", "--no-progress", "--no-plot", "--check", str(path)])
        assert f"--check: cannot read {path}" in capsys.readouterr().err


def test_benchmark_rejects_bad_case():
    with pytest.raises(SystemExit):
        bench.main(["--case", "4096:float32"])
    with pytest.raises(SystemExit):
        bench.main(["--ops", "nope"])


def test_trl_step_benchmark_runs_every_contestant(tmp_path):
    pytest.importorskip("trl")
    from benchmarks import trl_step
    out = tmp_path / "trl.json"
    assert trl_step.main(["--vocab", "3000", "--pairs", "4", "--answer-words", "6", "--repeats", "1",
                          "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["versions"]["trl"]
    for trainer in ("dpo", "grpo"):
        assert set(data[trainer]) == set(trl_step.CONTESTANTS)
        assert all(r["step_median_ms"] > 0 and r["peak_extra_bytes"] > 0 for r in data[trainer].values())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_sweeps_benchmark_times_every_sweep_at_every_level(tmp_path, capsys):
    """benchmarks/sweeps.py builds the chunk sweeps alone and times each at every level this CPU runs: every sweep a
    forward+backward path names has a time, and each path's per-logit sum is the sum of its sweeps."""
    from benchmarks import sweeps
    path = tmp_path / "sweeps.json"
    assert sweeps.main(["--reps", "20", "--case", "8x1000", "--threads", "2", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    variants = list(data["ns_per_logit"])
    if rk.extension_available():
        assert variants[0] == rk.cpu_kernel_variant()  # the first column is what this CPU runs by default
    if variants[0].startswith("x86-64-v4"):  # then every lower x86-64 level runs here too
        assert variants[-2:] == ["x86-64-v3 (AVX2, FMA)", "x86-64 baseline (SSE2)"]
    for variant in variants:
        times = data["ns_per_logit"][variant]
        assert all(times[s] > 0 for sweeps_of_path in sweeps.PATHS.values() for s in sweeps_of_path)
        for name, sweeps_of_path in sweeps.PATHS.items():
            assert data["fwd_bwd_ns_per_logit"][variant][name] == pytest.approx(sum(times[s] for s in sweeps_of_path))
    out = capsys.readouterr().out
    assert "ms at N=8 V=1000 on 2 threads" in out and all(f"\n{name} " in out for name in sweeps.PATHS)
    with pytest.raises(SystemExit):
        sweeps.main(["--case", "8by1000"])

"""Every Triton kernel, in every configuration its launchers can pick, compiles ahead of time for sm_80 and sm_90
(bf16/fp16/fp32) without register spills, within the target's shared memory and register file, and the logits
kernels' aligned variants use 16-byte global loads (and stores, backward). Checked with two triton releases: the one
a CUDA torch 2.13 wheel pins (requirements.txt, this venv), in bf16 and fp32, and the newest (scripts/setup.sh puts
it in .venv/triton-latest), in bf16: every kernel, config and variant. RLHFV_AOT_FULL=1 adds fp16 to the pinned one
and fp16/fp32 to the newest; CI leaves them out for time (fp16 is bf16's code with another 16-bit element type, and
the longest dtype after it: ~53 s of the pinned check's ~140 s alone). The checker is tests/gpu_verify/triton_aot.py;
no GPU is needed.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_at_once

from rlhfv_kernels.triton import linear_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKER = os.path.join(ROOT, "tests", "gpu_verify", "triton_aot.py")
LATEST = os.path.join(ROOT, ".venv", "triton-latest")
TARGETS, DTYPES = (80, 90), ("bf16", "fp16", "fp32")
# release: (its site folder, the dtypes checked)
FULL = bool(os.environ.get("RLHFV_AOT_FULL"))
RELEASES = {"pinned": (None, DTYPES if FULL else ("bf16", "fp32")), "latest": (LATEST, DTYPES if FULL else ("bf16",))}


def _env(site):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """{release: (exit status, output, report)}; both releases compile at once."""
    out = tmp_path_factory.mktemp("aot")
    commands = {release: ([sys.executable, CHECKER, "--json", str(out / f"{release}.json"), "--dtypes",
                           ",".join(dtypes)], _env(site))
                for release, (site, dtypes) in RELEASES.items() if not site or os.path.isdir(site)}
    results = {}
    for release, (status, output) in run_at_once(commands, timeout=1200).items():
        path = out / f"{release}.json"
        results[release] = (status, output, json.loads(path.read_text()) if path.exists() else None)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("release", list(RELEASES))
def test_every_kernel_config_compiles_within_gpu_limits(reports, release):
    if release not in reports:
        if os.environ.get("CI"):
            pytest.fail(f"{LATEST} is missing: scripts/setup.sh installs the newest triton there")
        pytest.skip(f"{LATEST} is missing (run scripts/setup.sh)")
    status, output, report = reports[release]
    failed = [line for line in output.splitlines() if line.split() and not line.endswith(" ok")][2:]
    assert status == 0 and report is not None, f"triton ({release}):\n" + "\n".join(failed[-60:])
    rows, dtypes = report["rows"], RELEASES[release][1]
    # Every kernel was compiled for every target and dtype (a checker that silently compiled nothing would pass).
    for kernel in ("logprob_fwd", "logprob_bwd", "linear_fwd", "linear_bwd"):
        for sm in TARGETS:
            for dt in dtypes:
                assert any(r["kernel"] == kernel and r["sm"] == sm and r["dtype"] == dt for r in rows), \
                    f"no {kernel} {dt} sm_{sm} case compiled"
    # Every fused-linear tile the autotuner may pick was among them.
    for (which, operand, family), configs in linear_kernels.LINEAR_CONFIGS.items():
        dt = "fp32" if operand in ("tf32", "ieee") else "bf16"
        if dt not in dtypes:
            continue
        for c in configs:
            tile = f"{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_V']}x{c.kwargs['BLOCK_H']} w{c.num_warps} s{c.num_stages}"
            assert any(r["kernel"] == f"linear_{which}" and r["sm"] == family and r["dtype"] == dt and
                       r["config"].startswith(tile) for r in rows), f"{which} {operand} sm_{family} {tile} unchecked"
    # The vector check tells aligned from unaligned launches: 16-byte accesses only where VEC > 1.
    logits = [r for r in rows if r["kernel"].startswith("logprob")]
    assert all(r["vector_loads"] > 0 for r in logits if "VEC=1 " not in r["config"])
    assert all(r["vector_stores"] > 0 for r in logits if r["kernel"] == "logprob_bwd" and "VEC=1 " not in r["config"])
    assert all(r["vector_loads"] == 0 and r["vector_stores"] == 0 for r in logits if "VEC=1 " in r["config"])


def test_checker_fails_on_an_oversized_tile():
    """A backward tile too big for 4 warps and for sm_8x shared memory (64x256x64, 3 stages): the check says both."""
    proc = subprocess.run([sys.executable, CHECKER, "--targets", "80", "--dtypes", "bf16", "--only",
                           r"linear_bwd 64x256x64 w4 s3 bias=0 bf16", "--add-linear-config", "bwd:64x256x64:w4:s3"],
                          env=_env(None), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "SPILLS SMEM>101376" in proc.stdout and "1 compiled, 1 failed" in proc.stdout, proc.stdout


def test_fp32_dots_follow_torch_matmul_precision():
    """fp32 operands multiply in full precision unless the user allows TF32, as torch.matmul does."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert linear_kernels.operand_class(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert linear_kernels.operand_class(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    assert linear_kernels.operand_class(torch.bfloat16) == "16bit"
    assert [linear_kernels.gpu_family(c) for c in ((8, 0), (8, 9), (9, 0), (10, 0), (12, 0))] == [80, 80, 90, 90, 80]


def test_autotuner_offers_only_the_checked_tiles_of_the_launch(monkeypatch):
    """On a GPU the autotuner prunes to LINEAR_CONFIGS[(kernel, operand, family)] of the launch (run here with a
    pretended device capability: on CPU the interpreter has one config and never prunes)."""
    prune = linear_kernels._prune("bwd")
    for capability, family in (((8, 6), 80), ((9, 0), 90)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        for dtype, precision, operand in ((torch.bfloat16, "ieee", "16bit"), (torch.float32, "tf32", "tf32"),
                                          (torch.float32, "ieee", "ieee")):
            chosen = prune([], {"h_ptr": torch.empty(1, dtype=dtype)}, INPUT_PRECISION=precision, HAS_BIAS=False,
                           CAPPED=False)
            assert chosen == linear_kernels.LINEAR_CONFIGS[("bwd", operand, family)]
            capped = prune([], {"h_ptr": torch.empty(1, dtype=dtype)}, INPUT_PRECISION=precision, HAS_BIAS=False,
                           CAPPED=True)
            assert capped and capped == linear_kernels.configs_for("bwd", operand, family, capped=True)
            spilling = linear_kernels.SPILL_WITH_SOFTCAP.get(("bwd", operand, family), [])
            assert not any(linear_kernels._shape(c) in spilling for c in capped)
            for cap in (False, True):  # the entropy variants: their own exclusions and extra tiles
                entropy = prune([], {"h_ptr": torch.empty(1, dtype=dtype)}, INPUT_PRECISION=precision,
                                HAS_BIAS=False, CAPPED=cap, ENTROPY=True)
                assert entropy == linear_kernels.configs_for("bwd", operand, family, cap, entropy=True)
                spilling = linear_kernels.SPILL_WITH_ENTROPY.get(("bwd", operand, family, cap), [])
                assert len(entropy) >= 2 and not any(linear_kernels._shape(c) in spilling for c in entropy)
    # Every excluded tile is one of the table's (a stale entry would exclude nothing) and each kind keeps some.
    for key, shapes in linear_kernels.SPILL_WITH_SOFTCAP.items():
        table = [linear_kernels._shape(c) for c in linear_kernels.LINEAR_CONFIGS[key]]
        assert all(shape in table for shape in shapes) and len(table) > len(shapes), key
    for key, shapes in linear_kernels.SPILL_WITH_ENTROPY.items():
        table = [linear_kernels._shape(c) for c in linear_kernels.LINEAR_CONFIGS[key[:3]]
                 + linear_kernels.ENTROPY_CONFIGS.get(key[:3], [])]
        assert all(shape in table for shape in shapes), key
        assert len(linear_kernels.configs_for(*key, entropy=True)) >= 2, key

"""scripts/gpu_session.sh, the one device call of a GPU lease, rehearsed on the CPU (RLHFV_GPU_REHEARSAL=1: the same
steps, CPU targets, tiny cases), so that it runs the day a GPU is lent: every step ends ok and leaves its result in
$OUT, and the time budget skips what no longer fits instead of overrunning the lease."""
import glob
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_session.sh")
STEPS = ["env", "peers", "build", "kernels", "bench-logits", "bench-linear", "bench-trainer", "tests", "bench-rest"]


def rehearse(out, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RLHFV_TEST_SEED")}
    environ.update(OUT=str(out), PYTHON=sys.executable, RLHFV_GPU_REHEARSAL="1", **env)
    done = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=960, cwd=ROOT, env=environ)
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    return done, {name: status for name, status, _ in rows}


@pytest.mark.slow
def test_the_rehearsal_runs_every_step_and_leaves_each_result(tmp_path):
    done, steps = rehearse(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert list(steps) == STEPS, steps
    wheels = bool(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    assert all(status == "ok" for name, status in steps.items() if name != "peers"), steps
    assert steps["peers"] == ("ok" if wheels else "skipped: no .whl/ wheels")
    assert "torch" in (tmp_path / "env.txt").read_text()
    peers = (tmp_path / "peers.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in peers] == ["liger-kernel", "cut-cross-entropy", "trl"], peers
    assert all(line.endswith(": importable") or ": skipped (" in line for line in peers), peers
    suite = ET.parse(tmp_path / "kernels.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 50 and suite.get("failures") == "0" and suite.get("errors") == "0"
    for name in ("bench-logits", "bench-linear", "bench-trainer", "bench-packing"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result, name


def test_the_budget_skips_what_no_longer_fits(tmp_path):
    done, steps = rehearse(tmp_path, RLHFV_GPU_BUDGET_S="22")
    assert steps["env"] == "ok" and steps["build"] == "skipped: out of time", steps
    assert done.returncode != 0 and (tmp_path / "env.txt").exists()

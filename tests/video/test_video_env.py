"""Runs tests/video/test_video_records.py where transformers' video processors work: in .venv/video
(scripts/video_env.sh: a torch + torchvision pair that imports together; this suite's own torch is the CPU wheel,
beside which PyPI's torchvision does not import). The repository's Python sources are copied without the compiled
extension (built for this suite's torch), and the kernels run as the eager oracle there. RLHFV_SKIP_VIDEO_ENV=1 skips
it (a machine that cannot install that pair)."""
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_video_records_in_a_torchvision_environment(tmp_path):
    if os.environ.get("RLHFV_SKIP_VIDEO_ENV") == "1":
        pytest.skip("RLHFV_SKIP_VIDEO_ENV=1")
    if "torchvision" in sys.modules or _imports_torchvision():
        pytest.skip("torchvision imports here: tests/video/test_video_records.py runs in this suite itself")
    built = subprocess.run(["bash", os.path.join(ROOT, "scripts", "video_env.sh")], cwd=ROOT, capture_output=True,
                           text=True, timeout=1200)
    assert built.returncode == 0, f"scripts/video_env.sh failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
    with tarfile.open(tmp_path / "sources.tar", "w") as tar:  # the sources, without the compiled extension
        for part in ("rlhfv_kernels", "rlhfv_train", "tests", "docs", "pytest.ini"):
            tar.add(os.path.join(ROOT, part), part, filter=_without_builds)
    with tarfile.open(tmp_path / "sources.tar") as tar:
        tar.extractall(tmp_path / "repo", filter="data")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PYTHON"))}
    env["RLHFV_BACKEND"] = "eager"
    run = subprocess.run([os.path.join(ROOT, ".venv", "video", "bin", "python"), "-m", "pytest", "-q",
                          "-p", "no:cacheprovider", "tests/video/test_video_records.py"],
                         cwd=tmp_path / "repo", env=env, capture_output=True, text=True, timeout=1200)
    print(run.stdout[-5000:])
    assert run.returncode == 0, f"the video tests failed in .venv/video:\n{run.stdout[-8000:]}\n{run.stderr[-3000:]}"
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def _imports_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # PyPI's torchvision beside the CPU wheel raises RuntimeError, not ImportError
        return False
    return True


def _without_builds(info):
    name = os.path.basename(info.name)
    return None if name.endswith(".so") or name == "__pycache__" or name.endswith(".pyc") else info

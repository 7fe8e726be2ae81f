"""CMakeLists.txt builds the same extension as setup.py, and the module it builds works."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cuda_arguments() -> list[str]:
    """A CUDA torch's CMake config (Caffe2Config) needs a whole CUDA toolkit, its libraries included; the toolkit
    here may have only nvcc and the runtime (this machine's: no nvrtc). Skips where none is whole."""
    if torch.version.cuda is None:
        return []
    sys.path.insert(0, ROOT)
    import setup
    for home in filter(setup._has_headers, [os.environ.get("CUDA_HOME", ""), *setup._toolkit_folders()]):
        if any(os.path.exists(os.path.join(home, lib, "libnvrtc.so")) for lib in ("lib64", "lib")):
            return [f"-DCUDA_TOOLKIT_ROOT_DIR={home}", f"-DCMAKE_CUDA_COMPILER={os.path.join(home, 'bin', 'nvcc')}"]
    pytest.skip(f"torch {torch.__version__} is a CUDA build: its CMake config needs a CUDA toolkit with its libraries "
                "(libnvrtc), and none here has them")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_and_load(tmp_path):
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                    "-DCMAKE_BUILD_TYPE=Release", *cuda_arguments()], check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True, text=True)
    libs = [p for p in os.listdir(build) if p.startswith("_C") and p.endswith(".so")]
    assert libs, os.listdir(build)
    # A fresh interpreter that never imports rlhfv_kernels (whose own _C registers the same operators).
    script = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({str(build / libs[0])!r})
        x = torch.randn(5, 300, dtype=torch.float64)
        y = torch.randint(0, 300, (5,))
        logp, lse = torch.ops.rlhfv.logprob_fwd(x, y, -100, 1.0, 0.0, False)
        expected = torch.log_softmax(x, -1).gather(1, y[:, None])[:, 0]
        assert torch.allclose(logp, expected, atol=1e-12), (logp, expected)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr

"""Test setup: fresh random inputs every run (seed printed on failure); Triton's CPU interpreter on machines without
a GPU, so the Triton kernels run on CPU tensors there (on a GPU machine they compile for the GPU instead and the
CPU-tensor Triton cases skip).

The kernel suites take the fixtures `backend` (logits path) and `linear_backend` (fused-linear path): one case per
(backend, device) pair of the backend table (rlhfv_kernels/_backend.py), e.g. cpp-cpu, triton-cpu, triton-cuda,
cuda-cuda. A case runs with its device as torch's default device, so the tests' inputs are created there; a pair that
cannot run on this machine skips with the reason.
"""
import os
import random
import signal
import subprocess
import threading

import pytest

# Under pytest-xdist two workers of 2 torch threads each share 2 cores. With OpenMP's default wait policy an idle
# thread spins, and the tiny models' many small parallel ops then crawl: the quick prior study took 37 s alone,
# 167 s beside a 2-thread neighbour, 34 s with PASSIVE (threads sleep instead). It must be set before torch loads
# libgomp; the xdist workers and every subprocess the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any @triton.jit (DESIGN.md §5)

# Under pytest-xdist (the README's -n logical), the workers share the cores: each gets its share of torch's threads,
# never fewer than 2, so the CPU kernels' parallel paths still run split across threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(2, (os.cpu_count() or 2) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


from rlhfv_kernels import _backend  # noqa: E402  (after TRITON_INTERPRET is set)


def skip_unless_backend_runs(backend: str, device: str = "cpu", *, module: bool = False, path: str = "logits") -> None:
    reason = _backend.why_unavailable(backend, torch.device(device), path)
    if reason is not None:
        pytest.skip(f"backend {backend!r} on {device}: {reason}", allow_module_level=module)


def _on_target(request, path):
    backend, device = request.param
    skip_unless_backend_runs(backend, device, path=path)
    with torch.device(device):
        yield backend


def run_at_once(commands: dict, timeout: float, **popen) -> dict:
    """{name: (argv, env)} -> {name: (exit status, stdout and stderr)}: every command started before any is waited
    for, so they share the cores (communicate, in turn: a long report cannot fill a pipe and stall its process)."""
    running = {name: subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      **popen) for name, (argv, env) in commands.items()}
    results = {}
    for name, proc in running.items():
        output = proc.communicate(timeout=timeout)[0]
        results[name] = (proc.returncode, output)
    return results


def gpu_sizes_only() -> None:
    """Cases at real GPU sizes: the CPU targets cover the same code paths at small sizes (the interpreter would take
    hours), so they skip there."""
    if torch.get_default_device().type != "cuda":
        pytest.skip("a GPU-size case; the CPU targets cover this path at small sizes")


@pytest.fixture(params=[pytest.param(t, id="-".join(t)) for t in _backend.targets("logits")])
def backend(request):
    """A fused backend of the logits path, with its device as the default device."""
    yield from _on_target(request, "logits")


@pytest.fixture(params=[pytest.param(t, id="-".join(t)) for t in _backend.targets("linear")])
def linear_backend(request):
    """A fused backend of the fused-linear path, with its device as the default device."""
    yield from _on_target(request, "linear")


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Seeds torch from RLHFV_TEST_SEED if set, else at random; the seed is shown in the report of a failure."""
    seed = int(os.environ.get("RLHFV_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.fixture(autouse=True)
def per_test_timeout():
    """RLHFV_TEST_TIMEOUT_S (scripts/gpu_session.sh sets it): a test running longer fails with TimeoutError instead of
    eating a GPU lease (checked between Python bytecodes: a kernel that never returns is left to the step's limit)."""
    seconds = int(os.environ.get("RLHFV_TEST_TIMEOUT_S", "0"))
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"the test ran past RLHFV_TEST_TIMEOUT_S = {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"reproduce with RLHFV_TEST_SEED={seeds[0]}"))


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """40 synthetic scene records (seed 5) as a JSONL file with its images: the trainers' tests' data, read only (a
    module that needs other data defines its own `dataset`). Kept here, not in a tests/train/conftest.py: the kernel
    tests import helpers `from conftest`, which a second conftest module would shadow."""
    from rlhfv_train.data import synthetic
    return synthetic.generate(str(tmp_path_factory.mktemp("scenes")), 40, seed=5)


@pytest.fixture(scope="session", autouse=True)
def private_torch_extensions(tmp_path_factory):
    """DeepSpeed JIT-builds its CPU shared-memory op into torch's extension folder under a lock file. A process killed
    mid-build leaves the lock behind, and every later DeepSpeed start on the machine waits on it for ever (a CI run
    hung 2 x 600 s on one left by a killed local run). Each test session builds into its own folder, which its xdist
    workers share (a few seconds' compile)."""
    session = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        session = session.parent  # the worker's basetemp is <session>/popen-gwN
    os.environ["TORCH_EXTENSIONS_DIR"] = str(session / "torch_extensions")


def pytest_configure(config):
    # pytest-xdist reorders files by their number of tests unless told not to; that put the longest file (the AOT
    # check, 3 tests) last, alone for 12 minutes. Keep pytest_collection_modifyitems' order.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    """The files holding slow tests run first: under pytest-xdist (--dist loadfile) a file runs whole on one worker,
    and a long one started last would keep the run going while the other cores idle."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: each file keeps its own order

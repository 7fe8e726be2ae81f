"""Test setup: fresh random inputs every run (seed printed on failure); Triton's CPU interpreter on machines without
a GPU, so the Triton kernels run on CPU tensors there (on a GPU machine they compile for the GPU instead and the
CPU-tensor Triton cases skip)."""
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any @triton.jit (DESIGN.md §5)


def skip_unless_backend_runs(backend: str, device: str = "cpu", *, module: bool = False) -> None:
    from rlhfv_kernels import _backend
    reason = _backend._why_unavailable(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {backend!r} on {device}: {reason}", allow_module_level=module)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Seeds torch from RLHFV_TEST_SEED if set, else at random; the seed is shown in the report of a failure."""
    seed = int(os.environ.get("RLHFV_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"reproduce with RLHFV_TEST_SEED={seeds[0]}"))

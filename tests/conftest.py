"""Test setup: fresh random inputs every run (seed printed on failure), Triton's CPU interpreter switched on."""
import os
import random

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any @triton.jit (DESIGN.md §5)

import pytest  # noqa: E402
import torch  # noqa: E402


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

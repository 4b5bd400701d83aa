"""Shared test set-up: every test is seeded and runs with Pyro validation on.

The tests' networks are tiny, where torch's intra-op threads cost more than they give (a 5× slow-down was measured
on a loaded 2-core machine), so the test process uses one thread. Subprocesses and notebooks keep their defaults.
"""

import pyro
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _threads_restored():
    """fit(threads=N) and the command line set torch's process-wide thread count; every test gets the suite's back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seeded_and_validated():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield


@pytest.fixture
def float64():
    """Run a test in float64 (the reference precision), restoring the default dtype afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

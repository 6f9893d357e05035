"""Shared fixtures. Prefect fixtures start a real (temporary) Prefect server, once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_harness():
    """A real temporary Prefect server + database for flow tests (about 15-20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a whole test module (`pytestmark = usefixtures(...)`).

    On the shared 2-core machine two OpenMP threads can run 10x slower; a fork of a process
    whose OpenMP pool has run hangs in its first parallel region unless it uses one thread; and
    the same kernels in parent and forks keep killed-and-resumed runs comparable bit for bit.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

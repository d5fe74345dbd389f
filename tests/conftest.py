"""Session-wide test fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _stop_worker_pools():
    """The multi-process tests share long-lived worker pools (tests/dist_harness.py); stop them when the session ends
    (an atexit hook does it too, for runs outside pytest)."""
    yield
    from tests import dist_harness

    shutdown = getattr(dist_harness, "shutdown_pools", None)  # absent if a run swaps in another harness
    if shutdown is not None:
        shutdown()

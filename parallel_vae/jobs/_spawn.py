"""Start processes and wait for them with one deadline: the shared piece of the test harness and the benchmark."""

from __future__ import annotations

import time


def run_with_deadline(procs: list, timeout: float) -> list[int]:
    """Start ``procs`` (multiprocessing Processes), join them all within ``timeout`` seconds, kill any still alive.

    Returns the indices of the processes that had to be killed: a hang (a collective that never completes) becomes
    a list the caller reports, never a blocked caller.
    """
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return hung

"""Spawned multi-process runs for tests: gloo on CPU, one thread per rank, every rank's result or error returned.

A rank that raises is reported with its exception type and message (so tests can assert that *every* rank raised
the same clear error); a run that does not finish within ``timeout`` seconds is killed and reported as a hang.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from parallel_vae.jobs._spawn import run_with_deadline


@dataclass
class RankResult:
    rank: int
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None


def _entry(fn, rank, world, tmpdir, args, threads):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    out = RankResult(rank)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(tmpdir, 'store')}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=90),
        )
        out.value = fn(rank, world, *args)
    except BaseException as e:  # report everything, including collective timeouts
        out.error_type, out.error, out.traceback = type(e).__name__, str(e), traceback.format_exc()
    with open(os.path.join(tmpdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


def run_ranks(fn: Callable, world: int, *args, timeout: float = 240, threads: int = 1) -> list[RankResult]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned gloo ranks; return each rank's :class:`RankResult`."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmpdir:
        procs = [ctx.Process(target=_entry, args=(fn, r, world, tmpdir, args, threads)) for r in range(world)]
        hung = run_with_deadline(procs, timeout)
        if hung:
            raise TimeoutError(f"ranks {hung} of {world} did not finish within {timeout}s (hang)")
        results = []
        for r in range(world):
            path = os.path.join(tmpdir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            with open(path, "rb") as f:
                results.append(pickle.load(f))
        return results


def values(results: list[RankResult]) -> list[Any]:
    """The values of a run in which every rank must have succeeded (else the first error with its traceback)."""
    for res in results:
        if not res.ok:
            raise AssertionError(f"rank {res.rank} raised {res.error_type}: {res.error}\n{res.traceback}")
    return [res.value for res in results]

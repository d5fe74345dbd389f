"""Multi-process runs for tests: gloo on CPU, one thread per rank, every rank's result or error returned.

A rank that raises is reported with its exception type and message (so tests can assert that *every* rank raised
the same clear error); a run that does not finish within ``timeout`` seconds is killed and reported as a hang.

Worker pools
------------
Spawning a rank costs ~5 s (importing torch and diffusers, initialising gloo), more than most tasks. So by default
:func:`run_ranks` runs the task on a pool of ``world`` long-lived worker processes, one pool per world size, started
on first use and kept for the pytest session (``tests/conftest.py`` and an atexit hook shut them down). Each worker
spawns once, joins one gloo group (file store in its own temp dir, 90 s collective timeout), then runs one task
after another: ``fn(rank, world, *args)``, with ``fn`` and ``args`` pickled by reference as for a spawned process.

What a pooled task can count on, as in a fresh process:

* before each task: ``torch.set_num_threads(threads)``; the default dtype float32; grad mode on; deterministic
  algorithms and anomaly detection off; the global CPU RNG seeded as a new process's is (a random seed with this
  torch, the fixed default seed with a torch that has one), so no task sees the seed a previous task set;
  ``os.environ`` set to the caller's environment at the time of the call (plus ``OMP_NUM_THREADS=threads`` if
  unset); the working directory set to the caller's.
* every rank runs every task, so collective calls such as ``dist.new_group`` stay consistent across tasks; groups
  made by a task are left alive (they are cheap and tasks never reuse them).
* after a task in which any rank raised (its collectives may be mismatched), after a hang (no answer within
  ``timeout``: the pool is killed and ``TimeoutError`` raised), after a worker died (``RuntimeError``) and after
  the caller was interrupted (e.g. by pytest-timeout), the pool is discarded; the next call starts a fresh one.

What leaks from one task to the next (not reset): module-level globals and caches of imported modules (including
test modules imported to unpickle ``fn``), monkeypatches made inside a task, Python's ``random``/numpy RNG state,
threads a task left running, ``torch.set_num_interop_threads``, process groups a task made, environment variables
read only at import time (e.g. by torch or gloo), and memory the allocator keeps; atexit handlers a task registers
never run (workers leave with ``os._exit`` once their group is destroyed). A task that depends on any of
these, or that tests hangs, timeouts, killed ranks or process start-up, must use ``run_ranks(..., fresh=True)``:
new processes for that call only, exactly as before pools existed.
"""

from __future__ import annotations

import atexit
import datetime
import multiprocessing as mp
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable

from parallel_vae.jobs._spawn import run_with_deadline

GLOO_TIMEOUT_S = 90
_OLD_DEFAULT_SEED = 67280421310721  # torch's fixed seed of a new process in the versions that had one


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


def _init_group(rank: int, world: int, tmpdir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(tmpdir, 'store')}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S),
    )


def _destroy_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


def _failed(out: RankResult, e: BaseException) -> RankResult:
    out.error_type, out.error, out.traceback = type(e).__name__, str(e), traceback.format_exc()
    return out


# ----------------------------------------------------------------------------------------------------- fresh=True


def _entry(fn, rank, world, tmpdir, args, threads):
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    out = RankResult(rank)
    try:
        _init_group(rank, world, tmpdir)
        out.value = fn(rank, world, *args)
    except BaseException as e:  # report everything, including collective timeouts
        _failed(out, e)
    with open(os.path.join(tmpdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)
    _destroy_group()


def _run_fresh(fn: Callable, world: int, args: tuple, timeout: float, threads: int) -> list[RankResult]:
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


# ---------------------------------------------------------------------------------------------------------- pools


def _reset_state(torch, seed: int, threads: int, env: dict, cwd: str) -> None:
    """What a fresh process would have (see the module docstring for what is not reset)."""
    os.environ.clear()
    os.environ.update(env)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        os.chdir(cwd)
    except OSError:
        pass
    torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    torch.use_deterministic_algorithms(False)
    torch.autograd.set_detect_anomaly(False)
    if seed == _OLD_DEFAULT_SEED:
        torch.manual_seed(seed)  # a torch that starts every process with this fixed seed
    else:
        torch.seed()  # one that starts every process with a random seed


def _worker(rank: int, world: int, tmpdir: str, conn, threads: int) -> None:
    """A pool worker: join the group once, then run tasks until told to stop (or the parent goes away)."""
    import torch

    seed = torch.initial_seed()  # how a fresh process is seeded: restored (fixed) or redrawn (random) per task
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    init_error = None
    try:
        _init_group(rank, world, tmpdir)
    except BaseException as e:  # reported as this rank's result of every task (the pool is then replaced)
        init_error = _failed(RankResult(rank), e)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError, KeyboardInterrupt):  # the parent is gone, or Ctrl-C
            break
        if not message:  # shutdown
            break
        out = RankResult(rank)
        if init_error is not None:
            out = init_error
        else:
            try:
                fn, args, task_threads, env, cwd = pickle.loads(message)
                _reset_state(torch, seed, task_threads, env, cwd)
                out.value = fn(rank, world, *args)
            except BaseException as e:  # report everything, including collective timeouts
                _failed(out, e)
        try:
            data = pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as e:  # an unpicklable value: report it instead of dying
            data = pickle.dumps(_failed(RankResult(rank), e), protocol=pickle.HIGHEST_PROTOCOL)
        del out
        try:
            conn.send_bytes(data)
        except (EOFError, OSError):
            break
    _destroy_group()
    # Leave without the interpreter's teardown of torch & co (seconds on a loaded machine, nothing to save).
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(0)


class _Pool:
    """``world`` spawned workers sharing one gloo group."""

    def __init__(self, world: int, threads: int):
        self.world = world
        self.tmpdir = tempfile.mkdtemp(prefix=f"pv-pool{world}-")
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        self._sender: threading.Thread | None = None
        try:
            for r in range(world):
                parent_end, child_end = ctx.Pipe(duplex=True)
                p = ctx.Process(target=_worker, args=(r, world, self.tmpdir, child_end, threads), name=f"pv-pool{world}-rank{r}")
                p.start()
                child_end.close()
                self.conns.append(parent_end)
                self.procs.append(p)
        except BaseException:
            self.kill()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def run(self, payload: bytes, timeout: float) -> tuple[list[RankResult], bool]:
        """Run one pickled task on every rank; return (results, whether the pool is still usable). Raises (with the
        pool killed) on a hang or a dead worker."""
        deadline = time.monotonic() + timeout
        # Sent from a thread: a large payload blocks until a worker reads it (after its start-up, if still
        # starting), and that wait must count against the deadline. A worker that is gone shows up below.
        self._sender = threading.Thread(target=self._send_all, args=(payload,), daemon=True)
        self._sender.start()
        raw: list[bytes | None] = [None] * self.world
        pending = set(range(self.world))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            waitables = [self.conns[r] for r in pending] + [self.procs[r].sentinel for r in pending]
            wait(waitables, timeout=remaining)
            for r in sorted(pending):
                if self.conns[r].poll():
                    try:
                        raw[r] = self.conns[r].recv_bytes()
                    except (EOFError, OSError):
                        self._died(r)
                    pending.discard(r)
                elif not self.procs[r].is_alive():
                    self._died(r)
        if pending:
            self.kill()
            raise TimeoutError(f"ranks {sorted(pending)} of {self.world} did not finish within {timeout}s (hang)")
        results = [pickle.loads(b) for b in raw]
        return results, all(res.ok for res in results)

    def _send_all(self, payload: bytes) -> None:
        for conn in list(self.conns):
            try:
                conn.send_bytes(payload)
            except (EOFError, OSError, ValueError):  # dead worker, or the pool was killed meanwhile
                pass

    def _died(self, r: int):
        p = self.procs[r]
        p.join(5)
        code = p.exitcode
        self.kill()
        raise RuntimeError(f"rank {r} died without a result (exit code {code})")

    def close(self, timeout: float = 10) -> None:
        """Ask the workers to leave (they destroy their group); kill any that do not within ``timeout``."""
        for conn in self.conns:
            try:
                conn.send_bytes(b"")
            except (EOFError, OSError):
                pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join()
        if self._sender is not None:  # unblocked by the workers' deaths; then nothing else uses the pipes
            self._sender.join(10)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
        shutil.rmtree(self.tmpdir, ignore_errors=True)


_pools: dict[int, _Pool] = {}


def pool_pids(world: int) -> list[int] | None:
    """The worker pids of the live pool of ``world`` ranks (None if there is none): for tests of the pool."""
    pool = _pools.get(world)
    return pool.pids if pool is not None else None


def shutdown_pools() -> None:
    """Stop every pool (the pytest session's end and interpreter exit call this; safe to call twice)."""
    while _pools:
        _, pool = _pools.popitem()
        pool.close()


atexit.register(shutdown_pools)


def run_ranks(
    fn: Callable, world: int, *args, timeout: float = 240, threads: int = 1, fresh: bool = False
) -> list[RankResult]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return each rank's :class:`RankResult`.

    By default on the pool of ``world`` long-lived workers (see the module docstring); ``fresh=True`` spawns
    ``world`` new processes for this call only. Either way: a task not finished on every rank within ``timeout``
    seconds raises ``TimeoutError`` (a hang), a rank that dies raises ``RuntimeError``.
    """
    if fresh:
        return _run_fresh(fn, world, args, timeout, threads)
    # Pickled here, once: a task that cannot be pickled fails in the caller, as with a spawned process.
    payload = pickle.dumps((fn, args, threads, dict(os.environ), os.getcwd()), protocol=pickle.HIGHEST_PROTOCOL)
    pool = _pools.pop(world, None)  # out of the registry while it runs: an interrupted call leaves no broken pool
    if pool is None:
        pool = _Pool(world, threads)
    try:
        results, healthy = pool.run(payload, timeout)
    except BaseException:
        pool.kill()  # no-op when run() already killed it
        raise
    if healthy:
        _pools[world] = pool
    else:
        pool.kill()  # some rank raised: its group may hold mismatched collectives
    return results


def values(results: list[RankResult]) -> list[Any]:
    """The values of a run in which every rank must have succeeded (else the first error with its traceback)."""
    for res in results:
        if not res.ok:
            raise AssertionError(f"rank {res.rank} raised {res.error_type}: {res.error}\n{res.traceback}")
    return [res.value for res in results]

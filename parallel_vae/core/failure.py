"""Fail fast: a rank that raises inside an encode/decode (or a training step) lets its peers fail within a second
with its message, instead of leaving them in a collective until the process group's timeout.

How: inside :func:`fail_fast`, an exception on one rank (other than the agreement's own errors, which every rank
raises together) is written to the default store under a key of the group and of the block; and while a rank waits for a collective
of a watched group on gloo, the blocking wait runs on a helper thread and, once it has waited ``CHECK_AFTER_S``,
this rank reads that key every ``CHECK_EVERY_S``: found, it raises :class:`PeerFailure` with the failing
rank's message. A collective that completes in less than ``CHECK_AFTER_S`` never touches the store.

What it does not cover: NCCL. There ``work.wait()`` returns at once (the CPU does not block on the transfer), a
stuck rank blocks at the next device synchronization, and only NCCL's watchdog (``TORCH_NCCL_ASYNC_ERROR_HANDLING``,
the process group's ``timeout``) ends it; the flag is still written, so the message is in the store for whoever
reads it. A rank that dies (killed, segfault) writes nothing: its peers fail at the process group's timeout.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional, Sequence

import torch.distributed as dist

__all__ = ["PeerFailure", "fail_fast", "wait_tensor", "CHECK_AFTER_S", "CHECK_EVERY_S"]

CHECK_AFTER_S = 0.2  # a wait shorter than this never reads the store
CHECK_EVERY_S = 0.2  # then the store is read this often

# The watched groups of this thread, innermost last: (store, key) of each. Module state read by comm._wait.
_watched: list[tuple] = []


class PeerFailure(RuntimeError):
    """Another rank of the spatial group raised inside the same operation; this rank stopped waiting for it."""


class _Agreed(Exception):
    """Marker base: errors every rank raises together (the agreement's) are not flagged."""


# Watched blocks entered per group. Every rank of a group enters the same blocks in the same order (the agreement
# sees to it), so the count names the same block on every rank: a flag left by an earlier failure (caught by the
# caller, who carried on) is never read by a later block.
_entered: dict[str, int] = {}


def _key(group) -> str:
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    name = "parallel_vae/failed/" + ",".join(map(str, ranks))
    _entered[name] = _entered.get(name, 0) + 1
    return f"{name}/{_entered[name]}"


@contextlib.contextmanager
def fail_fast(group, what: str, agreed: Sequence[type] = ()) -> Iterator[None]:
    """Watch ``group`` for the duration of the block: see the module docstring. ``agreed``: exception types that
    every rank raises together (not flagged). A no-op without a process group or with a group of one rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        yield
        return
    store = dist.distributed_c10d._get_default_store()
    key = _key(group)
    poll = dist.get_backend(group) == "gloo"
    if poll:
        _watched.append((store, key))
    try:
        yield
    except PeerFailure:
        raise  # the peer's failure is already flagged
    except BaseException as e:
        if not isinstance(e, tuple(agreed)):
            message = f"rank {dist.get_rank()} failed in {what}: {type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                store.set(key, message[:2000])
        raise
    finally:
        if poll:
            _watched.pop()


def _failure() -> Optional[str]:
    for store, key in _watched:
        try:
            if store.check([key]):
                return store.get(key).decode(errors="replace")
        except Exception:  # a store that is gone: nothing to report
            pass
    return None


class _Waiter:
    """A daemon thread that runs blocking waits handed to it (a daemon: one left blocked in an abandoned wait does
    not keep the process from exiting)."""

    def __init__(self):
        import queue
        import threading

        self.jobs: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._run, name="parallel_vae-wait", daemon=True).start()

    def _run(self) -> None:
        while True:
            t, done = self.jobs.get()
            try:
                _plain_wait(t)
            except BaseException as e:  # handed back to the waiting thread
                done.error = e
            done.set()
            del t, done  # hold no tensor between jobs: an idle waiter keeps nothing alive until exit


_waiter: Optional[_Waiter] = None  # replaced when a wait is abandoned


def _plain_wait(t):
    import torch

    return torch.ops._c10d_functional.wait_tensor(t)


def wait_tensor(t):
    """Wait for a functional collective's result ``t`` and return it: a plain wait, or, inside :func:`fail_fast` on
    gloo, the watched wait of the module docstring.

    The watched wait runs the blocking wait on a helper thread (gloo's wait releases the GIL; the functional
    collectives' work registry is process-wide) while this thread reads the store. Neither ``is_completed`` (never
    true for some gloo works) nor a wait with a timeout (a gloo timeout closes the connection for good) can poll."""
    global _waiter
    if not _watched:
        return _plain_wait(t)
    import threading

    if _waiter is None:
        _waiter = _Waiter()
    start = time.monotonic()
    done = threading.Event()
    done.error = None
    _waiter.jobs.put((t, done))
    timeout = CHECK_AFTER_S
    while not done.wait(timeout):
        found = _failure()
        if found is not None:
            _waiter = None  # its thread stays blocked in the abandoned wait; the next watched wait gets a new one
            raise PeerFailure(f"{found} (this rank stopped waiting for it after {time.monotonic() - start:.1f} s)")
        timeout = CHECK_EVERY_S
    if done.error is not None:
        # A peer that flagged its failure and exited closes its connections: the wait then fails with gloo's read
        # error before the first poll. The flag, written before the peer left, says what happened.
        found = _failure()
        if found is not None:
            raise PeerFailure(f"{found} (this rank's wait failed after {time.monotonic() - start:.1f} s)") from done.error
        raise done.error
    return _plain_wait(t)  # already complete: no work is left registered for it, so this returns t at once

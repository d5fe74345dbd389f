"""tests/dist_harness.py's worker pools: reuse, per-task state, errors on every rank, hangs, dead ranks, subgroups."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.dist_harness import pool_pids, run_ranks, values


def _whoami(rank, world, tag):
    return rank, world, os.getpid(), tag


def _dirty(rank, world):
    """Leave behind what a careless task might: global dtype, RNG, threads, grad mode, environment, cwd."""
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(1234 + rank)
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    os.environ["PV_HARNESS_LEAK"] = "1"
    os.chdir("/")
    return os.getpid()


def _state(rank, world):
    return dict(
        pid=os.getpid(),
        dtype=torch.get_default_dtype(),
        randn=torch.randn(4),
        threads=torch.get_num_threads(),
        grad=torch.is_grad_enabled(),
        leak=os.environ.get("PV_HARNESS_LEAK"),
        caller=os.environ.get("PV_HARNESS_CALLER"),
        cwd=os.getcwd(),
    )


@pytest.mark.timeout(200)
def test_pool_is_reused_and_each_task_starts_clean(monkeypatch, tmp_path):
    first = values(run_ranks(_whoami, 2, "a"))
    second = values(run_ranks(_whoami, 2, "b"))
    assert [v[:2] for v in first] == [(0, 2), (1, 2)] and [v[3] for v in second] == ["b", "b"]
    pids = [v[2] for v in first]
    assert [v[2] for v in second] == pids == pool_pids(2), "the second call must run on the same processes"
    assert os.getpid() not in pids

    assert values(run_ranks(_dirty, 2)) == pids
    monkeypatch.setenv("PV_HARNESS_CALLER", "yes")  # the caller's environment and cwd at call time reach the task
    monkeypatch.chdir(tmp_path)
    pooled = values(run_ranks(_state, 2))
    fresh = values(run_ranks(_state, 2, fresh=True))
    assert [s["pid"] for s in pooled] == pids
    assert not set(s["pid"] for s in fresh) & set(pids + [os.getpid()])
    assert pool_pids(2) == pids, "a fresh=True call leaves the pool alone"
    for rank, (p, f) in enumerate(zip(pooled, fresh)):
        assert p["dtype"] == f["dtype"] == torch.float32
        assert not torch.equal(p["randn"], torch.randn(4, generator=torch.Generator().manual_seed(1234 + rank)))
        assert p["threads"] == f["threads"] == 1
        assert p["grad"] and f["grad"]
        assert p["leak"] is None and f["leak"] is None
        assert p["caller"] == f["caller"] == "yes"
        assert p["cwd"] == f["cwd"] == str(tmp_path)
    assert values(run_ranks(_threads, 2, threads=2)) == [2, 2]


def _threads(rank, world):
    return torch.get_num_threads()


def _raise_on(rank, world, failing):
    if rank in failing:
        raise (ValueError if rank == 0 else KeyError)(f"bad input on rank {rank}")
    return rank * 10


@pytest.mark.timeout(200)
def test_errors_on_every_rank_are_reported_and_the_pool_is_replaced():
    before = values(run_ranks(_whoami, 2, "x"))
    results = run_ranks(_raise_on, 2, (0, 1))
    assert [r.rank for r in results] == [0, 1]
    assert [r.error_type for r in results] == ["ValueError", "KeyError"]
    assert results[0].error == "bad input on rank 0" and results[1].error == "'bad input on rank 1'"
    assert all("_raise_on" in r.traceback for r in results)
    assert pool_pids(2) is None, "a pool in which a rank raised is not reused"
    with pytest.raises(AssertionError, match="rank 0 raised ValueError: bad input on rank 0"):
        values(results)

    mixed = run_ranks(_raise_on, 2, (1,))  # one rank raising does not take the other down
    assert mixed[0].ok and mixed[0].value == 0
    assert mixed[1].error_type == "KeyError"
    after = values(run_ranks(_whoami, 2, "y"))
    assert not set(v[2] for v in after) & set(v[2] for v in before)


def _hang_on(rank, world, hanging):
    if rank in hanging:
        time.sleep(600)
    return rank


def _die_on(rank, world, dying):
    if rank in dying:
        os._exit(7)
    dist.barrier()  # the survivor is left waiting for the dead rank
    return rank


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.timeout(200)
def test_hang_is_a_timeout_and_a_dead_rank_an_error_and_the_pool_recovers():
    pids = [v[2] for v in values(run_ranks(_whoami, 2, "warm"))]
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^ranks \[1\] of 2 did not finish within 3s \(hang\)$"):
        run_ranks(_hang_on, 2, (1,), timeout=3)
    assert time.monotonic() - t0 < 30
    assert pool_pids(2) is None and all(_gone(p) for p in pids), "the hung pool is killed"
    assert values(run_ranks(_hang_on, 2, ())) == [0, 1]

    pids = pool_pids(2)
    with pytest.raises(RuntimeError, match=r"^rank 1 died without a result \(exit code 7\)$"):
        run_ranks(_die_on, 2, (1,), timeout=60)
    assert pool_pids(2) is None and all(_gone(p) for p in pids)
    assert values(run_ranks(_die_on, 2, ())) == [0, 1]


def _subgroups(rank, world, ranks_lists):
    """Make every group (collective, on every rank); all-reduce each member's rank in each group it is in."""
    groups = [dist.new_group(list(rs)) for rs in ranks_lists]
    sums = []
    for rs, g in zip(ranks_lists, groups):
        if rank in rs:
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=g)
            sums.append((tuple(rs), dist.get_rank(g), t.item()))
    t = torch.tensor([1.0])
    dist.all_reduce(t)  # the world group still works after the subgroups
    return os.getpid(), sums, t.item()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [3, 4])
def test_subgroups_across_tasks(world):
    tasks = [[[1, 2]], [[0, 1], [0, 2]], [[0], [1, 2]], [[1, 2]], [list(range(world))]]
    pids = None
    for ranks_lists in tasks:
        res = values(run_ranks(_subgroups, world, ranks_lists, timeout=120))
        pids = pids or [r[0] for r in res]
        assert [r[0] for r in res] == pids, "every task ran on the same pool"
        for rank, (_, sums, total) in enumerate(res):
            assert total == world
            expected = [(tuple(rs), rs.index(rank), float(sum(rs))) for rs in ranks_lists if rank in rs]
            assert sums == expected

"""parallel_vae/jobs/runtime.py: errors every rank agrees on (one rank failing stops all, with the same message),
usage errors as exceptions, wandb's offline fallback, and the ``--parallel`` decision."""

from __future__ import annotations

import pytest

from parallel_vae.jobs.decode_job import plan_parallel
from parallel_vae.errors import InputError
from parallel_vae.jobs.runtime import AgreedError, ArgumentParser, Runtime, UsageError, wandb_mode
from tests.dist_harness import run_ranks


def _agree_worker(rank, world, failing):
    rt = Runtime(accelerator=None)
    outcomes = []
    for fail_on in failing:  # several blocks in a row: a failed block must not desynchronize the next one
        try:
            with rt.agreed():
                if rank in fail_on:
                    raise InputError(f"bad file on rank {rank}" if len(fail_on) < world else "bad file")
            outcomes.append("ok")
        except AgreedError as e:
            outcomes.append((str(e), e.exit_code))
    return outcomes


@pytest.mark.timeout(120)
def test_agreed_errors_reach_every_rank():
    results = run_ranks(_agree_worker, 2, [(), (1,), (0, 1), ()], timeout=100)
    assert all(r.ok for r in results), [r.traceback for r in results]
    for r in results:
        assert r.value == [
            "ok",
            ("rank 1 of 2: bad file on rank 1", 1),  # only rank 1 failed, yet rank 0 stops too
            ("bad file", 1),  # the same message everywhere: said once, without rank numbers
            "ok",
        ]


def test_usage_errors_are_exceptions_not_exits():
    p = ArgumentParser(prog="x.py")
    p.add_argument("--dtype", choices=["float32"])
    with pytest.raises(UsageError, match=r"invalid choice: 'float8'.*see x.py --help"):
        p.parse_args(["--dtype", "float8"])


def test_wandb_mode(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode() == "offline"  # no login anywhere
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"  # explicit wins


def test_plan_parallel():
    shape = (1, 16, 2, 5, 4)  # 5 latent rows: 3 + 2 over 2 ranks; the busiest rank's share: 24 GFLOP, say
    assert not plan_parallel("on", shape, 1).shard  # one process: nothing to shard
    assert not plan_parallel("off", shape, 2).shard
    assert plan_parallel("on", shape, 2).shard
    assert plan_parallel("auto", shape, 2, threshold_gflop=24, gflop_per_rank=24.0).shard
    below = plan_parallel("auto", shape, 2, threshold_gflop=25, gflop_per_rank=24.0)
    assert not below.shard and below.gflop_per_rank == 24 and "< threshold 25" in below.reason
    assert not plan_parallel("auto", (1, 16, 2, 1, 4), 2, threshold_gflop=0).shard  # 1 row cannot be split
    with pytest.raises(InputError, match=r"1 latent rows \(8 pixel rows\) cannot be split over 2 ranks"):
        plan_parallel("on", (1, 16, 2, 1, 4), 2)


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_process_skips_teardown_only_when_launched(world_size):
    """A launched rank leaves with os._exit (no interpreter teardown: the gloo SIGABRT seen in CI after a
    successful run), with its status and its printed lines flushed; a single process exits normally."""
    import os
    import subprocess
    import sys

    code = (
        "import atexit; atexit.register(lambda: print('teardown ran', flush=True));"
        "from parallel_vae.jobs.cli import exit_process; print('summary line', end=''); exit_process(3)"
    )
    env = dict(os.environ, WORLD_SIZE=world_size)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    expected = "summary line" if world_size == "2" else "summary lineteardown ran\n"
    assert proc.stdout == expected

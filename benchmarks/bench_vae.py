#!/usr/bin/env python
"""Speed, memory and scaling of parallel_vae side by side with the unmodified diffusers VAE.

One invocation runs, for decode and encode of one family's real layout (``--family``, default wan2.1) at full
channel width (random weights):

* the unmodified diffusers model in one process (the baseline);
* the parallel version at every world size of ``--worlds`` (spawned ranks; gloo on CPU, NCCL on GPU), in
  sharded mode (each rank holds its own rows only: the per-rank working set) and replicated mode (every rank
  passes the whole input and receives the whole output, the drop-in ``vae.decode`` / ``vae.encode``);
* on GPU (or with ``--projection on``), a single-device scaling PROJECTION: one rank's shard of the work for
  N = 1, 2, 4, 8, halos fed locally without communication, plus the bytes that rank would exchange.

and prints a table plus JSON (also written to ``--json``): wall time, per-rank CPU time, work efficiency (baseline
CPU time / sum of rank CPU times), per-rank FLOPs (``torch.utils.flop_counter``), per-rank peak live tensor bytes
(CUDA ``max_memory_allocated`` on GPU; on CPU a tracker of live tensor storages), weights, peak RSS, bytes
exchanged per rank, speed-up and the exactness against the baseline output. ``--report_to wandb`` logs the run.

Usage (from the repository root):

    python benchmarks/bench_vae.py                                  # the full default run (< 10 min on 2 cores)
    python benchmarks/bench_vae.py --base_dim 32 --latent_hw 8 8    # a quick smoke run
    python benchmarks/bench_vae.py --latent_frames 5 --latent_hw 32 32 --ops decode --worlds 1,2
    python benchmarks/bench_vae.py --family sd                      # AutoencoderKL (SD 1.x layout), images
    python benchmarks/bench_vae.py --ops decode --worlds 2 --modes replicated --ceiling off --base_dim 32 \
        --latent_hw 16 16 --overhead_repeats 5                      # the reliability checks' cost, quickly
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pickle
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Exactness bars of docs/how-it-works.md (max |parallel - baseline| / max |baseline|); bf16/fp16 are reported,
# not judged.
_TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


# --------------------------------------------------------------------------------------------------------------
# measurement helpers (run inside the rank processes)
# --------------------------------------------------------------------------------------------------------------


# The live-tensor tracker and the oneDNN FLOP formula are the real-scale table's (benchmarks/scale_table.py), so
# both benchmarks measure the same way.
from parallel_vae.jobs.fake_run import LiveBytes as LiveTensorBytes  # noqa: E402
from parallel_vae.jobs.fake_run import register_conv_flops as _register_onednn_flops  # noqa: E402


def _rss_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _rss_peak() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) * (1 if sys.platform == "darwin" else 1024)


class _Clock:
    """Wall time of a region: CUDA events on GPU (the device's own time line), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> "_Clock":
        if self.cuda:
            torch.cuda.synchronize()
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize()
        self.cpu = time.process_time() - self._c0
        self.wall = self._start.elapsed_time(self._end) / 1e3 if self.cuda else time.perf_counter() - self._t0


# --------------------------------------------------------------------------------------------------------------
# one configuration = one set of spawned processes
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    impl: str  # "diffusers" (unmodified, one process) or "parallel"
    op: str  # "decode" or "encode"
    mode: str  # "sharded" or "replicated" (parallel); "full" (diffusers)
    world: int
    repeats: int  # timed runs after the counting run; 0 = counting run only (oversubscribed: memory, not speed)
    layout: str
    base_dim: Optional[int]
    z_dim: Optional[int]
    latent_frames: int
    latent_hw: tuple
    dtype: str
    device: str  # "cpu" or "cuda"
    threads: int
    seed: int
    tf32: bool = False
    ref_path: str = ""
    overlap: bool = True  # core.comm.set_overlap: collectives overlapped with local work, or waited at once


def _model(job: Job, device: torch.device):
    from parallel_vae.jobs.models import build_seeded_vae, build_wan_vae

    dtype = _DTYPES[job.dtype]
    if job.layout.startswith("wan"):
        vae = build_wan_vae(job.layout, base_dim=job.base_dim, z_dim=job.z_dim, seed=job.seed, dtype=dtype)
    else:
        vae = build_seeded_vae(job.layout, width=job.base_dim, latent=job.z_dim, seed=job.seed, dtype=dtype)
    return vae.to(device).eval()


def _inputs(job: Job, vae) -> torch.Tensor:
    """The full input of the op, (B, C, T, H, W) for video families and (B, C, H, W) for image families, seeded,
    identical in every process."""
    from parallel_vae.families import adapter_for

    adapter = adapter_for(vae)
    g = torch.Generator().manual_seed(job.seed + 1)
    h, w = job.latent_hw
    if job.op == "decode":
        frames = (job.latent_frames,) if adapter.video else ()
        x = torch.randn((1, adapter.latent_channels(vae)) + frames + (h, w), generator=g)
    else:
        f = adapter.spatial_factor(vae)
        frames = (1 + adapter.temporal_factor(vae) * (job.latent_frames - 1),) if adapter.video else ()
        x = torch.rand((1, adapter.pixel_channels(vae)) + frames + (h * f, w * f), generator=g) * 2 - 1
    return x.to(_DTYPES[job.dtype])


def _run_op(job: Job, vae, x: torch.Tensor) -> torch.Tensor:
    import parallel_vae as pv
    from parallel_vae.families import adapter_for

    if job.impl == "diffusers" or job.mode == "replicated":
        return vae.decode(x).sample if job.op == "decode" else adapter_for(vae).posterior_of(vae.encode(x)).parameters
    return pv.sharded_decode(vae, x) if job.op == "decode" else pv.sharded_encode(vae, x).parameters


def _rank_main(rank: int, world: int, job: Job, tmpdir: str) -> None:
    result: dict[str, Any] = {"rank": rank}
    try:
        body = _overhead_body if job.mode == "overheads" else _rank_body
        result.update(body(rank, world, job, tmpdir))
    except BaseException as e:  # report every rank's failure to the parent
        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    with open(os.path.join(tmpdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _rank_body(rank: int, world: int, job: Job, tmpdir: str) -> dict:
    import parallel_vae as pv
    from parallel_vae.core.comm import count_traffic
    from parallel_vae.core.sharding import row_offsets, row_split
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(job.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    _register_onednn_flops()
    if job.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        # TF32 convolutions (cuDNN's default) are 1e-3 accurate: off unless asked, so the exactness column means
        # something; both sides of every comparison run with the same setting.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = job.tf32
    else:
        device = torch.device("cpu")
    if job.impl == "parallel":
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method="file://" + os.path.join(tmpdir, "store"),
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=600),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    vae = _model(job, device)
    weight_bytes = sum(t.numel() * t.element_size() for t in list(vae.parameters()) + list(vae.buffers()))
    full = _inputs(job, vae)
    # Rows of this rank (latent-row units): what the op reads and, in sharded mode, what it returns.
    f = pv.spatial_factor(vae)
    sizes = row_split(job.latent_hw[0], world)
    first, rows = row_offsets(sizes)[rank], sizes[rank]
    out_unit = f if job.op == "decode" else 1
    in_unit = 1 if job.op == "decode" else f
    x = full
    if job.impl == "parallel":
        from parallel_vae.core.comm import set_overlap

        set_overlap(job.overlap)
        pv.enable_spatial_parallelism(vae)
        if job.mode == "sharded":
            x = full.narrow(-2, first * in_unit, rows * in_unit).contiguous()
    x = x.to(device)
    del full
    input_bytes = x.numel() * x.element_size()

    def barrier():
        if dist.is_initialized():
            dist.barrier()

    # 1. the counting run (also the warm-up): FLOPs, comm bytes, live tensor bytes (CPU), exactness.
    barrier()
    rss_before = _rss_now()
    tracker = LiveTensorBytes() if device.type == "cpu" else contextlib.nullcontext()
    with torch.no_grad(), count_traffic() as traffic, FlopCounterMode(display=False) as flops:
        t0 = time.perf_counter()
        with tracker:
            out = _run_op(job, vae, x)
        count_wall = time.perf_counter() - t0
    res: dict[str, Any] = {
        "flops": int(flops.get_total_flops()),
        "traffic": traffic.as_dict(),
        "weight_bytes": weight_bytes,
        "input_bytes": input_bytes,
        "output_bytes": out.numel() * out.element_size(),
        "count_run_wall_s": count_wall,
    }
    if device.type == "cpu":
        res.update(peak_live_bytes=tracker.peak, peak_live_op=tracker.peak_op, allocations=tracker.allocations)
    # Exactness against the baseline's output, rows of this rank (sharded) or the whole output.
    if job.ref_path:
        ref = torch.load(job.ref_path)
        if job.mode == "sharded":
            ref = ref.narrow(-2, first * out_unit, rows * out_unit)
        diff = (out.detach().cpu().double() - ref.double()).abs().max().item()
        res.update(max_abs_diff=diff, ref_max_abs=ref.double().abs().max().item())
    elif job.impl == "diffusers":
        torch.save(out.detach().cpu(), os.path.join(tmpdir, "ref.pt"))
        res["ref_file"] = os.path.join(tmpdir, "ref.pt")
    del out

    # 2. timed runs (min over repeats); on GPU the first one also measures max_memory_allocated.
    walls, cpus, waits, kinds = [], [], [], []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    for i in range(job.repeats):
        barrier()
        # Counting costs a few Python operations per collective; it also times the waits on peers.
        with torch.no_grad(), count_traffic() as timed_traffic, _Clock(device) as clock:
            out = _run_op(job, vae, x)
        del out
        walls.append(clock.wall)
        cpus.append(clock.cpu)
        waits.append(timed_traffic.wait_s)
        kinds.append(dict(timed_traffic.wait_by_kind))
        if device.type == "cuda" and i == 0:
            res["peak_live_bytes"] = torch.cuda.max_memory_allocated(device) - base_alloc
    if device.type == "cuda" and "peak_live_bytes" not in res:
        res["peak_live_bytes"] = None
    barrier()
    best = min(range(len(walls)), key=walls.__getitem__) if walls else None
    res.update(
        wall_s=walls[best] if walls else None,
        cpu_s=min(cpus) if cpus else None,
        # NCCL waits are stream-ordered (the host does not block), so the host-side wait means nothing on GPU.
        comm_wait_s=waits[best] if walls and device.type == "cpu" else None,
        comm_wait_s_by_kind=kinds[best] if walls and device.type == "cpu" else None,
        walls=walls,
        cpus=cpus,
        rss_before_bytes=rss_before,
        rss_peak_bytes=_rss_peak(),
        latent_rows=rows,
    )
    return res


# The reliability checks whose cost is measured (``--overheads``): the replicated decode with everything on (the
# default), then with each check off, interleaved run by run so that drift of the machine hits all alike.
_VARIANTS = {
    "default": (True, True),  # (fingerprint, fail-fast)
    "fingerprint off": (False, True),
    "fail-fast off": (True, False),
    "both off": (False, False),
}


def _overhead_body(rank: int, world: int, job: Job, tmpdir: str) -> dict:
    """Replicated decode (``vae.decode``) walls of every variant of ``_VARIANTS``, ``job.repeats`` rounds.

    The fingerprint is switched by the model's own opt-out (``check_inputs``, here on the enabled model's state);
    fail-fast has none, so it is switched by replacing ``parallel_vae.api.fail_fast`` with a no-op block (what a
    group of one gets). Also timed alone: one fingerprint of the input (``core/fingerprint.py``)."""
    import parallel_vae as pv
    from parallel_vae import api
    from parallel_vae.core.fingerprint import fingerprint_words

    torch.set_num_threads(job.threads)
    device = torch.device("cuda", rank % torch.cuda.device_count()) if job.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = job.tf32
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method="file://" + os.path.join(tmpdir, "store"),
        rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600),
        **({"device_id": device} if device.type == "cuda" else {}),
    )  # fmt: skip
    vae = pv.enable_spatial_parallelism(_model(job, device))
    x = _inputs(job, vae).to(device)
    state, watched = api._state(vae), api.fail_fast
    no_watch = lambda group, what, agreed=(): contextlib.nullcontext()  # noqa: E731

    def run(fingerprint: bool, fail_fast: bool) -> float:
        state.check_inputs = fingerprint
        api.fail_fast = watched if fail_fast else no_watch
        try:
            dist.barrier()
            with torch.no_grad(), _Clock(device) as clock:
                vae.decode(x)
            return clock.wall
        finally:
            api.fail_fast, state.check_inputs = watched, True

    run(True, True)  # warm-up
    walls: dict[str, list[float]] = {name: [] for name in _VARIANTS}
    for i in range(max(1, job.repeats)):
        order = list(_VARIANTS.items())
        for name, flags in order if i % 2 == 0 else order[::-1]:  # ABBA: neither variant always goes first
            walls[name].append(run(*flags))
    prints = []
    for _ in range(5):
        with _Clock(device) as clock:
            fingerprint_words(x)
        prints.append(clock.wall)
    return {"walls": walls, "fingerprint_alone_s": min(prints), "input_elements": x.numel()}


def _overheads(ranks: list[dict]) -> dict:
    """Per variant: the wall of each round (slowest rank; the ranks met at a barrier), the best round, and the ratio
    default / variant (above 1: the check costs that fraction)."""
    rounds = {name: [max(r["walls"][name][i] for r in ranks) for i in range(len(ranks[0]["walls"][name]))] for name in _VARIANTS}
    best = {name: min(w) for name, w in rounds.items()}
    median = {name: statistics.median(w) for name, w in rounds.items()}
    return {
        "walls": rounds,
        "wall_s": best,
        "median_wall_s": median,
        "ratio_default_over": {name: best["default"] / best[name] for name in _VARIANTS},
        "median_ratio_default_over": {name: median["default"] / median[name] for name in _VARIANTS},
        "fingerprint_alone_s": max(r["fingerprint_alone_s"] for r in ranks),
        "input_elements": ranks[0]["input_elements"],
    }


def _launch(job: Job, timeout: float) -> list[dict]:
    """Spawn ``job.world`` ranks of ``job`` and return every rank's result (raises on any rank's error)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench_vae_") as tmpdir:
        procs = [ctx.Process(target=_rank_main, args=(r, job.world, job, tmpdir)) for r in range(job.world)]
        from parallel_vae.jobs._spawn import run_with_deadline

        hung = run_with_deadline(procs, timeout)
        if hung:
            raise TimeoutError(f"{job.impl} {job.op} N={job.world}: ranks {hung} did not finish in {timeout:.0f}s")
        results = []
        for r in range(job.world):
            path = os.path.join(tmpdir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            with open(path, "rb") as f:
                results.append(pickle.load(f))
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise RuntimeError(f"{job.impl} {job.op} {job.mode} N={job.world} failed:\n{errors[0]}")
        if job.impl == "diffusers":
            # Keep the baseline output beyond the temporary directory: the parallel runs compare against it.
            keep = os.path.join(_keep_dir(), f"ref_{job.op}.pt")
            os.replace(results[0]["ref_file"], keep)
            results[0]["ref_file"] = keep
        return results


_KEEP: list[str] = []


def _keep_dir() -> str:
    """A directory for the baseline outputs that outlives each configuration (removed at the end of main)."""
    if not _KEEP:
        _KEEP.append(tempfile.mkdtemp(prefix="bench_vae_ref_"))
    return _KEEP[0]


# --------------------------------------------------------------------------------------------------------------
# single-device scaling projection
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _simulated_group(world: int, rank: int):
    """Make parallel_vae's collectives act as rank ``rank`` of ``world`` on one device, without communication.

    Halo receives are filled with zeros (the values do not matter for timing; the shapes, the copies and the
    convolutions are the real ones, and zeros keep uninitialized memory's NaNs and denormals out of the timing);
    all-gathers fill the output with copies of this rank's shard (every rank as large as this one). Every
    exchange is still counted by ``count_traffic``.
    """
    from parallel_vae.core import comm

    def group_size(group):
        return world

    def group_rank(group):
        return rank

    def all_to_all_start(send, recv_splits, send_splits, group):
        row = comm._nbytes(send) // max(send.size(0), 1) if send.size(0) else 0
        if comm._counter is not None:
            comm._counter.add("p2p", row * sum(send_splits), row * sum(recv_splits))
        return send.new_zeros((sum(recv_splits),) + tuple(send.shape[1:]))

    def all_gather_start(inp, group):
        if comm._counter is not None:
            comm._counter.add("all_gather", comm._nbytes(inp) * (world - 1), comm._nbytes(inp) * (world - 1))
        return inp.unsqueeze(0).expand(world, *inp.shape).reshape((world * inp.size(0),) + tuple(inp.shape[1:]))

    def wait_tensor(t, kind="other"):
        return t

    names = ("group_size", "group_rank", "_all_to_all_start", "_all_gather_start", "_wait_tensor")
    saved = {n: getattr(comm, n) for n in names}
    comm.group_size, comm.group_rank, comm._all_to_all_start, comm._all_gather_start, comm._wait_tensor = (
        group_size,
        group_rank,
        all_to_all_start,
        all_gather_start,
        wait_tensor,
    )
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(comm, n, fn)


def _projection_main(job: Job, worlds: list[int], out_path: str) -> None:
    try:
        res = _projection_body(job, worlds)
    except BaseException as e:
        res = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    with open(out_path, "wb") as f:
        pickle.dump(res, f)


def _projection_body(job: Job, worlds: list[int]) -> dict:
    import parallel_vae as pv
    from parallel_vae.core.comm import count_traffic
    from parallel_vae.core.plan import SpatialState, apply_plan, remove_plan
    from parallel_vae.core.sharding import row_split
    from parallel_vae.families import adapter_for, plan_for
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(job.threads)
    _register_onednn_flops()
    device = torch.device("cuda", 0) if job.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = job.tf32
    vae = _model(job, device)
    full = _inputs(job, vae)
    f = pv.spatial_factor(vae)
    in_unit = 1 if job.op == "decode" else f
    rows_total = job.latent_hw[0]
    out = {}
    for n in worlds:
        if n > rows_total:
            out[n] = {"skipped": f"{rows_total} latent rows cannot be split over {n} ranks"}
            continue
        # The busiest rank: the largest shard, with neighbours on both sides (a middle rank).
        rows = max(row_split(rows_total, n))
        x = full.narrow(-2, 0, rows * in_unit).contiguous().to(device)
        rank = n // 2
        if n > 1:
            apply_plan(vae, plan_for(vae), SpatialState(None, n, f, adapter_for(vae)))
        ctx = _simulated_group(n, rank) if n > 1 else contextlib.nullcontext()

        def run():
            adapter = adapter_for(vae)
            if job.op == "decode":
                return adapter.decode_local(vae, x)
            return adapter.encode_local(vae, x)

        try:
            with ctx, torch.no_grad():
                with count_traffic() as traffic, FlopCounterMode(display=False) as flops:
                    run()  # warm-up and counting run
                walls = []
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                for _ in range(max(1, job.repeats)):
                    with _Clock(device) as clock:
                        y = run()
                    del y
                    walls.append(clock.wall)
                peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
        finally:
            if n > 1:
                remove_plan(vae)
        t = traffic.as_dict()
        out[n] = {
            "rows": rows,
            "rank": rank,
            "compute_s": statistics.median(walls),
            "walls": walls,
            "flops": int(flops.get_total_flops()),
            "sent_bytes": t["sent_bytes"],
            "received_bytes": t["received_bytes"],
            "messages": sum(v["calls"] for v in t["by_kind"].values()),
            "peak_live_bytes": peak,
        }
    return out


def _run_projection(job: Job, worlds: list[int], timeout: float) -> dict:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench_vae_proj_") as tmpdir:
        path = os.path.join(tmpdir, "proj.pkl")
        p = ctx.Process(target=_projection_main, args=(job, worlds, path))
        p.start()
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
            raise TimeoutError(f"projection of {job.op} did not finish in {timeout:.0f}s")
        with open(path, "rb") as f:
            res = pickle.load(f)
    if "error" in res:
        raise RuntimeError(f"projection of {job.op} failed:\n{res['error']}")
    return res


# --------------------------------------------------------------------------------------------------------------
# the machine's parallel ceiling: N shards at once, no communication
# --------------------------------------------------------------------------------------------------------------


def _ceiling_main(job: Job, rank: int, barrier, out_path: str) -> None:
    try:
        res = _ceiling_body(job, rank, barrier)
    except BaseException as e:
        res = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        with contextlib.suppress(Exception):
            barrier.abort()
    with open(out_path, "wb") as f:
        pickle.dump(res, f)


def _ceiling_body(job: Job, rank: int, barrier) -> dict:
    """Rank ``rank``'s shard of the sharded run, computed by parallel_vae's own layers with its halos fed locally
    (``_simulated_group``: zeros for received rows, this rank's rows for gathers) and no communication, while the
    other ranks' processes do the same at the same moment. What is left is the machine: cores, memory bandwidth,
    caches shared by N processes."""
    import parallel_vae as pv
    from parallel_vae.core.plan import SpatialState, apply_plan
    from parallel_vae.core.sharding import row_offsets, row_split
    from parallel_vae.families import adapter_for, plan_for

    torch.set_num_threads(job.threads)
    device = torch.device("cpu")
    vae = _model(job, device)
    full = _inputs(job, vae)
    f = pv.spatial_factor(vae)
    in_unit = 1 if job.op == "decode" else f
    sizes = row_split(job.latent_hw[0], job.world)
    x = full.narrow(-2, row_offsets(sizes)[rank] * in_unit, sizes[rank] * in_unit).contiguous()
    del full
    adapter = adapter_for(vae)
    apply_plan(vae, plan_for(vae), SpatialState(None, job.world, f, adapter))

    def run():
        return adapter.decode_local(vae, x) if job.op == "decode" else adapter.encode_local(vae, x)

    walls = []
    with _simulated_group(job.world, rank), torch.no_grad():
        run()  # warm-up
        for _ in range(max(1, job.repeats)):
            barrier.wait()
            t0 = time.perf_counter()
            run()
            walls.append(time.perf_counter() - t0)
    return {"walls": walls}


def _run_ceiling(job: Job, timeout: float) -> dict:
    """Wall time of the slowest of ``job.world`` concurrent no-communication shard runs (best repeat)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(job.world)
    with tempfile.TemporaryDirectory(prefix="bench_vae_ceiling_") as tmpdir:
        paths = [os.path.join(tmpdir, f"rank{r}.pkl") for r in range(job.world)]
        procs = [ctx.Process(target=_ceiling_main, args=(job, r, barrier, paths[r])) for r in range(job.world)]
        from parallel_vae.jobs._spawn import run_with_deadline

        hung = run_with_deadline(procs, timeout)
        if hung:
            raise TimeoutError(f"ceiling of {job.op} N={job.world}: ranks {hung} did not finish in {timeout:.0f}s")
        results = []
        for path in paths:
            with open(path, "rb") as f:
                results.append(pickle.load(f))
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"ceiling of {job.op} N={job.world} failed:\n{errors[0]}")
    # Repeat i ran on every rank at once (barrier); its wall is the slowest rank's.
    per_repeat = [max(r["walls"][i] for r in results) for i in range(len(results[0]["walls"]))]
    return {"wall_s": min(per_repeat), "walls": per_repeat, "per_rank": [min(r["walls"]) for r in results]}


# --------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------


def _mb(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def _summarize(job: Job, ranks: list[dict], base: Optional[dict], oversubscribed: bool, load: float) -> dict:
    walls = [r["wall_s"] for r in ranks]
    cpus = [r["cpu_s"] for r in ranks]
    timed = not oversubscribed and all(w is not None for w in walls)
    s = {
        "impl": job.impl,
        "op": job.op,
        "mode": job.mode,
        "world": job.world,
        "overlap": job.overlap if job.impl == "parallel" else None,
        "oversubscribed": oversubscribed,
        "wall_s": max(walls) if timed else None,
        "cpu_s_per_rank": cpus if timed else None,
        "comm_wait_s_per_rank": [r["comm_wait_s"] for r in ranks]
        if timed and ranks[0]["comm_wait_s"] is not None
        else None,
        "comm_wait_s_by_kind_per_rank": [r.get("comm_wait_s_by_kind") for r in ranks] if timed else None,
        "flops_per_rank": [r["flops"] for r in ranks],
        "peak_live_bytes_per_rank": [r.get("peak_live_bytes") for r in ranks],
        "peak_live_op": ranks[0].get("peak_live_op"),
        "weight_bytes": ranks[0]["weight_bytes"],
        "rss_peak_bytes_per_rank": [r["rss_peak_bytes"] for r in ranks],
        "sent_bytes_per_rank": [r["traffic"]["sent_bytes"] for r in ranks],
        "received_bytes_per_rank": [r["traffic"]["received_bytes"] for r in ranks],
        "traffic_per_rank": [r["traffic"] for r in ranks],
        "latent_rows_per_rank": [r["latent_rows"] for r in ranks],
        "load_avg_1min_at_start": load,
        "dtype": job.dtype,
    }
    if "max_abs_diff" in ranks[0]:
        s["rel_err"] = max(r["max_abs_diff"] for r in ranks) / max(ranks[0]["ref_max_abs"], 1e-30)
    if base is not None:
        if timed and base["wall_s"]:
            s["speedup"] = base["wall_s"] / s["wall_s"]
            s["work_efficiency"] = sum(base["cpu_s_per_rank"]) / sum(cpus)
            s["time_overhead"] = s["wall_s"] / base["wall_s"] - 1
        s["flop_efficiency"] = sum(base["flops_per_rank"]) / max(sum(s["flops_per_rank"]), 1)
        peaks = s["peak_live_bytes_per_rank"]
        if all(p is not None for p in peaks) and base["peak_live_bytes_per_rank"][0]:
            s["memory_ratio"] = max(peaks) / (base["peak_live_bytes_per_rank"][0] / job.world)
    return s


def _main_table(summaries: list[dict]) -> str:
    headers = [
        "op",
        "impl",
        "mode",
        "N",
        "overlap",
        "wall s",
        "speed-up",
        "CPU s/rank",
        "wait s/rank",
        "work eff",
        "GFLOP/rank",
        "FLOP eff",
        "peak act MiB/rank",
        "vs 1/N",
        "weights MiB",
        "RSS MiB/rank",
        "sent MiB/rank",
        "rel err",
    ]
    rows = []
    for s in summaries:
        cpus = s["cpu_s_per_rank"]
        peaks = [p for p in s["peak_live_bytes_per_rank"] if p is not None]
        rows.append(
            [
                s["op"],
                s["impl"],
                s["mode"],
                s["world"],
                {None: "-", True: "on", False: "off"}[s.get("overlap")],
                "oversub." if s["oversubscribed"] else _fmt(s["wall_s"], ".2f"),
                _fmt(s.get("speedup"), ".2f"),
                "-" if cpus is None else "/".join(f"{c:.2f}" for c in cpus),
                "-" if not s["comm_wait_s_per_rank"] else "/".join(f"{c:.2f}" for c in s["comm_wait_s_per_rank"]),
                _fmt(s.get("work_efficiency"), ".3f"),
                "/".join(f"{f / 1e9:.1f}" for f in s["flops_per_rank"]),
                _fmt(s.get("flop_efficiency"), ".4f"),
                "/".join(_mb(p) for p in peaks) if peaks else "-",
                _fmt(s.get("memory_ratio"), ".3f"),
                _mb(s["weight_bytes"]),
                "/".join(_mb(p) for p in s["rss_peak_bytes_per_rank"]),
                "/".join(_mb(p) for p in s["sent_bytes_per_rank"]),
                _fmt(s.get("rel_err"), ".1e"),
            ]
        )
    return _table(headers, rows)


def _overlap_table(summaries: list[dict]) -> str:
    """Overlap off beside on, per (op, N) that ran both (sharded, timed)."""
    rows = []
    by = {(s["op"], s["world"], s.get("overlap")): s for s in summaries if s["mode"] == "sharded" and s["world"] > 1}
    for (op, n, overlap), off in by.items():
        on = by.get((op, n, True))
        if overlap is not False or on is None or not off["comm_wait_s_per_rank"] or not on["comm_wait_s_per_rank"]:
            continue

        def per_rank(s, kind=None):
            if kind is None:
                return "/".join(f"{w:.3f}" for w in s["comm_wait_s_per_rank"])
            return "/".join(f"{(k or {}).get(kind, 0.0):.3f}" for k in s["comm_wait_s_by_kind_per_rank"])

        row = [op, n]
        for kind in (None, "p2p", "all_gather", "all_reduce"):
            row += [per_rank(off, kind), per_rank(on, kind)]
        row += ["/".join(f"{c:.2f}" for c in off["cpu_s_per_rank"]), "/".join(f"{c:.2f}" for c in on["cpu_s_per_rank"])]
        row += [_fmt(off.get("work_efficiency"), ".3f"), _fmt(on.get("work_efficiency"), ".3f")]
        row += [_fmt(off["wall_s"], ".2f"), _fmt(on["wall_s"], ".2f")]
        rows.append(row)
    if not rows:
        return ""
    headers = ["op", "N"]
    for name in ("wait s", "p2p wait", "all_gather wait", "all_reduce wait", "CPU s", "work eff", "wall s"):
        headers += [f"{name} off", f"{name} on"]
    return _table(headers, rows)


def _projection_table(op: str, proj: dict, bw_gbs: float, latency_us: float) -> tuple[str, dict]:
    base = proj.get(1)
    headers = ["op", "N", "rows", "compute s", "GFLOP", "sent MiB", "recv MiB", "msgs", "proj s", "speed-up", "eff"]
    rows, out = [], {}
    for n, p in sorted(proj.items()):
        if "skipped" in p:
            rows.append([op, n] + ["-"] * 9)
            continue
        comm_s = p["received_bytes"] / (bw_gbs * 1e9) + p["messages"] * latency_us * 1e-6 if n > 1 else 0.0
        total = p["compute_s"] + comm_s
        sp = base["compute_s"] / total if base else None
        out[n] = dict(p, comm_s=comm_s, projected_s=total, speedup=sp, efficiency=sp / n if sp else None)
        rows.append(
            [
                op,
                n,
                p["rows"],
                f"{p['compute_s']:.4f}",
                f"{p['flops'] / 1e9:.1f}",
                _mb(p["sent_bytes"]),
                _mb(p["received_bytes"]),
                p["messages"],
                f"{total:.4f}",
                _fmt(sp, ".2f"),
                _fmt(sp / n if sp else None, ".2f"),
            ]
        )
    return _table(headers, rows), out


def _machine(device: str) -> dict:
    import diffusers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    m = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "platform": platform.platform(),
    }
    if device == "cuda":
        m["gpu"] = torch.cuda.get_device_name(0)
        m["gpus"] = torch.cuda.device_count()
    return m


def _targets(summaries: list[dict], n_cores: int, device: str) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each target of the issue that this run measured."""
    out = []

    def find(op, impl, mode, world):
        return next(
            (
                s
                for s in summaries
                if (s["op"], s["impl"], s["mode"], s["world"]) == (op, impl, mode, world)
                and s.get("overlap") is not False
            ),
            None,
        )

    for op in ("decode", "encode"):
        s1 = find(op, "parallel", "sharded", 1)
        if s1 and s1.get("time_overhead") is not None:
            v = s1["time_overhead"]
            out.append((f"{op}: N=1 time overhead <= 3%", f"{100 * v:+.1f}%", "holds" if v <= 0.03 else "MISSED"))
        for n in (2, 4):
            s = find(op, "parallel", "sharded", n)
            if s and s.get("flop_efficiency") is not None:
                v = s["flop_efficiency"]
                out.append((f"{op}: FLOP efficiency >= 0.99 at N={n}", f"{v:.4f}", "holds" if v >= 0.99 else "MISSED"))
        s2 = find(op, "parallel", "sharded", 2)
        if s2 and s2.get("work_efficiency") is not None and device == "cpu":
            v = s2["work_efficiency"]
            out.append((f"{op}: CPU work efficiency >= 0.85 at N=2", f"{v:.3f}", "holds" if v >= 0.85 else "MISSED"))
        if s2 and s2.get("speedup") is not None and device == "cpu" and n_cores >= 2:
            v = s2["speedup"]
            out.append((f"{op}: 2-rank wall speed-up >= 1.7x", f"{v:.2f}x", "holds" if v >= 1.7 else "MISSED"))
        for n in (2, 4):
            s = find(op, "parallel", "sharded", n)
            if s and s.get("memory_ratio") is not None:
                v = s["memory_ratio"]
                out.append(
                    (f"{op}: peak act/rank <= 1.15 x single/N at N={n}", f"{v:.3f}", "holds" if v <= 1.15 else "MISSED")
                )
        errs = [s["rel_err"] for s in summaries if s["op"] == op and s.get("rel_err") is not None]
        tol = _TOLERANCE.get(summaries[0]["dtype"]) if summaries else None
        if errs and tol is not None:
            v = max(errs)
            verdict = "holds" if v <= tol else "MISSED"
            out.append((f"{op}: exact vs diffusers (rel err <= {tol:g})", f"{v:.1e}", verdict))
    return out


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    from parallel_vae.jobs.models import SEEDED_LAYOUTS

    p.add_argument(
        "--family",
        "--layout",
        dest="layout",
        default="wan2.1",
        choices=list(SEEDED_LAYOUTS),
        help="the model: a family's real layout (parallel_vae.jobs.models.SEEDED_LAYOUTS), random weights",
    )
    p.add_argument(
        "--base_dim", type=int, default=None, help="first block's channel width (default: the real one, 96 for Wan2.1)"
    )
    p.add_argument("--z_dim", type=int, default=None, help="latent channels (default: the real one)")
    p.add_argument(
        "--latent_frames", type=int, default=3, help="latent frames of video families (pixel frames = 1 + 4 (T - 1))"
    )
    p.add_argument("--latent_hw", type=int, nargs=2, default=[16, 16], metavar=("H", "W"), help="latent height, width")
    p.add_argument("--worlds", default="1,2,4", help="world sizes of the parallel runs")
    p.add_argument("--ops", default="decode,encode")
    p.add_argument("--modes", default="sharded,replicated", help="parallel modes (replicated skipped at N=1)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per configuration after the counting run")
    p.add_argument(
        "--overlap",
        default="off,on",
        help="sharded runs with the collectives overlapped with local work (on: the library's default) and waited\n"
        "at once (off), side by side: each rank's wait time per collective and the CPU work (core.comm.set_overlap)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank and for the baseline (CPU)")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tf32", action="store_true", help="allow TF32 on GPU (off by default: exactness is checked)")
    p.add_argument("--projection", default="auto", choices=["auto", "on", "off"], help="auto: on with CUDA")
    p.add_argument("--proj_worlds", default="1,2,4,8")
    p.add_argument(
        "--ceiling",
        default="on",
        choices=["on", "off"],
        help="also time the machine's parallel ceiling on CPU: N processes at once, each computing one rank's\n"
        "shard with its halos fed locally and no communication (every timed N that has a core per rank)",
    )
    p.add_argument(
        "--overheads",
        default="on",
        choices=["on", "off"],
        help="also time the replicated decode with the input fingerprint and fail-fast each switched off,\n"
        "interleaved in one run, and report default / variant ratios",
    )
    p.add_argument("--overhead_world", type=int, default=None, help="ranks of that run (default: the largest N > 1)")
    p.add_argument("--overhead_repeats", type=int, default=3, help="rounds of the four variants (default: %(default)s)")
    p.add_argument("--proj_bw_gbs", type=float, default=100.0, help="link bandwidth (GB/s) assumed by the projection")
    p.add_argument("--proj_latency_us", type=float, default=20.0, help="latency per exchange assumed (us)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument("--json", default=os.path.join("outputs", "bench_vae.json"), help="where to write the JSON")
    p.add_argument("--plots", dest="plots", action="store_true", default=True,
                   help="write PNG charts beside the JSON (default; benchmarks/plots.py, matplotlib: the [bench] extra)")
    p.add_argument("--no_plots", dest="plots", action="store_false", help="write no charts")
    p.add_argument("--report_to", default="none", choices=["none", "wandb"])
    p.add_argument("--wandb_project", default="parallel_vae-bench")
    p.add_argument("--run_name", default=None)
    return p.parse_args(argv)


def _plots(json_path: str) -> None:
    """PNG charts beside the JSON (benchmarks/plots.py)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from plots import write_charts

    write_charts(json_path)


def main(argv=None) -> dict:
    args = _parse(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    worlds = [int(w) for w in args.worlds.split(",") if w]
    ops = [o for o in args.ops.split(",") if o]
    modes = [m for m in args.modes.split(",") if m]
    overlaps = [{"on": True, "off": False}[o] for o in args.overlap.split(",") if o]
    # Spawned ranks inherit this: one OpenMP pool of --threads threads per rank.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    machine = _machine(device)
    cores = machine["cores"]
    started = time.monotonic()
    load_start = os.getloadavg()
    print(f"machine: {machine}", flush=True)
    print("load average at start (1/5/15 min): " + " ".join(f"{v:.2f}" for v in load_start), flush=True)
    common = dict(
        layout=args.layout,
        base_dim=args.base_dim,
        z_dim=args.z_dim,
        latent_frames=args.latent_frames,
        latent_hw=tuple(args.latent_hw),
        dtype=args.dtype,
        device=device,
        threads=args.threads,
        seed=args.seed,
        tf32=args.tf32,
    )
    summaries, raw = [], {}
    for op in ops:
        base_job = Job(impl="diffusers", op=op, mode="full", world=1, repeats=args.repeats, **common)
        load = os.getloadavg()[0]
        print(f"[{time.monotonic() - started:6.1f}s] {op}: unmodified diffusers ...", flush=True)
        base_ranks = _launch(base_job, args.timeout)
        base = _summarize(base_job, base_ranks, None, False, load)
        summaries.append(base)
        raw[f"{op}/diffusers/1"] = base_ranks
        for n in worlds:
            for mode in modes:
                if mode == "replicated" and n == 1:
                    continue
                if device == "cuda" and n > torch.cuda.device_count():
                    print(f"    skip N={n}: {torch.cuda.device_count()} GPU(s)", flush=True)
                    continue
                over = device == "cpu" and n * args.threads > cores
                repeats = 0 if over else (args.repeats if mode == "sharded" else 1)
                ref = base_ranks[0]["ref_file"]
                # Overlap off is a sharded comparison only (N > 1, timed); everything else runs the default (on).
                compare = mode == "sharded" and n > 1 and not over
                for overlap in [o for o in overlaps if not o] if compare else []:
                    job = Job(impl="parallel", op=op, mode=mode, world=n, repeats=repeats, ref_path=ref,
                              overlap=overlap, **common)
                    load = os.getloadavg()[0]
                    elapsed = time.monotonic() - started
                    print(f"[{elapsed:6.1f}s] {op}: parallel {mode} N={n} overlap off ...", flush=True)
                    ranks = _launch(job, args.timeout)
                    summaries.append(_summarize(job, ranks, base, over, load))
                    raw[f"{op}/{mode}/{n}/overlap-off"] = ranks
                if compare and True not in overlaps:
                    continue
                job = Job(impl="parallel", op=op, mode=mode, world=n, repeats=repeats, ref_path=ref, **common)
                load = os.getloadavg()[0]
                tag = " (oversubscribed: memory and counts only)" if over else ""
                print(f"[{time.monotonic() - started:6.1f}s] {op}: parallel {mode} N={n}{tag} ...", flush=True)
                ranks = _launch(job, args.timeout)
                summary = _summarize(job, ranks, base, over, load)
                raw[f"{op}/{mode}/{n}"] = ranks
                if args.ceiling == "on" and device == "cpu" and mode == "sharded" and n > 1 and not over:
                    print(f"[{time.monotonic() - started:6.1f}s] {op}: ceiling N={n} (no communication) ...", flush=True)
                    ceiling = _run_ceiling(job, args.timeout)
                    summary["ceiling_wall_s"] = ceiling["wall_s"]
                    summary["ceiling_walls"] = ceiling["walls"]
                    if summary["wall_s"]:
                        summary["efficiency_vs_linear"] = base["wall_s"] / (n * summary["wall_s"])
                        summary["efficiency_vs_ceiling"] = ceiling["wall_s"] / summary["wall_s"]
                        summary["ceiling_efficiency_vs_linear"] = base["wall_s"] / (n * ceiling["wall_s"])
                summaries.append(summary)
    overheads = None
    if args.overheads == "on" and "decode" in ops:
        # the largest N > 1 that has a core (CPU) or a device (GPU) per rank: an oversubscribed run times the queue
        room = torch.cuda.device_count() if device == "cuda" else cores // args.threads
        n = args.overhead_world or max([w for w in worlds if 1 < w <= room] or [2])
        job = Job(impl="parallel", op="decode", mode="overheads", world=n, repeats=args.overhead_repeats, **common)
        print(f"[{time.monotonic() - started:6.1f}s] decode: reliability checks on/off, replicated N={n} ...", flush=True)
        overheads = dict(_overheads(_launch(job, args.timeout)), world=n, repeats=args.overhead_repeats)
    projections = {}
    run_proj = args.projection == "on" or (args.projection == "auto" and device == "cuda")
    if run_proj:
        pworlds = [int(w) for w in args.proj_worlds.split(",") if w]
        for op in ops:
            print(f"[{time.monotonic() - started:6.1f}s] {op}: single-device projection N={pworlds} ...", flush=True)
            job = Job(impl="parallel", op=op, mode="projection", world=1, repeats=max(1, args.repeats), **common)
            projections[op] = _run_projection(job, pworlds, args.timeout)

    if _KEEP:
        shutil.rmtree(_KEEP.pop(), ignore_errors=True)
    load_end = os.getloadavg()
    elapsed = time.monotonic() - started
    shape = f"{args.latent_frames} latent frames of {args.latent_hw[0]}x{args.latent_hw[1]}"
    width = f"base_dim {args.base_dim or 'real'}"
    print()
    print(f"== parallel_vae vs unmodified diffusers: {args.layout} ({width}), {shape}, {args.dtype}, {device} ==")
    gpus = f", {machine.get('gpus')} x {machine.get('gpu')}" if device == "cuda" else ""
    print(f"machine: {machine['cpu']}, {cores} cores{gpus}")
    print(f"threads per rank: {args.threads}; timed runs: min of {args.repeats} after a counting/warm-up run")
    print(f"load average (1 min) at start {load_start[0]:.2f}, at end {load_end[0]:.2f}; total {elapsed:.0f}s")
    # Only the load before the first configuration is other work's: later readings include this script's ranks.
    if device == "cpu" and load_start[0] > 1.0:
        print(
            f"WARNING: other work was running (load average {load_start[0]:.1f} on {cores} cores at start): wall\n"
            "times and speed-ups are unreliable. FLOPs, memory, bytes and exactness do not depend on load; CPU\n"
            "times barely."
        )
    print()
    print(_main_table(summaries))
    print()
    print(
        "wall = slowest rank; CPU s/rank = process CPU time per rank; wait = time blocked in collectives (waiting\n"
        "for peers and transfers); work eff = baseline CPU / sum of rank CPU;\n"
        "FLOP eff = baseline FLOPs / sum of rank FLOPs; peak act = peak live tensor bytes of the op (CPU: storage\n"
        "tracker; GPU: max_memory_allocated above weights+input), weights separate; vs 1/N = max rank peak /\n"
        "(baseline peak / N); RSS = process peak resident set; sent = bytes this rank sent (halo rows, K/V,\n"
        "metadata); rel err = max |parallel - diffusers| / max |diffusers|. 'oversub.': more ranks than cores,\n"
        "speed not reported."
    )
    overlap_table = _overlap_table(summaries)
    if overlap_table:
        print()
        print("== overlap off vs on (sharded): each rank's time blocked in collectives, in all and per kind, and the\n"
              "   CPU work; rank 0/rank 1/... ==")
        print(overlap_table)
        print("wait = wall time blocked in the collectives' waits (core.comm._wait_tensor: the halo all-to-all\n"
              "'p2p', the K/V 'all_gather' (also the GroupNorm statistics), the GroupNorm backward 'all_reduce');\n"
              "off = wait right after posting, on = the interior conv / the query projection run first; work eff =\n"
              "baseline CPU / sum of rank CPU. CPU only: on NCCL the host does not block in a wait.")
    ceilings = [s for s in summaries if s.get("ceiling_wall_s") is not None]
    if ceilings:
        print()
        print(f"== the machine's parallel ceiling ({machine['cpu']}, {cores} cores): N processes at once, each "
              "computing one\n   rank's shard with its halos fed locally (parallel_vae's layers, no communication) ==")
        rows = [[s["op"], s["world"], _fmt(s["wall_s"], ".2f"), _fmt(s["ceiling_wall_s"], ".2f"),
                 _fmt(s.get("efficiency_vs_linear"), ".3f"), _fmt(s.get("ceiling_efficiency_vs_linear"), ".3f"),
                 _fmt(s.get("efficiency_vs_ceiling"), ".3f")] for s in ceilings]
        print(_table(["op", "N", "sharded wall s", "ceiling wall s", "eff vs T1/N", "ceiling vs T1/N",
                      "eff vs ceiling"], rows))
        print("eff vs T1/N = diffusers wall / (N x sharded wall); ceiling vs T1/N = the same for the no-communication\n"
              "shards: what the machine allows; eff vs ceiling = ceiling wall / sharded wall: what communication and\n"
              "waiting cost on top.")
    if overheads:
        print()
        print(f"== cost of the reliability checks: replicated vae.decode, N={overheads['world']}, best of "
              f"{overheads['repeats']} interleaved rounds ==")
        default = overheads["wall_s"]["default"]
        rows = [[name, _fmt(overheads["wall_s"][name], ".4f"), _fmt(overheads["ratio_default_over"][name], ".4f"),
                 _fmt(overheads["median_wall_s"][name], ".4f"), _fmt(overheads["median_ratio_default_over"][name], ".4f")]
                for name in _VARIANTS]
        print(_table(["variant", "best wall s", "default / variant", "median wall s", "median ratio"], rows))
        print(f"default = input fingerprint + fail-fast (both on); one fingerprint alone: "
              f"{overheads['fingerprint_alone_s'] * 1e3:.3f} ms ({overheads['fingerprint_alone_s'] / default:.2e} of "
              f"the decode) over {overheads['input_elements']} input elements")
    proj_out = {}
    if projections:
        print()
        print(
            "== PROJECTION, not a measurement of multiple devices: one rank's shard timed alone on one device, halos\n"
            f"   fed locally (no communication); communication added as bytes / {args.proj_bw_gbs:g} GB/s + "
            f"{args.proj_latency_us:g} us per exchange, not overlapped =="
        )
        for op, proj in projections.items():
            table, proj_out[op] = _projection_table(op, proj, args.proj_bw_gbs, args.proj_latency_us)
            print(table)
        print("anchor to beat (seed, GPU): 4 GPUs 2.75x (69% efficiency), 8 GPUs 3.58x (45%)")
    targets = _targets(summaries, cores, device)
    if targets:
        print()
        print(_table(["target", "measured", "verdict"], [list(t) for t in targets]))
    report = {
        "args": vars(args),
        "device": device,
        "machine": machine,
        "load_avg_start": load_start,
        "load_avg_end": load_end,
        "elapsed_s": elapsed,
        "results": summaries,
        "overheads": overheads,
        "projection": {op: {str(n): v for n, v in p.items()} for op, p in proj_out.items()},
        "projection_assumptions": {"bw_gbs": args.proj_bw_gbs, "latency_us": args.proj_latency_us},
        "targets": [{"target": t, "measured": m, "verdict": v} for t, m, v in targets],
    }
    text = json.dumps(report, indent=1, default=str)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text)
        if args.plots:
            _plots(args.json)
    print()
    print("JSON:")
    print(text)
    if args.report_to == "wandb":
        _log_wandb(args, report)
    return report


def _log_wandb(args, report: dict) -> None:
    import wandb

    config = dict(report["args"], machine=report["machine"])
    run = wandb.init(project=args.wandb_project, name=args.run_name, config=config)
    cols = ["op", "impl", "mode", "world", "wall_s", "speedup", "work_efficiency", "flop_efficiency", "memory_ratio",
            "max_peak_live_mib", "max_sent_mib", "rel_err"]
    table = wandb.Table(columns=cols)
    for s in report["results"]:
        peaks = [p for p in s["peak_live_bytes_per_rank"] if p is not None]
        table.add_data(
            s["op"], s["impl"], s["mode"], s["world"], s["wall_s"], s.get("speedup"), s.get("work_efficiency"),
            s.get("flop_efficiency"), s.get("memory_ratio"), max(peaks) / 2**20 if peaks else None,
            max(s["sent_bytes_per_rank"]) / 2**20, s.get("rel_err"),
        )
        key = f"{s['op']}/{s['mode']}/N{s['world']}"
        metrics = ("wall_s", "speedup", "work_efficiency", "flop_efficiency", "memory_ratio", "rel_err",
                   "ceiling_wall_s", "efficiency_vs_linear", "efficiency_vs_ceiling")
        run.summary.update({f"{key}/{k}": s.get(k) for k in metrics})
    run.log({"results": table})
    for op, proj in report["projection"].items():
        ptable = wandb.Table(columns=["world", "compute_s", "projected_s", "speedup", "efficiency", "received_mib"])
        for n, p in proj.items():
            mib = p["received_bytes"] / 2**20
            ptable.add_data(int(n), p["compute_s"], p["projected_s"], p["speedup"], p["efficiency"], mib)
        run.log({f"projection/{op}": ptable})
    run.summary.update({"load_avg_start": report["load_avg_start"][0], "load_avg_end": report["load_avg_end"][0]})
    run.finish()


if __name__ == "__main__":
    main()

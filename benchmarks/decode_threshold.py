"""Measure where sharded decoding starts to pay: 1-process decode vs the same latents split over all ranks.

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml benchmarks/decode_threshold.py

For each latent size: rank 0 decodes the whole latent with the unmodified model while the other ranks wait
(the 1-process time), then all ranks decode it sharded through the library path and gather the video (the
N-process time). The two alternate, ``--repeats`` times after one warm-up each, and the fastest run of each
counts: on a shared machine, load from other jobs only ever adds time, so the minimum is the steadiest figure. Prints a table and the threshold for
``recipes/decode.py --auto_threshold``: the smallest per-rank work from which every measured size ran faster
sharded, in GFLOP of the busiest rank's share of the decode (``parallel_vae.jobs.fake_run.decode_flops_per_rank``,
the count ``--parallel auto`` uses; latent elements per rank are listed beside it). Writes the numbers to
``--output`` (JSON).

It also reports the speedup in CPU time (1-process CPU seconds / the busiest rank's CPU seconds), which load from
other jobs barely moves but which leaves out time spent waiting for messages: an upper bound on the wall speedup
when every rank has a core (or device) of its own.

One thread per rank (what ``accelerate launch`` sets), so each rank stands in for one device. On a shared machine
the numbers are noisy: rerun, and read the speedups near 1.0 as "no clear gain".
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import parallel_vae as pv  # noqa: E402
from parallel_vae.jobs.fake_run import decode_flops_per_rank  # noqa: E402
from parallel_vae.jobs.loading import default_vae  # noqa: E402
from parallel_vae.jobs.metrics import write_json  # noqa: E402
from parallel_vae.jobs.runtime import start_runtime  # noqa: E402

# (latent frames, rows, cols): from a couple of latent pixels to a 17-frame 128x128 clip.
SIZES = [(1, 2, 2), (1, 2, 4), (1, 4, 4), (2, 4, 4), (2, 4, 8), (2, 8, 8), (3, 8, 8), (5, 8, 8), (5, 8, 12), (5, 16, 16)]


def _time(fn, rank_runs: bool, rt) -> tuple[float, float]:
    """(wall seconds until the slowest rank is done, CPU seconds of the busiest rank)."""
    rt.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    if rank_runs:
        fn()
    cpu = torch.tensor([time.process_time() - cpu], dtype=torch.float64)
    rt.barrier()
    wall = time.perf_counter() - start
    dist.all_reduce(cpu, op=dist.ReduceOp.MAX)
    return wall, cpu.item()


def _compare(single_fn, sharded_fn, repeats: int, rt) -> dict:
    """Fastest of ``repeats`` runs of each mode, alternating the modes so that load from other jobs on a shared
    machine hits both alike; one untimed warm-up run of each first."""
    runs = {"single": [], "sharded": []}
    for i in range(repeats + 1):
        a = _time(single_fn, rt.is_main, rt)
        b = _time(sharded_fn, True, rt)
        if i:
            runs["single"].append(a)
            runs["sharded"].append(b)
    return {
        "single_s": min(w for w, _ in runs["single"]),
        "sharded_s": min(w for w, _ in runs["sharded"]),
        "single_cpu_s": min(c for _, c in runs["single"]),
        "sharded_cpu_s": min(c for _, c in runs["sharded"]),
    }


def _threshold(rows: list[dict], key: str):
    """The smallest work per rank from which every larger measured size had speedup ``key`` > 1 (None: never)."""
    threshold = None
    for r in sorted(rows, key=lambda r: r["work_per_rank"], reverse=True):
        if r[key] <= 1.0:
            break
        threshold = r["work_per_rank"]
    return threshold


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=4, help="timed runs per size and mode (default: %(default)s)")
    p.add_argument("--output", default="outputs/decode_threshold.json", help="JSON results (default: %(default)s)")
    p.add_argument("--max_work", type=int, default=None, help="skip sizes with more latent elements than this")
    args = p.parse_args()

    rt = start_runtime(timeout_s=1800, prog="decode_threshold.py")
    world = rt.world_size
    if world < 2:
        raise SystemExit("launch with at least 2 processes, e.g. --config_file accelerate_configs/cpu_2proc.yaml")
    reference, source = default_vae()
    parallel, _ = default_vae()
    pv.enable_spatial_parallelism(parallel, rt.group)
    z_dim = reference.config.z_dim
    rows = []
    for t, h, w in SIZES:
        if args.max_work and t * h * w > args.max_work:
            continue
        z = torch.randn(1, z_dim, t, h, w, generator=torch.Generator().manual_seed(0))
        times = _compare(lambda: pv.decode_video(reference, z), lambda: pv.decode_video(parallel, z), args.repeats, rt)
        elements = t * math.ceil(h / world) * w
        work = decode_flops_per_rank(reference, tuple(z.shape), world) / 1e9
        row = dict(latent=(t, h, w), latent_elements_per_rank=elements, work_per_rank=work, **times)
        row["speedup"] = times["single_s"] / times["sharded_s"]
        row["cpu_speedup"] = times["single_cpu_s"] / times["sharded_cpu_s"]
        rows.append(row)
        if rt.is_main:
            print(f"latent T,h,w={t},{h},{w}  elements/rank={elements:5d}  GFLOP/rank={work:8.3f}  wall: 1 proc {times['single_s']:7.3f}s  "
                  f"{world} procs {times['sharded_s']:7.3f}s  speedup {row['speedup']:5.2f}   "
                  f"busiest rank's CPU time speedup {row['cpu_speedup']:5.2f}", flush=True)
    threshold, cpu_threshold = _threshold(rows, "speedup"), _threshold(rows, "cpu_speedup")
    if rt.is_main:
        result = {
            "world_size": world,
            "model": source,
            "threads_per_rank": torch.get_num_threads(),
            "device": str(rt.device),
            "rows": rows,
            "threshold_gflop_per_rank": threshold,
            "cpu_time_threshold_gflop_per_rank": cpu_threshold,
            "load_average": os.getloadavg(),
        }
        write_json(result, args.output)
        print(f"threshold GFLOP/rank (pass as --auto_threshold): {threshold}  (from CPU time alone: {cpu_threshold})  "
              f"load average {os.getloadavg()}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

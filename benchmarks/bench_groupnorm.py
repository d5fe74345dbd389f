#!/usr/bin/env python
"""The distributed GroupNorm (``parallel_vae.core.norm``) against torch's ``F.group_norm`` on the same tensor.

For each shape, dtype (float32, bfloat16) and path, the best of ``--repeat`` timed calls (after warm-up calls that
also compile the kernels; ours and torch's called in turn), forward and forward + backward, as the ratio ours /
torch's:

* ``N=1``: one process, group size 1;
* ``N=2``: two spawned ranks (gloo on CPU, NCCL on CUDA), each holding half the rows (dim -2) of the tensor; ours
  runs the merge path (one all-gather forward, one all-reduce backward), torch's runs ``F.group_norm`` on the same
  shard. ``excl. comm`` subtracts the time ours spent blocked in those collectives (``comm.count_traffic``).

CPU allocator (``--allocator``): by default glibc is told to keep freed memory for reuse (``mallopt``: mmap and trim
thresholds raised), for ours and torch's alike. Otherwise every call's 32 MiB output is a fresh ``mmap`` whose
first touch page-faults: measured here, ``torch.empty_like(x).fill_(0)`` on the image tensor took 62 to 123 ms fresh
and 2.7 ms reused, against 3 ms for our whole statistics pass, so the fresh ratios measure the kernel's page faults
and the machine's load, not the kernels. A GPU's caching allocator reuses memory the same way.
``--allocator fresh`` keeps glibc's defaults.

Peak memory above the live input (and dy) during one call, ours and torch's: on CPU from the profiler's allocator
events, on CUDA ``torch.cuda.max_memory_allocated``. Prints a table and writes ``--json``.

    python benchmarks/bench_groupnorm.py                     # CPU, one thread per rank, ~3 min incl. compiles
    python benchmarks/bench_groupnorm.py --device cuda       # on a GPU (NCCL for the 2-rank rows; needs 2 GPUs)
    PARALLEL_VAE_GROUPNORM=eager python benchmarks/bench_groupnorm.py   # the eager kernels
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

SHAPES = {"video": (1, 128, 9, 64, 128), "image": (1, 512, 128, 128)}
GROUPS = 32
DTYPES = ("float32", "bfloat16")


def _reuse_freed_memory() -> bool:
    """glibc: serve large allocations from the heap and keep freed memory (see the module docstring)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        # M_MMAP_THRESHOLD (-3) 1 GiB, M_TRIM_THRESHOLD (-1) 2 GiB; mallopt returns 1 on success
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, 1 << 31))
    except (OSError, AttributeError):
        return False


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _best_interleaved(fns, repeat, device) -> list:
    """The best of ``repeat`` timed calls of each of ``fns``, called in turn (ours, torch's, ours, ...), so that a
    change of the machine's load during the measurement reaches both alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], _timed(fn, device))
    return best


def _peak_bytes(fn, device):
    """Peak bytes allocated during ``fn()`` above what was live before it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # the allocator's own events (allocations are positive, frees negative), inductor's kernels' buffers included
    events = prof.profiler.kineto_results.events()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, d in deltas:
        live += d
        peak = max(peak, live)
    return peak


def _measure(x_full, w, b, group, rank, world, repeat, warmup):
    """(ours, torch's) times and peaks on this rank's shard: forward, forward + backward."""
    import torch
    import torch.nn.functional as F

    from parallel_vae.core import comm, norm

    rows = x_full.shape[-2]
    start, length = rank * rows // world, (rank + 1) * rows // world - rank * rows // world
    x = x_full.narrow(-2, start, length).contiguous().requires_grad_(True)
    dy = torch.randn_like(x)
    device = x.device

    def ours_f():
        with torch.no_grad():
            return norm.distributed_group_norm(x, GROUPS, w, b, 1e-6, group)

    def ref_f():
        with torch.no_grad():
            return F.group_norm(x, GROUPS, w, b, 1e-6)

    def ours_fb():
        torch.autograd.grad(norm.distributed_group_norm(x, GROUPS, w, b, 1e-6, group), (x, w, b), dy)

    def ref_fb():
        torch.autograd.grad(F.group_norm(x, GROUPS, w, b, 1e-6), (x, w, b), dy)

    for _ in range(warmup):  # compiles, then warms the allocator
        ours_f(), ref_f(), ours_fb(), ref_fb()
    res = {"mode": norm.kernel_mode(x)}
    for name, ours, ref in (("fwd", ours_f, ref_f), ("fwd_bwd", ours_fb, ref_fb)):
        with comm.count_traffic() as c:  # only ours waits in collectives
            t_ours, t_ref = _best_interleaved((ours, ref), repeat, device)
        # the wait of the best call is at most the total wait over all calls / repeat; report the mean per call
        wait = c.wait_s / repeat
        res[name] = {"ours_s": t_ours, "torch_s": t_ref, "ratio": t_ours / t_ref,
                     "ratio_excl_comm": max(t_ours - wait, 0.0) / t_ref, "comm_wait_s": wait,
                     "peak_ours": _peak_bytes(ours, device), "peak_torch": _peak_bytes(ref, device)}
    res["shard_bytes"] = x.numel() * x.element_size()
    return res


def _cases(device_name, repeat, warmup, rank=0, world=1, group=None):
    import torch

    torch.manual_seed(0)
    device = torch.device(device_name)
    out = {}
    for shape_name, shape in SHAPES.items():
        for dt in DTYPES:
            dtype = getattr(torch, dt)
            x = torch.randn(shape, device=device).to(dtype)
            w = torch.randn(shape[1], device=device).to(dtype).requires_grad_(True)
            b = torch.randn(shape[1], device=device).to(dtype).requires_grad_(True)
            out[f"{shape_name}/{dt}"] = _measure(x, w, b, group, rank, world, repeat, warmup)
    return out


def _rank_main(rank, world, store_path, device_name, repeat, warmup, threads, allocator, queue):
    import torch
    import torch.distributed as dist

    if allocator == "reuse" and device_name == "cpu":
        _reuse_freed_memory()
    torch.set_num_threads(threads)
    if device_name == "cuda":
        torch.cuda.set_device(rank)
        device_name = f"cuda:{rank}"
    backend = "nccl" if device_name.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        res = _cases(device_name, repeat, warmup, rank, world, dist.group.WORLD)
        queue.put((rank, res))
    finally:
        dist.destroy_process_group()


def _two_ranks(args):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_rank_main, args=(r, 2, os.path.join(d, "store"), args.device, args.repeat,
                                                      args.warmup, args.threads, args.allocator, q)) for r in range(2)]
        for p in procs:
            p.start()
        got = dict(q.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
    # the slower rank decides a collective's time: report the larger ratio of the two
    res = {}
    for key in got[0]:
        a, b = got[0][key], got[1][key]
        res[key] = {"mode": a["mode"], "shard_bytes": a["shard_bytes"]}
        for part in ("fwd", "fwd_bwd"):
            res[key][part] = max(a[part], b[part], key=lambda m: m["ratio"])
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeat", type=int, default=10, help="timed calls per measurement, best taken (default: 10)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank (default: 1)")
    p.add_argument("--worlds", default="1,2", help="group sizes to run: 1 and/or 2 (default: %(default)s)")
    p.add_argument("--allocator", default="reuse", choices=["reuse", "fresh"],
                   help="CPU: keep freed memory for reuse (default) or glibc's defaults (see the docstring)")
    p.add_argument("--json", default=os.path.join("outputs", "bench_groupnorm.json"))
    args = p.parse_args(argv)
    import torch

    allocator = args.allocator
    if args.device == "cpu" and allocator == "reuse" and not _reuse_freed_memory():
        allocator = "fresh (mallopt unavailable)"

    torch.set_num_threads(args.threads)
    results = {}
    worlds = [int(w) for w in args.worlds.split(",")]
    if 1 in worlds:
        results["N=1"] = _cases(args.device, args.repeat, args.warmup)
    if 2 in worlds:
        results["N=2"] = _two_ranks(args)
    rows = []
    for path, cases in results.items():
        for key, r in cases.items():
            for part in ("fwd", "fwd_bwd"):
                m = r[part]
                rows.append([path, key, part, r["mode"], f"{m['torch_s'] * 1e3:.2f}", f"{m['ours_s'] * 1e3:.2f}",
                             f"{m['ratio']:.2f}", f"{m['ratio_excl_comm']:.2f}",
                             f"{m['peak_ours'] / r['shard_bytes']:.2f}", f"{m['peak_torch'] / r['shard_bytes']:.2f}"])
    head = ["path", "shape/dtype", "pass", "kernels", "torch ms", "ours ms", "ours/torch", "excl. comm",
            "peak ours / shard", "peak torch / shard"]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in [head] + rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    print(f"shapes: {SHAPES}, {GROUPS} groups; best of {args.repeat}; {args.threads} thread(s) per rank; "
          f"torch {torch.__version__}, device {args.device}, allocator {allocator}; peak = bytes allocated during one call above the live "
          "input (and dy), per byte of the shard")
    meta = {"shapes": SHAPES, "groups": GROUPS, "repeat": args.repeat, "threads": args.threads,
            "device": args.device, "allocator": allocator, "torch": torch.__version__, "env": os.environ.get("PARALLEL_VAE_GROUPNORM", "auto")}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(json.dumps({"meta": meta, "results": results}))


if __name__ == "__main__":
    main()

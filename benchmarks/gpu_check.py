#!/usr/bin/env python
"""One script for the day a GPU is lent: what only a GPU can show, on ONE GPU, in under 8 minutes.

NOT YET RUN ON A GPU: no number of it exists yet; the README must not quote any until it has run.

Sections (each reports its own errors and never stops the others; every section's wall time is printed):

1. ``parity``: CUDA parity of the parallel layers' arithmetic with halos fed locally (one process, the ranks
   simulated): for every simulated rank of N = 2, 3, 4, its rows plus the neighbours' halo rows taken from the full
   tensor (what the exchange would deliver; zeros at the global edges) through the same kernels, against the full
   tensor on the same GPU: 3x3(x3) convs (cuDNN picks algorithms per shape), the GroupNorm statistics merge
   (``group_stats`` + ``merge_stats``, Chan's formula) and the sharded attention (own queries against the whole
   frame's keys/values through SDPA's CUDA kernels). float32 is judged at 1e-5; bfloat16 is reported beside the
   unmodified bfloat16 op's own distance from float32.
2. ``shards``: per-rank shard times of the 1280x720x81 Wan2.1 decode (latents 16 x 21 x 90 x 160, full width,
   bfloat16) for N = 1, 2, 4, 8, one shard at a time on the GPU: the busiest rank (the largest shard, interior when
   there is one), its collectives simulated without communication (``bench_vae._simulated_group``: received halos
   are zeros, gathers repeat this rank's shard). CUDA-event times and ``max_memory_allocated`` over the run.
3. ``prediction``: the fake-tensor prediction of the same rank's peak (``jobs/fake_run.measure_rank``, on the CPU)
   beside the measured CUDA peak of section 2.
4. ``groupnorm``: the distributed GroupNorm (group of one: ``distributed_group_norm``) against ``F.group_norm`` on
   (1, 128, 9, 64, 128), float32 and bfloat16, forward and forward + backward, best of 5.
5. ``compile``: ``torch.compile`` (inductor; ``--smoke``: the eager backend, Dynamo's tracing only) of a narrow
   Wan decoder's shard against eager, at N = 1 and a simulated N = 2: time of the first (compiling) and a later
   call, and the max relative difference.

Usage:

    python benchmarks/gpu_check.py --json gpu_check.json          # on one GPU (< 8 min)
    python benchmarks/gpu_check.py --smoke                        # CPU, tiny sizes, ~10 s (tests/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from typing import Callable, Optional

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))

FLOAT32_BAR = 1e-5


def _bench_vae():
    spec = importlib.util.spec_from_file_location("_pv_bench_vae", os.path.join(_HERE, "bench_vae.py"))
    mod = sys.modules.get(spec.name)
    if mod is None:
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # its dataclasses look their module up there
        spec.loader.exec_module(mod)
    return mod


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable, device: torch.device, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up (CUDA events on GPU)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


# --------------------------------------------------------------------------------------------------------------
# 1. parity with halos fed locally
# --------------------------------------------------------------------------------------------------------------


def _row_ranges(rows: int, world: int):
    from parallel_vae.core.sharding import row_offsets, row_split

    sizes = row_split(rows, world)
    return list(zip(row_offsets(sizes), sizes))


def _conv_shards(x: torch.Tensor, conv: Callable, world: int) -> torch.Tensor:
    """Each simulated rank: its rows with one halo row each side from the full tensor (zeros at the global
    edges: the layer's own zero padding), convolved without row padding; the shards concatenated."""
    rows = x.shape[-2]
    outs = []
    for start, n in _row_ranges(rows, world):
        top = x.narrow(-2, start - 1, 1) if start > 0 else torch.zeros_like(x.narrow(-2, 0, 1))
        end = start + n
        bottom = x.narrow(-2, end, 1) if end < rows else torch.zeros_like(x.narrow(-2, 0, 1))
        outs.append(conv(torch.cat([top, x.narrow(-2, start, n), bottom], -2)))
    return torch.cat(outs, -2)


def parity(device: torch.device, smoke: bool) -> dict:
    from parallel_vae.core.norm import group_stats, merge_stats

    g = torch.Generator().manual_seed(0)
    c, t, h, w = (8, 3, 12, 10) if smoke else (128, 3, 90, 160)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        x = torch.randn((1, c, t, h, w), generator=g).to(device, dtype)
        w3 = (torch.randn((c, c, 3, 3, 3), generator=g) / math.sqrt(27 * c)).to(device, dtype)
        w2 = w3[:, :, 1].contiguous()
        x2 = x[:, :, 0]
        # pixel tokens (B, 1, h*w, c) for attention: rows are contiguous blocks of w tokens
        tokens = x2.flatten(2).transpose(1, 2).unsqueeze(1)
        for world in (2, 3, 4):
            r = {}
            # conv3d: time causal (two zero frames in front, as Wan's cache would), rows by halo, width padded
            full3 = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), w3)
            part3 = _conv_shards(x, lambda s: F.conv3d(F.pad(s, (1, 1, 0, 0, 2, 0)), w3), world)
            r["conv3d"] = _rel(part3, full3)
            full2 = F.conv2d(x2, w2, padding=1)
            part2 = _conv_shards(x2, lambda s: F.conv2d(F.pad(s, (1, 1, 0, 0)), w2), world)
            r["conv2d"] = _rel(part2, full2)
            # GroupNorm statistics: per-rank (count, mean, M2), merged, vs the whole tensor's group_norm
            groups = 4 if smoke else 32
            tables = []
            for s, n in _row_ranges(h, world):
                x4 = x.narrow(-2, s, n).reshape(1, groups, x.shape[1] // groups, -1)  # (B, G, C/G, positions)
                m, q = group_stats(x4)
                tables.append(torch.stack([torch.full_like(m, float(x4[0, 0].numel()), dtype=torch.float64),
                                           m.double(), q.double()], -1))  # fmt: skip
            count, mean, m2 = merge_stats(torch.stack(tables))
            var = m2 / count
            shape = (1, groups, -1)
            normed = ((x.double().reshape(shape) - mean.unsqueeze(-1)) / (var.unsqueeze(-1) + 1e-6).sqrt()).reshape(
                x.shape
            )
            r["groupnorm_merge"] = _rel(normed.to(dtype), F.group_norm(x, groups, eps=1e-6))
            # attention: each rank's queries against every rank's keys/values
            parts = []
            for s, n in _row_ranges(h, world):
                q = tokens.narrow(2, s * w, n * w)
                parts.append(F.scaled_dot_product_attention(q, tokens, tokens))
            r["attention"] = _rel(torch.cat(parts, 2), F.scaled_dot_product_attention(tokens, tokens, tokens))
            results[f"{name}/N={world}"] = r
        if dtype == torch.bfloat16:  # the unmodified bf16 ops' own distance from float32, for scale
            x32 = x.float()
            t32 = tokens.float()
            results["bfloat16/own_rounding"] = {
                "conv3d": _rel(F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), w3), F.conv3d(F.pad(x32, (1, 1, 1, 1, 2, 0)), w3.float())),
                "conv2d": _rel(F.conv2d(x2, w2, padding=1), F.conv2d(x2.float(), w2.float(), padding=1)),
                "groupnorm_merge": _rel(F.group_norm(x, groups, eps=1e-6), F.group_norm(x32, groups, eps=1e-6)),
                "attention": _rel(F.scaled_dot_product_attention(tokens, tokens, tokens), F.scaled_dot_product_attention(t32, t32, t32)),
            }
    failed = [k for k, v in results.items() if k.startswith("float32") and max(v.values()) > FLOAT32_BAR]
    return {"results": results, "float32_bar": FLOAT32_BAR, "float32_pass": not failed, "float32_failed": failed}


# --------------------------------------------------------------------------------------------------------------
# 2 + 3. per-rank shard times and peaks; the fake-tensor prediction
# --------------------------------------------------------------------------------------------------------------


def _wan_setup(smoke: bool):
    from parallel_vae.jobs.models import seeded_config

    if smoke:  # tiny: 2 latent frames, 4 x 3 latent rows x columns
        cls_name, cfg = seeded_config("wan2.1", width=8, latent=4)
        return cls_name, cfg, 1, 4 * 8, 3 * 8, torch.float32, (1, 2)
    cls_name, cfg = seeded_config("wan2.1")  # full width
    return cls_name, cfg, 81, 720, 1280, torch.bfloat16, (1, 2, 4, 8)


def _busiest(rows_total: int, world: int) -> tuple[int, int]:
    """(rank, latent rows): the largest shard, an interior rank when there is one (halos on both sides)."""
    from parallel_vae.core.sharding import row_split

    sizes = row_split(rows_total, world)
    inner = [r for r in range(1, world - 1) if sizes[r] == max(sizes)]
    rank = inner[0] if inner else 0
    return rank, sizes[rank]


def shards(device: torch.device, smoke: bool, repeats: int) -> dict:
    from parallel_vae.core.plan import SpatialState, apply_plan, remove_plan
    from parallel_vae.families import adapter_for, plan_for
    from parallel_vae.jobs.fake_run import build_model, local_input

    bench = _bench_vae()
    cls_name, cfg, frames, height, width, dtype, worlds = _wan_setup(smoke)
    torch.manual_seed(0)
    vae = build_model(cls_name, cfg, dtype).to(device)
    adapter = adapter_for(vae)
    f = adapter.spatial_factor(vae)
    rows_total = height // f
    out = {"shape": f"{width}x{height}x{frames}", "dtype": str(dtype).replace("torch.", ""), "worlds": {}}
    for n in worlds:
        rank, rows = _busiest(rows_total, n)
        z = local_input(vae, "decode", frames, height, width, rows, dtype).to(device)
        if n > 1:
            apply_plan(vae, plan_for(vae), SpatialState(None, n, f, adapter))
        ctx = bench._simulated_group(n, rank) if n > 1 else contextlib.nullcontext()
        try:
            with ctx, torch.no_grad():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                seconds = _time(lambda: adapter.decode_local(vae, z), device, repeats)
                peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
        finally:
            if n > 1:
                remove_plan(vae)
        out["worlds"][n] = {"rank": rank, "latent_rows": rows, "seconds": seconds, "cuda_peak_bytes": peak}
        del z
    del vae
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def prediction(smoke: bool, shard_result: Optional[dict]) -> dict:
    """The fake-tensor peak of the same rank (CPU, no values), beside the measured CUDA peak."""
    from parallel_vae.jobs.fake_run import measure_rank

    cls_name, cfg, frames, height, width, dtype, worlds = _wan_setup(smoke)
    f = 8
    out = {}
    for n in worlds:
        rank, rows = _busiest(height // f, n)
        m = measure_rank(cls_name, cfg, "decode", frames, height, width, n, rank, dtype, fake=True)
        measured = (shard_result or {}).get("worlds", {}).get(n, {}).get("cuda_peak_bytes")
        # both are the op's working set: the fake tracker counts tensors the ops create (not weights or the input),
        # the CUDA figure is max_memory_allocated above what was allocated before the call (weights, input)
        working = m["peak_live_bytes"]
        out[n] = {
            "rank": rank,
            "predicted_peak_bytes": m["peak_live_bytes"],
            "predicted_working_bytes": working,
            "measured_cuda_bytes": measured,
            "measured_over_predicted": (measured / working) if measured and working > 0 else None,
        }
    return out


# --------------------------------------------------------------------------------------------------------------
# 4. GroupNorm kernel
# --------------------------------------------------------------------------------------------------------------


def groupnorm(device: torch.device, smoke: bool, repeats: int) -> dict:
    from parallel_vae.core.norm import distributed_group_norm

    shape = (1, 8, 3, 8, 16) if smoke else (1, 128, 9, 64, 128)
    groups = 4 if smoke else 32
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        wgt = torch.randn(shape[1], device=device, dtype=dtype, requires_grad=True)
        bias = torch.randn(shape[1], device=device, dtype=dtype, requires_grad=True)
        gy = torch.randn(shape, device=device, dtype=dtype)

        def ours():
            return distributed_group_norm(x, groups, wgt, bias, 1e-6, None)

        def torchs():
            return F.group_norm(x, groups, wgt, bias, 1e-6)

        row = {}
        for label, fn in (("ours", ours), ("torch", torchs)):
            with torch.no_grad():
                row[f"{label}_forward_s"] = _time(fn, device, repeats)
            row[f"{label}_fwd_bwd_s"] = _time(lambda: torch.autograd.grad(fn(), (x, wgt, bias), gy), device, repeats)
        row["forward_ratio"] = row["ours_forward_s"] / row["torch_forward_s"]
        row["fwd_bwd_ratio"] = row["ours_fwd_bwd_s"] / row["torch_fwd_bwd_s"]
        with torch.no_grad():
            row["max_rel_err"] = _rel(ours(), torchs())
        out[str(dtype).replace("torch.", "")] = row
    return out


# --------------------------------------------------------------------------------------------------------------
# 5. compiled against eager
# --------------------------------------------------------------------------------------------------------------


def compiled(device: torch.device, smoke: bool) -> dict:
    from parallel_vae.core.plan import SpatialState, apply_plan, remove_plan
    from parallel_vae.families import adapter_for, plan_for
    from parallel_vae.jobs.fake_run import build_model, local_input
    from parallel_vae.jobs.models import seeded_config

    bench = _bench_vae()
    # a small Wan decode: compile time, not the model's size, is what this section pays for
    cls_name, cfg = seeded_config("wan2.1", width=8 if smoke else 32, latent=4 if smoke else 16)
    dtype = torch.float32
    torch.manual_seed(0)
    vae = build_model(cls_name, cfg, dtype).to(device)
    adapter = adapter_for(vae)
    f = adapter.spatial_factor(vae)
    out = {}
    for n in (1, 2):
        rank, rows = (0, 4) if n == 1 else (0, 2)
        z = local_input(vae, "decode", 1 if smoke else 5, 4 * f, 4 * f, rows, dtype).to(device)
        if n > 1:
            apply_plan(vae, plan_for(vae), SpatialState(None, n, f, adapter))
        ctx = bench._simulated_group(n, rank) if n > 1 else contextlib.nullcontext()
        eager_decoder = vae.decoder
        try:
            with ctx, torch.no_grad():
                eager = adapter.decode_local(vae, z)
                eager_s = _time(lambda: adapter.decode_local(vae, z), device, 1)
                torch._dynamo.reset()
                # smoke: Dynamo's tracing of the path without inductor's code generation (minutes on 2 CPU cores)
                vae.decoder = torch.compile(eager_decoder, backend="eager" if smoke else "inductor")
                try:
                    t0 = time.perf_counter()
                    first = adapter.decode_local(vae, z)
                    _sync(device)
                    compile_s = time.perf_counter() - t0
                    compiled_s = _time(lambda: adapter.decode_local(vae, z), device, 1)
                    out[n] = {
                        "eager_s": eager_s,
                        "compiled_s": compiled_s,
                        "first_call_s": compile_s,
                        "max_rel_diff": _rel(first, eager),
                    }
                except Exception as e:  # compile of the parallel path is issue 17 item 4's: report, don't stop
                    out[n] = {"eager_s": eager_s, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        finally:
            vae.decoder = eager_decoder
            if n > 1:
                remove_plan(vae)
    return out


# --------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _gb(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def report(res: dict) -> str:
    out = []
    p = res.get("parity", {})
    if "results" in p:
        keys = ["conv3d", "conv2d", "groupnorm_merge", "attention"]
        rows = [[k] + [f"{v.get(c, float('nan')):.2e}" if c in v else "-" for c in keys] for k, v in p["results"].items()]
        out.append(f"parity, halos fed locally (max rel err vs the full tensor; float32 bar {FLOAT32_BAR:g}: "
                   f"{'PASS' if p['float32_pass'] else 'FAIL ' + str(p['float32_failed'])})")
        out.append(_table(["case"] + keys, rows))
    s, pr = res.get("shards", {}), res.get("prediction", {})
    if "worlds" in s:
        rows = []
        base = s["worlds"].get(1, {}).get("seconds")
        for n, v in s["worlds"].items():
            q = pr.get(n, {}) if isinstance(pr, dict) else {}
            rows.append([n, v["rank"], v["latent_rows"], f"{v['seconds']:.3f}",
                         f"{base / v['seconds']:.2f}x" if base else "-", _gb(v["cuda_peak_bytes"]),
                         _gb(q.get("predicted_working_bytes"))])
        out.append(f"\nWan2.1 decode {s['shape']} {s['dtype']}: the busiest rank's shard, one at a time")
        out.append(_table(["N", "rank", "latent rows", "shard s", "speed-up", "CUDA peak GiB", "fake predicted GiB"], rows))
    gn = res.get("groupnorm", {})
    if gn and "error" not in gn:
        rows = [[d, f"{v['forward_ratio']:.2f}x", f"{v['fwd_bwd_ratio']:.2f}x", f"{v['max_rel_err']:.1e}"] for d, v in gn.items()]
        out.append("\nGroupNorm, ours / F.group_norm (best of N)")
        out.append(_table(["dtype", "forward", "fwd+bwd", "max rel err"], rows))
    cp = res.get("compile", {})
    if cp and "error" not in cp:
        rows = [[n, f"{v['eager_s']:.3f}", f"{v['compiled_s']:.3f}" if "compiled_s" in v else "-",
                 f"{v['max_rel_diff']:.1e}" if "max_rel_diff" in v else v.get("error", "")] for n, v in cp.items()]
        out.append("\ncompiled vs eager (Wan decoder shard, float32)")
        out.append(_table(["N", "eager s", "compiled s", "max rel diff / error"], rows))
    for name, v in res.items():
        if isinstance(v, dict) and "error" in v:
            out.append(f"\n{name}: ERROR {v['error'].splitlines()[0]}")
    out.append("\nsection seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()))
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (the test of this script)")
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--sections", default="parity,shards,prediction,groupnorm,compile")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5; smoke 1)")
    args = ap.parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    else:
        raise SystemExit("gpu_check: no CUDA device (use --smoke for the CPU check of this script)")
    repeats = args.repeats or (1 if args.smoke else 5)
    wanted = args.sections.split(",")
    res: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "smoke": args.smoke, "seconds": {}}
    steps = {
        "parity": lambda: parity(device, args.smoke),
        "shards": lambda: shards(device, args.smoke, 1 if args.smoke else 2),
        "prediction": lambda: prediction(args.smoke, res.get("shards")),
        "groupnorm": lambda: groupnorm(device, args.smoke, repeats),
        "compile": lambda: compiled(device, args.smoke),
    }
    for name in wanted:
        t0 = time.perf_counter()
        try:
            res[name] = steps[name]()
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        res["seconds"][name] = time.perf_counter() - t0
        print(f"gpu_check: {name} done in {res['seconds'][name]:.1f} s", flush=True)
    print(report(res))
    text = json.dumps(res, indent=2, default=str)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)
    return res


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Per-rank memory, FLOPs and traffic at real scale (1280x720x81 and up), measured on fake tensors, not GPUs.

Every configuration runs the real-width model (the released config of each family, written out in
``parallel_vae.jobs.models.SEEDED_LAYOUTS``; random weights, which do not matter here) under
``FakeTensorMode``, one fake rank at a time over a fake process group (``parallel_vae.jobs.fake_run``): rank r
of N runs exactly its own shard's ops, halo exchanges and gathers, with no values and no device. Measured per rank:

* peak live bytes of tensors allocated during the op (activations, and the output rows as they are built), with
  weights, the input shard and the output shard shown separately;
* FLOPs (``torch.utils.flop_counter``) and the op at which the peak was reached;
* bytes sent and received per collective kind and the number of exchanges (``parallel_vae.core.comm``'s counter).

Ranks that run identical shapes (same shard height, same edges) are measured once (``fake_run.distinct_ranks``);
``--all_ranks`` measures every rank. Moonshot rows and training rows measure the busiest rank only (an interior
rank with the largest shard), since their question is whether that rank fits.

A time PROJECTION follows, labelled as one: FLOPs per rank / a throughput, plus received bytes / a link bandwidth
plus a per-exchange latency x exchange count, not overlapped. Throughputs: the CPU's, measured in this invocation
on a small real decode, and the one the reference's single-GPU time implies for our FLOP count.

    python benchmarks/scale_table.py                         # the docs/benchmarks.md tables (~960 s of CPU: ~8 min on 2 idle cores)
    python benchmarks/scale_table.py --only headline --worlds 1,2,4,8
    python benchmarks/scale_table.py --only families --families wan,hunyuanvideo
    python benchmarks/scale_table.py --report_to wandb

Writes ``--json`` (default outputs/scale_table.json).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

GB = 1e9
# The reference (the Wan parallel-decode proposal): Wan2.1, 1280x720, 81 frames, VAE decode on N H20 GPUs.
REFERENCE = {1: (23.4, 16.85), 2: (11.79, 9.69), 4: (5.9, 6.13), 8: (3.1, 4.71)}  # N: (peak GB, decode s)
# Link classes for the projection: (GB/s per direction, us per exchange). NVLink-class: H20/H100 NVLink 4 at about
# half its 450 GB/s peak as achieved point-to-point; PCIe-class: PCIe 4 x16 through the host.
LINKS = {"nvlink": (200.0, 15.0), "pcie": (20.0, 30.0)}


@dataclass(frozen=True)
class Entry:
    """One family's place in the table: a released config (by layout name) at its native size."""

    family: str  # parallel_vae.families.FAMILIES key
    layout: str  # parallel_vae.jobs.models.SEEDED_LAYOUTS key: the released config, written out there
    label: str
    frames: Optional[int]  # pixel frames; None for image families
    height: int
    width: int
    # Whether the default run measures the unmodified model (N=1) too. HunyuanVideo-1.5's builds its frame-causal
    # mask element by element in Python: 340 s of CPU per fake run at 1280x720x121, more than the rest of the
    # family section. --family_baselines all measures it anyway.
    baseline: bool = True
    # enable_spatial_parallelism(attention=...): sequence attention's mode (MiniMax-H3's ViT decoder)
    attention: str = "auto"
    ops: tuple = ("decode", "encode")  # the families section's ops (the ring entry: decode; its encoder is the same)


# One entry per family, at its native size. A family without an entry is skipped with a printed line.
ENTRIES = {
    "wan": [
        Entry("wan", "wan2.1", "Wan2.1 1280x720x81", 81, 720, 1280),
        Entry("wan", "wan2.2", "Wan2.2 TI2V-5B 1280x704x121", 121, 704, 1280),
    ],
    "qwenimage": [Entry("qwenimage", "qwenimage", "Qwen-Image 1328x1328", 1, 1328, 1328)],
    "autoencoder_kl": [Entry("autoencoder_kl", "sdxl", "SDXL 1024x1024", None, 1024, 1024)],
    "flux2": [Entry("flux2", "flux2", "Flux.2 1024x1024", None, 1024, 1024)],
    "hunyuanvideo": [Entry("hunyuanvideo", "hunyuanvideo", "HunyuanVideo 1280x720x129", 129, 720, 1280)],
    "hunyuanvideo15": [
        Entry("hunyuanvideo15", "hunyuanvideo15", "HunyuanVideo-1.5 1280x720x121", 121, 720, 1280, baseline=False)
    ],
    "qwenimage21": [Entry("qwenimage21", "qwenimage21", "Qwen-Image 2.1 1024x1024", 1, 1024, 1024)],
    "hunyuanimage": [Entry("hunyuanimage", "hunyuanimage", "HunyuanImage-2.1 2048x2048", None, 2048, 2048)],
    "hunyuanimage_refiner": [
        Entry("hunyuanimage_refiner", "hunyuanimage_refiner", "HunyuanImage-2.1 refiner 2048x2048", 1, 2048, 2048)
    ],
    "kvae": [Entry("kvae", "kvae", "KVAE 2-D 1024x1024", None, 1024, 1024)],
    "kvae_video": [Entry("kvae_video", "kvae_video", "KVAE-Video (Kandinsky 5) 1280x768x121", 121, 768, 1280)],
    # 22 frames: one 7-latent-frame decode clip (17 n + 5 frames <-> 5 n + 2 latents), 25,205 tokens per attention
    "minimax_h3": [
        Entry("minimax_h3", "minimax_h3", "MiniMax-H3 1280x720x22 gather", 22, 720, 1280, attention="gather"),
        Entry("minimax_h3", "minimax_h3", "MiniMax-H3 1280x720x22 ring", 22, 720, 1280, baseline=False,
              attention="ring", ops=("decode",)),
    ],
    "ltx2diffusion": [Entry("ltx2diffusion", "ltx2diffusion", "LTX-2.5 diffusion decoder 768x512x121", 121, 512, 768)],
    "cosmos": [Entry("cosmos", "cosmos", "Cosmos CV8x8x8 1280x704x121", 121, 704, 1280)],
}
HEADLINE = ENTRIES["wan"][0]


@dataclass
class Task:
    """One fake rank of one configuration."""

    section: str  # headline, moonshot, train, families
    label: str
    layout: str
    op: str  # decode, encode, train
    frames: Optional[int]
    height: int
    width: int
    world: int
    rank: int
    ranks: list = field(default_factory=list)  # the ranks this one stands for
    dtype: str = "bfloat16"
    checkpointing: bool = False
    offload: bool = False  # with checkpointing: what the checkpoints keep lives in host memory
    attention: str = "auto"  # sequence attention's mode (Entry.attention)

    @property
    def memory(self) -> str:
        return ("ckpt+offload" if self.offload else "ckpt") if self.checkpointing else "-"


@functools.lru_cache(maxsize=None)
def _latent_rows(layout: str, height: int) -> int:
    """Latent rows of ``height`` pixel rows, from the family adapter of the real model (built on fake tensors)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from parallel_vae.families import adapter_for
    from parallel_vae.jobs.fake_run import build_model
    from parallel_vae.jobs.models import seeded_config

    with FakeTensorMode():
        vae = build_model(*seeded_config(layout), torch.float32)
    factor = adapter_for(vae).spatial_factor(vae)
    if height % factor:
        raise ValueError(f"{layout}: height {height} is not a multiple of the spatial factor {factor}")
    return height // factor


def _rank_task(task: Task) -> dict:
    """Run one fake rank (in a worker process) and return its measurement."""
    import torch

    from parallel_vae.jobs.fake_run import measure_rank
    from parallel_vae.jobs.models import seeded_config

    torch.set_num_threads(1)
    cls_name, cfg = seeded_config(task.layout)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = measure_rank(cls_name, cfg, task.op, task.frames, task.height, task.width, task.world, task.rank,
                       getattr(torch, task.dtype), checkpointing=task.checkpointing, offload=task.offload,
                       attention=task.attention)
    out.update(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start)
    return out


def _run_task(task: Task) -> tuple[Task, dict]:
    try:
        return task, _rank_task(task)
    except Exception as e:  # reported in the table, the other tasks go on
        return task, {"error": f"{type(e).__name__}: {e}"}


# --------------------------------------------------------------------------------------------------------------
# which tasks
# --------------------------------------------------------------------------------------------------------------


def _busiest(rows_total: int, world: int) -> int:
    """An interior rank with the largest shard (two neighbours, most rows): the per-rank maximum."""
    from parallel_vae.core.sharding import row_split

    sizes = row_split(rows_total, world)
    interior = [r for r in range(world) if 0 < r < world - 1] or list(range(world))
    return max(interior, key=lambda r: (sizes[r], -r))


def _config_tasks(section: str, entry: Entry, op: str, world: int, all_classes: bool, all_ranks: bool,
                  **kw) -> list[Task]:
    from parallel_vae.jobs.fake_run import distinct_ranks

    rows_total = _latent_rows(entry.layout, entry.height)
    if world > rows_total:
        print(f"skip {entry.label} {op} N={world}: {rows_total} latent rows", flush=True)
        return []
    if all_ranks:
        groups = {r: [r] for r in range(world)}
    elif all_classes:
        groups = distinct_ranks(rows_total, world)
    else:
        groups = {_busiest(rows_total, world): [_busiest(rows_total, world)]}
    kw.setdefault("attention", entry.attention)
    return [Task(section, entry.label, entry.layout, op, entry.frames, entry.height, entry.width, world, r, ranks, **kw)
            for r, ranks in groups.items()]


def _tasks(args) -> list[Task]:
    from parallel_vae.families import FAMILIES

    only = set(args.only.split(","))
    tasks: list[Task] = []
    if "headline" in only:
        for op in args.ops.split(","):
            for n in [int(w) for w in args.worlds.split(",")]:
                if op != "decode" and n > max(args.encode_max_world, 1):
                    continue
                tasks += _config_tasks("headline", HEADLINE, op, n, True, args.all_ranks, dtype=args.dtype)
    if "moonshot" in only:
        uhd = Entry("wan", "wan2.1", "Wan2.1 3840x2160x81", 81, 2160, 3840)
        tasks += _config_tasks("moonshot", uhd, "decode", 8, False, False, dtype=args.dtype)
    if "train" in only:
        # issue 18's targets: <= 24 GB per rank for each (op, size, N), every memory option side by side
        plain, ckpt, offload = dict(), dict(checkpointing=True), dict(checkpointing=True, offload=True)
        for op, h, w, n, modes in (("train", 720, 1280, 8, (plain, ckpt, offload)),
                                   ("train", 480, 832, 4, (ckpt, offload)),
                                   ("reward", 480, 832, 2, (plain, ckpt, offload))):
            entry = Entry("wan", "wan2.1", f"Wan2.1 {w}x{h}x81", 81, h, w)
            for mode in modes:
                tasks += _config_tasks("train", entry, op, n, False, False, dtype=args.dtype, **mode)
    if "train_families" in only:
        # every family's training step at its native size, N=8, checkpointed with offload (the configuration a
        # user short of memory would pick) and checkpointed alone
        for name in FAMILIES:
            for entry in ENTRIES.get(name, []) if FAMILIES[name].has_encoder else []:  # train: encode + decode
                for mode in (dict(checkpointing=True), dict(checkpointing=True, offload=True)):
                    tasks += _config_tasks("train_families", entry, "train", 8, False, False, dtype=args.dtype,
                                           **mode)
    if "families" in only:
        wanted = set(args.families.split(",")) if args.families else None
        for name in FAMILIES:
            if wanted is not None and name not in wanted:
                continue
            if name not in ENTRIES:
                print(f"skip family {name}: no real-config entry in benchmarks/scale_table.py ENTRIES", flush=True)
                continue
            for entry in ENTRIES[name]:
                worlds = (1, 8) if entry.baseline or args.family_baselines == "all" else (8,)
                for op in entry.ops if FAMILIES[name].has_encoder else ("decode",):
                    for n in worlds:
                        tasks += _config_tasks("families", entry, op, n, False, False, dtype=args.dtype)
    return tasks


# --------------------------------------------------------------------------------------------------------------
# CPU throughput: a small real run in this invocation
# --------------------------------------------------------------------------------------------------------------


def _cpu_throughput(seconds_budget: float = 20.0) -> dict:
    """FLOP/s of the real Wan2.1 decoder (full width, float32, one thread) on 2 latent frames of 16x16."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from parallel_vae.jobs.models import build_wan_vae

    torch.set_num_threads(1)
    vae = build_wan_vae("wan2.1")
    z = torch.randn(1, 16, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        vae.decode(z)
    walls = []
    t_end = time.perf_counter() + seconds_budget
    while len(walls) < 3 and (not walls or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        with torch.no_grad():
            vae.decode(z)
        walls.append(time.perf_counter() - t0)
    flops = fc.get_total_flops()
    return {"flops": flops, "seconds": min(walls), "flops_per_s": flops / min(walls),
            "what": "Wan2.1 decode, base_dim 96, float32, 1 thread, 2 latent frames of 16x16 (9x128x128)"}


# --------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def _gb(b) -> str:
    return "-" if b is None else f"{b / GB:.2f}"


def _configs(results: list[tuple[Task, dict]]) -> dict:
    """(section, label, op, world, memory mode) -> {rank: measurement} for every rank (expanded from classes)."""
    out: dict = {}
    for task, res in results:
        key = (task.section, task.label, task.op, task.world, task.memory)
        for r in task.ranks:
            out.setdefault(key, {})[r] = res
    return out


def _total(m: dict) -> int:
    """Per-rank memory: weights + input shard + peak of everything allocated during the op (+ optimizer state and
    float32 masters for training, which exist before the step)."""
    return m["weight_bytes"] + m["input_bytes"] + m["peak_live_bytes"] + m.get("master_bytes", 0)


def _exchanges(m: dict) -> int:
    return sum(v["calls"] for v in m["traffic"]["by_kind"].values())


def _project(m: dict, flops_per_s: float, link: tuple[float, float], world: int) -> float:
    bw, lat = link
    comm = m["traffic"]["received_bytes"] / (bw * GB) + _exchanges(m) * lat * 1e-6 if world > 1 else 0.0
    return m["flops"] / flops_per_s + comm


def report(results: list[tuple[Task, dict]], cpu: dict, args) -> dict:
    configs = _configs(results)
    errors = [(t, r["error"]) for t, r in results if "error" in r]
    summary: dict = {"headline": [], "moonshot": [], "train": [], "train_families": [], "families": [],
                     "projection": []}
    for t, e in errors:
        print(f"ERROR {t.label} {t.op} N={t.world} rank {t.rank}: {e}")

    def ok(ranks: dict) -> bool:
        return all("error" not in m for m in ranks.values())

    # ---- headline: decode / encode 1280x720x81 ----
    base = {}
    rows = []
    for (section, label, op, n, _), ranks in sorted(configs.items(), key=lambda kv: (kv[0][2], kv[0][3])):
        if section != "headline" or not ok(ranks) or len(ranks) != n:
            continue
        worst = max(ranks.values(), key=lambda m: m["peak_live_bytes"])
        if n == 1:
            base[op] = worst
        b = base.get(op)
        flops_sum = sum(m["flops"] for m in ranks.values())
        rec = {
            "op": op, "world": n, "peak_live_bytes_max": worst["peak_live_bytes"], "peak_op": worst["peak_op"],
            "peak_shape": worst["peak_shape"], "total_bytes_max": max(_total(m) for m in ranks.values()),
            "weight_bytes": worst["weight_bytes"], "input_bytes_max": max(m["input_bytes"] for m in ranks.values()),
            "output_bytes_max": max(m["output_bytes"] for m in ranks.values()),
            "flops_max": max(m["flops"] for m in ranks.values()), "flops_sum": flops_sum,
            "sent_max": max(m["traffic"]["sent_bytes"] for m in ranks.values()),
            "received_max": max(m["traffic"]["received_bytes"] for m in ranks.values()),
            "by_kind_busiest": max(ranks.values(), key=lambda m: m["traffic"]["received_bytes"])["traffic"]["by_kind"],
            "exchanges_max": max(_exchanges(m) for m in ranks.values()),
            "ratio_to_1_over_n": worst["peak_live_bytes"] / (b["peak_live_bytes"] / n) if b else None,
            "flop_efficiency": b["flops"] / flops_sum if b else None,
            "reference": REFERENCE.get(n) if op == "decode" else None,
        }
        summary["headline"].append(rec)
        ref = rec["reference"]
        rows.append([op, n, _gb(ref[0] * GB) if ref else "-", _gb(rec["total_bytes_max"]), _gb(rec["peak_live_bytes_max"]),
                     "-" if rec["ratio_to_1_over_n"] is None else f"{rec['ratio_to_1_over_n']:.3f}",
                     f"{rec['flops_max'] / 1e9:,.0f}", "-" if rec["flop_efficiency"] is None else f"{rec['flop_efficiency']:.4f}",
                     f"{rec['received_max'] / GB:.3f}", rec["exchanges_max"], f"{rec['peak_op'].replace('aten.', '')} {tuple(rec['peak_shape'])}"])
    if rows:
        print(f"\n== {HEADLINE.label}, {args.dtype}: per rank, measured on fake tensors, not GPUs ==")
        print(_table(["op", "N", "ref peak GB", "ours total GB", "ours act GB", "act / (1/N)", "GFLOP/rank",
                      "FLOP eff", "recv GB/rank", "exchanges", "peak op (busiest rank)"], rows))
        print("ours total = weights + input shard + peak live bytes during the op (activations and output rows);\n"
              "act / (1/N) = busiest rank's peak live bytes / (N=1 peak / N); FLOP eff = N=1 FLOPs / sum over ranks.")

    # ---- moonshots and training ----
    for section, limit in (("moonshot", 24), ("train", 24), ("train_families", 24)):
        rows = []
        for (sec, label, op, n, ckpt), ranks in configs.items():
            if sec != section:
                continue
            (r, m), = ranks.items()
            if "error" in m:
                rows.append([label, op, n, ckpt, "ERROR"] + ["-"] * 6)
                continue
            total = _total(m)
            rec = dict(label=label, op=op, world=n, rank=r, checkpointing=ckpt != "-", memory=ckpt, total_bytes=total,
                       limit_gb=limit,
                       fits=total <= limit * GB, margin_bytes=limit * GB - total, **{k: m[k] for k in (
                           "peak_live_bytes", "peak_op", "peak_shape", "weight_bytes", "input_bytes", "output_bytes",
                           "master_bytes", "optimizer_state_bytes", "phases", "flops", "traffic", "params")})
            summary[section].append(rec)
            verdict = f"{'fits' if rec['fits'] else 'DOES NOT FIT'} {limit} GB by {abs(rec['margin_bytes']) / GB:.1f} GB"
            rows.append([label, op, n, ckpt, _gb(total), _gb(m["weight_bytes"] + m.get("master_bytes", 0)),
                         _gb(m["peak_live_bytes"]), _gb(m.get("optimizer_state_bytes")), f"{m['flops'] / 1e9:,.0f}",
                         verdict, f"{m['peak_op'].replace('aten.', '')} {tuple(m['peak_shape'])}"])
        if rows:
            what = {"moonshot": "3840x2160x81 decode",
                    "train": "training step (encode + decode + backward + AdamW) and reward backward (decode only,"
                             " frozen VAE)",
                    "train_families": "every family's training step at its native size"}[section]
            print(f"\n== {what}, {args.dtype}, busiest rank, measured on fake tensors, not GPUs ==")
            print(_table(["config", "op", "N", "memory", "total GB", "weights GB", "peak live GB", "AdamW state GB",
                          "GFLOP", "verdict", "peak op"], rows))
    if summary["train"] or summary["train_families"]:
        print("training: weights = bf16 compute weights + float32 masters; peak live = activations, gradients, and\n"
              "(after backward) the AdamW step's moments and temporaries; total = weights + input + peak live.")

    # ---- families ----
    rows = []
    fam_base = {}
    for (sec, label, op, n, _), ranks in sorted(configs.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3])):
        if sec != "families":
            continue
        (r, m), = ranks.items()
        if "error" in m:
            rows.append([label, op, n, "ERROR: " + m["error"][:60]] + ["-"] * 5)
            continue
        if n == 1:
            fam_base[(label, op)] = m
        b = fam_base.get((label, op))
        ratio = m["peak_live_bytes"] / (b["peak_live_bytes"] / n) if b else None
        rec = dict(label=label, op=op, world=n, rank=r, total_bytes=_total(m), ratio_to_1_over_n=ratio,
                   **{k: m[k] for k in ("peak_live_bytes", "peak_op", "peak_shape", "weight_bytes", "flops", "traffic")})
        summary["families"].append(rec)
        rows.append([label, op, n, _gb(_total(m)), _gb(m["peak_live_bytes"]), "-" if ratio is None else f"{ratio:.3f}",
                     f"{m['flops'] / 1e9:,.0f}", f"{m['traffic']['received_bytes'] / GB:.3f}",
                     f"{m['peak_op'].replace('aten.', '')} {tuple(m['peak_shape'])}"])
    if rows:
        print(f"\n== every family at its native size, {args.dtype}, N=8: busiest rank; measured on fake tensors, not GPUs ==")
        print(_table(["config", "op", "N", "total GB", "peak live GB", "act / (1/N)", "GFLOP/rank", "recv GB/rank",
                      "peak op"], rows))

    # ---- projection ----
    heads = {(r["op"], r["world"]): r for r in summary["headline"]}
    dec1 = base.get("decode")
    if dec1 is not None:
        ref_rate = dec1["flops"] / REFERENCE[1][1]
        rates = [("CPU (measured)", cpu["flops_per_s"]), ("reference-implied", ref_rate)]
        if args.tflops:
            rates.append((f"--tflops {args.tflops:g}", args.tflops * 1e12))
        rows = []
        for rate_name, rate in rates:
            for link_name in args.links.split(","):
                link = (args.bw_gbs, args.latency_us) if link_name == "custom" else LINKS[link_name]
                t1 = None
                for n in sorted({w for (op, w) in heads if op == "decode"}):
                    ranks = configs[("headline", HEADLINE.label, "decode", n, False)]
                    t = max(_project(m, rate, link, n) for m in ranks.values())
                    t1 = t if n == 1 else t1
                    sp = t1 / t if t1 else None
                    ref = REFERENCE.get(n)
                    rec = dict(throughput=rate_name, flops_per_s=rate, link=link_name, bw_gbs=link[0],
                               latency_us=link[1], world=n, projected_s=t, speedup=sp, efficiency=sp / n if sp else None,
                               reference_s=ref[1] if ref else None,
                               reference_efficiency=REFERENCE[1][1] / ref[1] / n if ref else None)
                    summary["projection"].append(rec)
                    rows.append([rate_name, f"{rate / 1e12:.3g}", link_name, f"{link[0]:g}/{link[1]:g}", n, f"{t:.3f}",
                                 f"{sp:.2f}" if sp else "-", f"{100 * rec['efficiency']:.0f}%" if sp else "-",
                                 f"{ref[1]:.2f}" if ref else "-",
                                 f"{100 * rec['reference_efficiency']:.0f}%" if ref else "-"])
        print(f"\n== PROJECTION, not a measurement: decode {HEADLINE.label} time per rank = FLOPs / throughput +\n"
              "   received bytes / bandwidth + exchanges x latency (no overlap); reference = its measured H20 times ==")
        print(_table(["throughput", "TFLOP/s", "link", "GB/s / us", "N", "projected s", "speed-up", "eff",
                      "ref s", "ref eff"], rows))
        print(f"CPU throughput: {cpu['flops_per_s'] / 1e9:.1f} GFLOP/s ({cpu['what']}); reference-implied: our N=1\n"
              f"FLOPs / the reference's {REFERENCE[1][1]} s.")
    return summary


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="headline,moonshot,train,families",
                   help="sections to run (default: all but train_families): headline, moonshot, train, families,\n"
                        "train_families (every family's training step at its native size, N=8)")
    p.add_argument("--worlds", default="1,2,4,8,16,32", help="headline world sizes (default: %(default)s)")
    p.add_argument("--ops", default="decode,encode", help="headline ops (default: %(default)s)")
    p.add_argument("--encode_max_world", type=int, default=8,
                   help="largest headline world for ops other than decode (default: %(default)s; the scaling\n"
                        "curve beyond it is decode's)")
    p.add_argument("--families", default="", help="comma-separated family names (default: every family with an entry)")
    p.add_argument("--family_baselines", default="default", choices=["default", "all"],
                   help="all: also measure the unmodified model (N=1) of entries whose baseline is slow to run on\n"
                        "fake tensors (HunyuanVideo-1.5: about 6 min of CPU per op)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--all_ranks", action="store_true", help="measure every headline rank, not one per shape class")
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one fake rank each (default: %(default)s)")
    p.add_argument(
        "--tasks_per_worker",
        type=int,
        default=0,
        help="fake ranks a worker runs before it is replaced by a fresh process; 0: never replaced (default: "
        "%(default)s). Each rank's measurement is independent of the process's history (the tracker counts the "
        "live tensors of that run only; fake tensors allocate nothing), and a fresh spawned worker costs an import of "
        "torch and diffusers, about 5 s, per rank",
    )
    p.add_argument("--links", default="nvlink,pcie",
                   help="link classes for the projection: nvlink (200 GB/s, 15 us), pcie (20 GB/s, 30 us),\n"
                        "custom (--bw_gbs, --latency_us) (default: %(default)s)")
    p.add_argument("--bw_gbs", type=float, default=100.0, help="custom link bandwidth, GB/s (default: %(default)s)")
    p.add_argument("--latency_us", type=float, default=20.0, help="custom per-exchange latency, us (default: %(default)s)")
    p.add_argument("--tflops", type=float, default=None, help="also project at this compute throughput (TFLOP/s)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: print the tables of earlier runs' JSON files together (e.g. sections run\n"
                        "separately); the CPU throughput is the first file's")
    p.add_argument("--json", default=os.path.join("outputs", "scale_table.json"))
    p.add_argument("--plots", dest="plots", action="store_true", default=True,
                   help="write PNG charts beside the JSON (default; benchmarks/plots.py, matplotlib: the [bench] extra)")
    p.add_argument("--no_plots", dest="plots", action="store_false", help="write no charts")
    p.add_argument("--report_to", default="none", choices=["none", "wandb"])
    p.add_argument("--wandb_project", default="parallel_vae-scale")
    p.add_argument("--run_name", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = _parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    if args.merge:
        return _merge(args)
    tasks = _tasks(args)
    # Longest first, so the pool's last minutes are not one long task alone.
    order = {"train": 0, "train_families": 0, "headline": 1, "moonshot": 1, "families": 2}
    tasks.sort(key=lambda t: (order[t.section], -t.world))
    print(f"{len(tasks)} fake ranks on {args.jobs} worker(s); load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs, maxtasksperchild=args.tasks_per_worker or None) as pool:
        cpu_job = pool.apply_async(_cpu_throughput)
        for task, res in pool.imap_unordered(_run_task, tasks):
            results.append((task, res))
            tag = "ERROR " + res["error"] if "error" in res else f"{res['seconds']:.0f}s"
            print(f"[{time.monotonic() - started:5.0f}s] {task.label} {task.op} N={task.world} rank {task.rank}"
                  f" {task.memory}: {tag}", flush=True)
        cpu = cpu_job.get()
    print(f"\nmeasured on fake tensors, not GPUs: python benchmarks/scale_table.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    summary = report(results, cpu, args)
    elapsed = time.monotonic() - started
    cpu_total = sum(r.get("cpu_seconds", 0.0) for _, r in results)
    print(f"\ntotal {elapsed:.0f} s on {os.cpu_count()} cores ({args.jobs} workers); the fake ranks' CPU time "
          f"{cpu_total:.0f} s; load average at the end {os.getloadavg()[0]:.2f}")
    out = {"args": vars(args), "elapsed_s": elapsed, "cpu_throughput": cpu, "reference": REFERENCE,
           "links": LINKS, "summary": summary,
           "ranks": [dict(task=asdict(t), result=r) for t, r in results]}
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        if args.plots:
            _plots(args.json)
    if args.report_to == "wandb":
        _log_wandb(args, out)
    return out


def _plots(json_path: str) -> None:
    """PNG charts beside the JSON (benchmarks/plots.py)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from plots import write_charts

    write_charts(json_path)


def _merge(args) -> dict:
    results, cpu, seen = [], None, set()
    for path in args.merge:
        with open(path) as f:
            data = json.load(f)
        cpu = cpu or data["cpu_throughput"]
        for item in data["ranks"]:
            task = Task(**item["task"])
            key = (task.section, task.label, task.op, task.world, task.rank, task.memory, task.dtype)
            if key not in seen:  # the same rank in two files (e.g. N=1 of two headline runs) counts once
                seen.add(key)
                results.append((task, item["result"]))
    print(f"measured on fake tensors, not GPUs: merged from {', '.join(args.merge)}")
    summary = report(results, cpu, args)
    out = {"args": vars(args), "cpu_throughput": cpu, "reference": REFERENCE, "links": LINKS, "summary": summary,
           "ranks": [dict(task=asdict(t), result=r) for t, r in results]}
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        if args.plots:
            _plots(args.json)
    return out


def _log_wandb(args, out: dict) -> None:
    import wandb

    run = wandb.init(project=args.wandb_project, name=args.run_name, config=out["args"])
    for section, recs in out["summary"].items():
        if not recs:
            continue
        cols = sorted({k for r in recs for k, v in r.items() if isinstance(v, (int, float, str, bool)) or v is None})
        table = wandb.Table(columns=cols)
        for r in recs:
            table.add_data(*[r.get(c) for c in cols])
        run.log({section: table})
    run.summary.update({"elapsed_s": out["elapsed_s"], "cpu_flops_per_s": out["cpu_throughput"]["flops_per_s"]})
    run.finish()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()

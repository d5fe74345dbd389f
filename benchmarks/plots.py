#!/usr/bin/env python
"""Charts of the benchmark JSON: PNGs beside it (matplotlib, Agg; in the [bench] extra).

``benchmarks/scale_table.py`` and ``benchmarks/bench_vae.py`` call these after writing their JSON (``--no_plots``
turns that off); run this file to draw the charts of JSON written earlier:

    python benchmarks/plots.py outputs/scale_table.json outputs/bench_vae.json [--out_dir DIR]

From ``scale_table.py`` (measured on fake tensors, not GPUs; the projection is a model, not a measurement):

* ``*_memory.png``: per-rank memory of the Wan2.1 1280x720x81 decode against N, ours beside the reference;
* ``*_projection.png``: projected decode time and efficiency against N, with the reference's measured times;
* ``*_families.png``: each family's per-rank peak (relative to one device) against 1/N.

From ``bench_vae.py`` (a real run, on CPU or GPUs):

* ``*_memory.png``: peak live activations per rank against N, beside diffusers' single-process peak / N;
* ``*_scaling.png``: wall-time speed-up and efficiency against N (and the GPU projection when it ran).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict

GB = 1e9
MIB = 2**20


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _stem(json_path: str, out_dir: str | None) -> str:
    base = os.path.splitext(os.path.basename(json_path))[0]
    return os.path.join(out_dir or os.path.dirname(json_path) or ".", base)


def _log2_axis(ax, worlds) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(worlds)
    ax.set_xticklabels([str(n) for n in worlds])
    ax.set_xlabel("N (ranks)")
    ax.grid(True, which="both", alpha=0.3)


# ---- scale_table.py ----------------------------------------------------------------------------------------------
def scale_memory(data: dict, path: str) -> str | None:
    recs = sorted((r for r in data["summary"]["headline"] if r["op"] == "decode"), key=lambda r: r["world"])
    if not recs:
        return None
    plt = _pyplot()
    worlds = [r["world"] for r in recs]
    ours = [r["total_bytes_max"] / GB for r in recs]
    act = [r["peak_live_bytes_max"] / GB for r in recs]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(worlds, ours, "o-", label="ours, total per rank (bf16)")
    ax.plot(worlds, act, "s--", alpha=0.7, label="ours, activations per rank")
    ax.plot(worlds, [act[0] / n for n in worlds], ":", color="gray", label="ideal: single-device activations / N")
    ref = [(r["world"], r["reference"][0]) for r in recs if r.get("reference")]
    if ref:
        ax.plot([n for n, _ in ref], [g for _, g in ref], "^-", color="C3", label="reference (measured, H20 GPUs)")
    _log2_axis(ax, worlds)
    ax.set_yscale("log")
    ax.set_ylabel("peak memory per rank, GB")
    ax.set_title("Wan2.1 decode 1280x720x81, per rank\nours: measured on fake tensors, not GPUs", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def scale_projection(data: dict, path: str) -> str | None:
    recs = data["summary"].get("projection") or []
    if not recs:
        return None
    plt = _pyplot()
    series = defaultdict(list)
    for r in recs:
        series[(r["throughput"], r["link"])].append(r)
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(10, 4.2))
    worlds = sorted({r["world"] for r in recs})
    for (rate, link), rs in sorted(series.items()):
        if rate.startswith("CPU"):
            continue  # seconds on one CPU thread would flatten the GPU-class curves; its efficiency is in the JSON
        rs.sort(key=lambda r: r["world"])
        label = f"projected, {rate}, {link}-class"
        ax_t.plot([r["world"] for r in rs], [r["projected_s"] for r in rs], "o-", label=label)
        ax_e.plot([r["world"] for r in rs], [100 * r["efficiency"] for r in rs], "o-", label=label)
    ref = sorted({(r["world"], r["reference_s"], r["reference_efficiency"]) for r in recs if r.get("reference_s")})
    if ref:
        ax_t.plot([n for n, _, _ in ref], [s for _, s, _ in ref], "^-", color="C3", label="reference (measured)")
        ax_e.plot([n for n, _, _ in ref], [100 * e for _, _, e in ref], "^-", color="C3", label="reference (measured)")
    for ax in (ax_t, ax_e):
        _log2_axis(ax, worlds)
        ax.legend(fontsize=7)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("decode time, s")
    ax_e.set_ylabel("efficiency, % of linear")
    ax_e.set_ylim(0, 105)
    fig.suptitle("Wan2.1 decode 1280x720x81: PROJECTION (FLOPs / throughput + bytes / link + exchanges x latency), "
                 "not a measurement", fontsize=9)  # fmt: skip
    return _save(fig, path)


def scale_families(data: dict, path: str) -> str | None:
    """Per-rank peak relative to one device, ``ratio_to_1_over_n / N``, against 1/N (1 at N=1)."""
    recs = [r for r in data["summary"].get("families") or [] if r.get("ratio_to_1_over_n") is not None]
    if not recs:
        return None
    plt = _pyplot()
    ops = sorted({r["op"] for r in recs})
    fig, axes = plt.subplots(1, len(ops), figsize=(5.2 * len(ops), 4.4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        by_label = defaultdict(list)
        for r in recs:
            if r["op"] == op and r["world"] > 1:
                by_label[r["label"]].append(r)
        xs_all = {1.0}
        for i, (label, rs) in enumerate(sorted(by_label.items())):
            rs.sort(key=lambda r: r["world"])
            xs = [1.0] + [1 / r["world"] for r in rs]
            ys = [1.0] + [r["ratio_to_1_over_n"] / r["world"] for r in rs]
            xs_all.update(xs)
            ax.plot(xs, ys, "-", color=f"C{i % 10}", marker="os^vD<>ph*"[i % 10], label=label, alpha=0.85)
        grid = sorted(xs_all)
        ax.plot(grid, grid, ":", color="gray", label="ideal: peak / N")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ticks = [2.0**-k for k in range(0, 1 + round(-math.log2(min(grid))))]
        labels = ["1"] + [f"1/{round(1 / t)}" for t in ticks[1:]]
        ax.set_xticks(ticks, labels)
        ax.set_yticks(ticks, labels)
        ax.invert_xaxis()
        ax.set_xlabel("1/N")
        ax.set_ylabel("busiest rank's peak activations / one device's")
        ax.set_title(f"{op}, bf16, measured on fake tensors", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def scale_charts(json_path: str, out_dir: str | None = None) -> list[str]:
    """Every chart of a ``scale_table.py`` JSON, as PNGs beside it (or in ``out_dir``); returns their paths."""
    with open(json_path) as f:
        data = json.load(f)
    stem = _stem(json_path, out_dir)
    made = [scale_memory(data, stem + "_memory.png"), scale_projection(data, stem + "_projection.png"),
            scale_families(data, stem + "_families.png")]  # fmt: skip
    return [p for p in made if p]


# ---- bench_vae.py ------------------------------------------------------------------------------------------------
def _peak(r: dict) -> float | None:
    peaks = [p for p in r.get("peak_live_bytes_per_rank") or [] if p is not None]
    return max(peaks) if peaks else None


def bench_memory(report: dict, path: str) -> str | None:
    results = report["results"]
    ops = sorted({r["op"] for r in results})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ops), figsize=(5.2 * len(ops), 4.0), squeeze=False)
    drew = False
    for ax, op in zip(axes[0], ops):
        base = next((r for r in results if r["op"] == op and r["impl"] == "diffusers"), None)
        for mode, style in (("sharded", "o-"), ("replicated", "s--")):
            rs = sorted((r for r in results if r["op"] == op and r["mode"] == mode and _peak(r)), key=lambda r: r["world"])
            if rs:
                ax.plot([r["world"] for r in rs], [_peak(r) / MIB for r in rs], style, label=f"parallel_vae, {mode}")
                drew = True
        worlds = sorted({r["world"] for r in results if r["op"] == op})
        if base and _peak(base):
            ax.plot(worlds, [_peak(base) / MIB / n for n in worlds], ":", color="gray", label="diffusers' peak / N")
            ax.plot([1], [_peak(base) / MIB], "^", color="C3", label="diffusers, one process")
        _log2_axis(ax, worlds)
        ax.set_yscale("log")
        ax.set_ylabel("peak live activations per rank, MiB")
        ax.set_title(f"{op}", fontsize=10)
        ax.legend(fontsize=8)
    args = report.get("args", {})
    fig.suptitle(f"{args.get('layout', '')} base_dim {args.get('base_dim') or 'real'}, {args.get('latent_frames')} "
                 f"latent frames of {args.get('latent_hw')}, {report.get('device', '')}", fontsize=9)  # fmt: skip
    return _save(fig, path) if drew else None


def bench_scaling(report: dict, path: str) -> str | None:
    results = report["results"]
    proj = report.get("projection") or {}
    ops = sorted({r["op"] for r in results})
    plt = _pyplot()
    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(10, 4.0))
    worlds = {1}
    drew = False
    for i, op in enumerate(ops):
        base = next((r for r in results if r["op"] == op and r["impl"] == "diffusers"), None)
        rs = sorted((r for r in results if r["op"] == op and r["mode"] == "sharded" and r.get("wall_s")),
                    key=lambda r: r["world"])  # fmt: skip
        if base and base.get("wall_s") and rs:
            ns = [r["world"] for r in rs]
            sp = [base["wall_s"] / r["wall_s"] for r in rs]
            worlds.update(ns)
            ax_s.plot(ns, sp, "o-", color=f"C{i}", label=f"{op}, measured wall")
            ax_e.plot(ns, [100 * s / n for s, n in zip(sp, ns)], "o-", color=f"C{i}", label=f"{op}, measured wall")
            drew = True
        p = proj.get(op) or {}
        pts = sorted((int(n), v) for n, v in p.items() if v.get("speedup"))
        if pts:
            worlds.update(n for n, _ in pts)
            ax_s.plot([n for n, _ in pts], [v["speedup"] for _, v in pts], "s--", color=f"C{i}",
                      label=f"{op}, PROJECTION (one device)")  # fmt: skip
            ax_e.plot([n for n, _ in pts], [100 * v["efficiency"] for _, v in pts], "s--", color=f"C{i}",
                      label=f"{op}, PROJECTION (one device)")  # fmt: skip
            drew = True
    if not drew:
        plt.close(fig)
        return None
    ws = sorted(worlds)
    ax_s.plot(ws, ws, ":", color="gray", label="linear")
    for ax in (ax_s, ax_e):
        _log2_axis(ax, ws)
        ax.legend(fontsize=8)
    ax_s.set_ylabel("speed-up over unmodified diffusers")
    ax_e.set_ylabel("efficiency, % of linear")
    ax_e.set_ylim(0, 110)
    fig.suptitle(f"{report.get('machine', {}).get('cpu', '')}, {report.get('device', '')}", fontsize=9)
    return _save(fig, path)


def bench_charts(json_path: str, out_dir: str | None = None) -> list[str]:
    """Every chart of a ``bench_vae.py`` JSON, as PNGs beside it (or in ``out_dir``); returns their paths."""
    with open(json_path) as f:
        report = json.load(f)
    stem = _stem(json_path, out_dir)
    made = [bench_memory(report, stem + "_memory.png"), bench_scaling(report, stem + "_scaling.png")]
    return [p for p in made if p]


def charts(json_path: str, out_dir: str | None = None) -> list[str]:
    """The charts of either script's JSON, told apart by their keys."""
    with open(json_path) as f:
        keys = json.load(f).keys()
    return scale_charts(json_path, out_dir) if "summary" in keys else bench_charts(json_path, out_dir)


def write_charts(json_path: str) -> None:
    """The benchmarks' ``--plots`` step: the charts of ``json_path`` beside it, each path printed; without
    matplotlib one line says so and nothing else changes (the tables and the JSON stand without the charts)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("no charts: matplotlib is not installed (pip install 'parallel_vae[bench]')")
        return
    for png in charts(json_path):
        print(f"chart: {png}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="JSON of benchmarks/scale_table.py or benchmarks/bench_vae.py")
    p.add_argument("--out_dir", default=None, help="where the PNGs go (default: beside each JSON)")
    args = p.parse_args(argv)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
    for path in args.json:
        for png in charts(path, args.out_dir):
            print(png)


if __name__ == "__main__":
    main()

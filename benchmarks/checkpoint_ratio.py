#!/usr/bin/env python
"""Real-tensor peak of one training step with and without gradient checkpointing, on gloo ranks (CPU).

The step is ``parallel_vae.jobs.fake_run``'s ``train`` workload on real tensors (sharded encode, posterior sample,
decode, L1 + MSE + KL on the rank's rows, backward, mixed-precision AdamW); the peak is the busiest phase's live
tensor bytes on each rank (``LiveBytes``), forward + backward reported separately from the optimizer step.

    python benchmarks/checkpoint_ratio.py --frames 65 --height 64 --width 64 --world 2 --base_dim 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

VARIANTS = {"plain": dict(checkpointing=False), "checkpointed": dict(checkpointing=True),
            "offloaded": dict(checkpointing=True, offload=True)}


def _task(rank: int, world: int, layout: str, base_dim: int, frames: int, height: int, width: int) -> dict:
    import torch

    from parallel_vae.jobs.fake_run import measure_rank
    from parallel_vae.jobs.models import seeded_config

    cls_name, cfg = seeded_config(layout, width=base_dim)
    out = {}
    for name, kw in VARIANTS.items():
        t0 = time.perf_counter()
        m = measure_rank(cls_name, cfg, "train", frames, height, width, world, rank, torch.float32, fake=False, **kw)
        out[name] = dict(forward_backward=m["phases"]["forward_backward"], peak=m["peak_live_bytes"],
                         seconds=round(time.perf_counter() - t0, 2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", default="wan2.1")
    p.add_argument("--base_dim", type=int, default=8)
    p.add_argument("--frames", type=int, default=65)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args()
    from tests.dist_harness import run_ranks, values

    res = values(run_ranks(_task, args.world, args.layout, args.base_dim, args.frames, args.height, args.width,
                           timeout=3000, fresh=True))
    for rank, r in enumerate(res):
        base = r["plain"]["forward_backward"]
        for name, v in r.items():
            print(f"rank {rank} {name:13s} forward+backward {v['forward_backward'] / 1e6:9.2f} MB  "
                  f"ratio {v['forward_backward'] / base:.3f}  step peak {v['peak'] / 1e6:9.2f} MB  {v['seconds']} s")
    print(json.dumps(res))


if __name__ == "__main__":
    main()

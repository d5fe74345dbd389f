#!/usr/bin/env python
"""Graphs and graph breaks of the parallel VAE under torch.compile (``torch._dynamo.explain``), at 2 gloo ranks on
CPU, for the tiny Wan and AutoencoderKL models of ``tests/test_compile.py``: the decoder and encoder modules (what
users compile), and the whole ``vae.decode`` call (which also holds the shape agreement, a host read by design).

    python benchmarks/graph_breaks.py            # prints a table and JSON (rank 0's counts; every rank's are equal)
"""

from __future__ import annotations

import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def _task(rank: int, world: int) -> dict:
    import torch
    import torch._dynamo

    import parallel_vae as pv
    from tests.test_compile import _inputs, _tiny

    torch._dynamo.config.cache_size_limit = 64
    out = {}
    for family in ("kl", "wan"):
        z, x = _inputs(family)
        vae = pv.enable_spatial_parallelism(_tiny(family))
        z_local, x_local = pv.shard_latents(vae, z), pv.shard_video(vae, x)
        targets = {"vae.decode (with the agreement)": lambda: vae.decode(z).sample}
        if family == "kl":  # the plain module calls; Wan's decoder/encoder take the causal cache lists
            targets["decoder module"] = lambda: vae.decoder(z_local)
            targets["encoder module"] = lambda: vae.encoder(x_local)
        for name, fn in targets.items():
            torch._dynamo.reset()
            with torch.no_grad():
                e = torch._dynamo.explain(fn)()
            reasons = sorted({str(b.reason).split("\n")[0][:100] for b in e.break_reasons})
            out[f"{family} {name}"] = dict(graphs=e.graph_count, breaks=e.graph_break_count, ops=e.op_count,
                                           reasons=reasons)
    return out


def main() -> None:
    from tests.dist_harness import run_ranks, values

    res = values(run_ranks(_task, 2, timeout=900, fresh=True))
    print("| target | graphs | graph breaks | ops | break reasons |")
    print("|---|---|---|---|---|")
    for name, r in res[0].items():
        print(f"| {name} | {r['graphs']} | {r['breaks']} | {r['ops']} | {'; '.join(r['reasons']) or '-'} |")
    print(json.dumps(res[0], indent=1))


if __name__ == "__main__":
    main()

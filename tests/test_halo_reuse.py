"""Inference without autograd does not resend the halo rows of cached frames, and stays exact.

A causal conv's cache is the tail of its previous input, whose halo rows travelled with the previous chunk; under
``torch.no_grad()`` the halo-aware conv remembers them. The parity tests run with autograd (where nothing is
remembered), so this file checks the inference path: float64 against the unmodified model, uneven splits, both
layouts, replicated and sharded, a second pass after the first, and fewer bytes than the autograd path sends.
"""

from __future__ import annotations

import pytest
import torch

import parallel_vae as pv
from parallel_vae.core.comm import count_traffic
from parallel_vae.jobs.models import build_wan_vae
from tests.dist_harness import run_ranks, values
from tests.float64_internals import float64_internals


def _model_and_video(layout: str, latent_h: int, frames: int):
    vae = float64_internals(build_wan_vae(layout, base_dim=8, z_dim=4, seed=3, dtype=torch.float64, perturb=0.05))
    f = pv.spatial_factor(vae)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 3, frames, latent_h * f, 3 * f, generator=g, dtype=torch.float64) * 2 - 1
    return vae, x


def _run(vae, x, mode):
    if mode == "replicated":
        z = vae.encode(x).latent_dist.mode()
        return z, vae.decode(z).sample
    z_local = pv.sharded_encode(vae, pv.shard_video(vae, x)).mode()
    out_local = pv.sharded_decode(vae, z_local)
    return pv.gather_shards(vae, z_local), pv.gather_shards(vae, out_local)


def _worker(rank, world, layout, latent_h, frames, mode):
    vae, x = _model_and_video(layout, latent_h, frames)
    pv.enable_spatial_parallelism(vae)
    with torch.no_grad(), count_traffic() as inference:
        z, out = _run(vae, x, mode)
        z_again, out_again = _run(vae, x, mode)  # what the first pass remembered must not leak into the second
    with torch.enable_grad(), count_traffic() as training:  # parameters require grad: nothing is remembered
        _run(vae, x, mode)
    return dict(z=z, out=out, z_again=z_again, out_again=out_again, sent=inference.as_dict()["sent_bytes"] / 2,
                sent_grad=training.as_dict()["sent_bytes"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "layout,world,latent_h,frames,mode",
    [("wan2.1", 2, 3, 9, "sharded"), ("wan2.1", 3, 7, 9, "replicated"), ("wan2.2", 3, 7, 13, "sharded")],
)
def test_inference_reuses_cached_halos_exactly(layout, world, latent_h, frames, mode):
    vae, x = _model_and_video(layout, latent_h, frames)
    with torch.no_grad():
        z_ref = vae.encode(x).latent_dist.mode()
        out_ref = vae.decode(z_ref).sample
    results = values(run_ranks(_worker, world, layout, latent_h, frames, mode))
    for r in results:
        for key, ref in (("z", z_ref), ("out", out_ref), ("z_again", z_ref), ("out_again", out_ref)):
            err = ((r[key] - ref).abs().max() / ref.abs().max()).item()
            assert err <= 1e-10, f"{key}: rel err {err:.2e}"
        assert r["sent"] < r["sent_grad"], (r["sent"], r["sent_grad"])

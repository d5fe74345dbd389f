"""Every family beyond Wan against the unmodified diffusers model: outputs, input gradients and summed parameter
gradients within the bars of docs/how-it-works.md, at worlds 2-4, uneven splits (7 latent rows on 3 ranks), batch 2,
both modes, a subgroup, activation checkpointing, and non-trivial norm affines (every parameter perturbed); each rank
computes only its own rows; bad input gives one clear error on every rank.

Families with their own test file (HunyuanVideo, HunyuanVideo-1.5) add their cases there with the same machinery.
"""

from __future__ import annotations


import pytest
import torch

import parallel_vae as pv
from parallel_vae.families import adapter_for
from tests.dist_harness import run_ranks, values
from tests.family_cases import FCase, call_outcomes, check_parity, make_model

CASES = [
    # AutoencoderKL (SD layout: 4 latent channels, quant convs) and its SD3/Flux.1 variant (16 channels, none)
    FCase("sd", "float64", "replicated", latent_h=3, world=2, batch=2),
    FCase("sd", "float64", "sharded", latent_h=7, world=3),
    FCase("flux1", "float64", "sharded", latent_h=5, world=4, checkpointing=True),
    FCase("sd", "float32", "replicated", latent_h=3, world=3),
    FCase("sd", "float64", "replicated", latent_h=7, world=3),  # encode + decode in one graph, 3/2/2, GroupNorm
    FCase("sd3", "float64", "replicated", latent_h=3, world=4, groups=((2, 3),)),
    # Flux.2
    FCase("flux2", "float64", "sharded", latent_h=3, world=2, batch=2),
    FCase("flux2", "float64", "replicated", latent_h=7, world=3),
    # Qwen-Image: a causal video VAE (images are 1-frame videos), Wan's architecture
    FCase("qwenimage", "float64", "sharded", latent_h=3, world=2, frames=1),
    FCase("qwenimage", "float64", "replicated", latent_h=7, world=3, frames=5),
    FCase("qwenimage", "float64", "sharded", latent_h=4, world=4, frames=5, batch=2, checkpointing=True),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_family_parity(case: FCase, record_property):
    check_parity(case, tuple(CASES), record_property)


def _bad_input_worker(rank, world, layout, width=8, latent=4):
    """Each bad call on every rank: the error type and message (must be one clear error, the same everywhere)."""
    torch.set_num_threads(1)
    case = FCase(layout, "float32", world=world, width=width, latent=latent)
    vae = make_model(case, torch.float32)
    pv.enable_spatial_parallelism(vae)
    adapter = adapter_for(vae)
    f, c, zc = adapter.spatial_factor(vae), adapter.pixel_channels(vae), adapter.latent_channels(vae)
    lead = (1, c, 1) if adapter.video else (1, c)
    zlead = (1, zc, 1) if adapter.video else (1, zc)
    calls = {
        "too_few_latent_rows": lambda: vae.decode(torch.zeros(zlead + (world - 1, 2))),
        "pixel_height_not_multiple": lambda: vae.encode(torch.zeros(lead + (f * world + 1, f))),
        "wrong_latent_channels": lambda: vae.decode(torch.zeros((1, zc + 1) + zlead[2:] + (world, 2))),
        "wrong_pixel_channels": lambda: vae.encode(torch.zeros((1, c + 1) + lead[2:] + (f * world, f))),
    }
    def tiled():
        vae.enable_tiling()
        try:
            vae.decode(torch.zeros(zlead + (world, 2)))
        finally:
            vae.disable_tiling()

    calls["tiling_enabled"] = tiled
    return call_outcomes(calls)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["sd", "flux2", "qwenimage"])
def test_bad_input_one_clear_error_on_every_rank(layout):
    per_rank = values(run_ranks(_bad_input_worker, 2, layout, timeout=240))
    for name in per_rank[0]:
        errors = [r[name] for r in per_rank]
        assert errors[0] is not None, f"{layout} {name}: no error"
        assert all(e == errors[0] for e in errors), f"{layout} {name}: ranks disagree: {errors}"
        expected = "RuntimeError" if name == "tiling_enabled" else "ShardingError"
        assert errors[0][0] == expected, errors[0]
    assert "exclusive" in per_rank[0]["tiling_enabled"][1]


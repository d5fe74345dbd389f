"""Reward gradients through a frozen parallel decode (``pv.decode_for_reward``): the gradient of a pixel-space
reward with respect to the latents equals the unmodified model's, float64 bar 1e-10; sharded (uneven 2/1 rows at 2
ranks, 1/1/1 at 3) with and without gradient checkpointing, and replicated. Refusals: a VAE that is not frozen, and
latents that do not require grad."""

from __future__ import annotations

import pytest
import torch

from tests.cases import make_model
from tests.dist_harness import run_ranks, values

LAYOUT, LATENT = "wan2.1", (1, 4, 3, 3, 2)  # (B, C, T, h, w): 3 latent frames, 3 latent rows


def _latents_and_weights():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(LATENT, generator=g, dtype=torch.float64)
    b, _, t, h, w = LATENT
    weights = torch.randn((b, 3, 1 + 4 * (t - 1), 8 * h, 8 * w), generator=g, dtype=torch.float64)
    return z, weights


def _reward(x, weights):
    return (weights * torch.tanh(x)).sum()  # a nonlinear reward of the pixels


def _reference():
    torch.set_num_threads(1)
    vae = make_model(LAYOUT, torch.float64).requires_grad_(False)
    z, weights = _latents_and_weights()
    z.requires_grad_(True)
    _reward(vae.decode(z).sample, weights).backward()
    return z.grad


def _worker(rank, world, mode):
    import parallel_vae as pv

    vae = pv.enable_spatial_parallelism(make_model(LAYOUT, torch.float64).requires_grad_(False))
    if mode == "sharded-ckpt":
        pv.enable_gradient_checkpointing(vae)
    z, weights = _latents_and_weights()
    if mode == "replicated":
        z.requires_grad_(True)
        _reward(pv.decode_for_reward(vae, z, sharded=False), weights).backward()
        grad = z.grad
    else:
        z_local = pv.shard_latents(vae, z).detach().requires_grad_(True)
        x_local = pv.decode_for_reward(vae, z_local)
        _reward(x_local, pv.shard_video(vae, weights)).backward()  # this rank's part of the reward
        grad = pv.gather_shards(vae, z_local.grad)
    out = {"grad": grad}
    errors = []
    for bad in ("trainable", "no-grad"):
        try:
            if bad == "trainable":
                vae.decoder.conv_out.weight.requires_grad_(True)
                pv.decode_for_reward(vae, z.detach().requires_grad_(True), sharded=False)
            else:
                vae.requires_grad_(False)
                pv.decode_for_reward(vae, z.detach(), sharded=False)
        except ValueError as e:
            errors.append(str(e))
    vae.requires_grad_(False)
    out["errors"] = errors
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode,world", [("sharded", 2), ("sharded-ckpt", 3), ("replicated", 2)])
def test_reward_gradient_to_the_latents_equals_unmodified(mode, world):
    ref = _reference()
    for res in values(run_ranks(_worker, world, mode)):
        err = ((res["grad"] - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-10, (mode, world, err)
        assert len(res["errors"]) == 2, res["errors"]
        assert "vae.requires_grad_(False)" in res["errors"][0] and "decoder.conv_out.weight" in res["errors"][0]
        assert "do not require grad" in res["errors"][1]

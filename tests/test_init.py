"""Training-from-scratch helpers in parallel_vae.jobs.models: the zero-residual initialization and the single-frame to
video inflation (the two steps the embedded default checkpoint was trained with)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResidualBlock

from parallel_vae.jobs.models import build_wan_vae, inflate_temporal


def _roundtrip(vae, x):
    with torch.no_grad():
        return vae.decode(vae.encode(x).latent_dist.mode()).sample


def test_zero_residual_init_makes_every_block_the_identity():
    vae = build_wan_vae("wan2.1", base_dim=8, z_dim=4, seed=3, dtype=torch.float64, init="zero_residual")
    again = build_wan_vae("wan2.1", base_dim=8, z_dim=4, seed=3, dtype=torch.float64, init="zero_residual")
    default = build_wan_vae("wan2.1", base_dim=8, z_dim=4, seed=3, dtype=torch.float64)
    sd, sd_again, sd_default = vae.state_dict(), again.state_dict(), default.state_dict()
    assert all(torch.equal(sd[k], sd_again[k]) for k in sd)  # seeded: the same in every process
    for k, v in sd.items():
        if k.endswith("bias"):
            assert not v.any(), k
        elif k.endswith(("conv2.weight", "proj.weight")):
            assert not v.any(), k
        else:  # everything else is the modules' own seeded initialization, untouched
            assert torch.equal(v, sd_default[k]), k
    # Each residual block and attention block passes its input through unchanged.
    blocks = [m for m in vae.modules() if isinstance(m, (WanResidualBlock, WanAttentionBlock))]
    assert len(blocks) > 10
    g = torch.Generator().manual_seed(0)
    for block in blocks:
        if isinstance(block, WanResidualBlock) and not isinstance(block.conv_shortcut, torch.nn.Identity):
            continue
        dim = block.norm.gamma.shape[0] if isinstance(block, WanAttentionBlock) else block.conv1.weight.shape[1]
        x = torch.randn(1, dim, 2, 4, 4, generator=g, dtype=torch.float64)
        with torch.no_grad():
            assert torch.equal(block(x), x)
    with pytest.raises(ValueError, match="init"):
        build_wan_vae("wan2.1", base_dim=8, z_dim=4, init="xavier")


def test_inflated_model_reconstructs_each_frame_as_the_single_frame_model():
    """After inflation a clip's frame 0 is the single-frame round trip of frame 0, and every frame of chunk k
    (frames 4k-3 .. 4k) is the single-frame round trip of frame 4k, exactly (float64)."""
    vae = build_wan_vae("wan2.1", base_dim=8, z_dim=4, seed=1, dtype=torch.float64, perturb=0.1)
    single = {k: v.clone() for k, v in vae.state_dict().items()}
    assert inflate_temporal(vae) is vae
    x = torch.rand(1, 3, 9, 16, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    y = _roundtrip(vae, x)
    # single frames only use the present tap, which inflation keeps: their round trip is unchanged by it
    plain = build_wan_vae("wan2.1", base_dim=8, z_dim=4, seed=1, dtype=torch.float64, perturb=0.1)
    plain.load_state_dict(single)
    for chunk, source in ((0, 0), (1, 4), (2, 8)):
        frame = _roundtrip(vae, x[:, :, source : source + 1])[:, :, 0]
        assert (frame - _roundtrip(plain, x[:, :, source : source + 1])[:, :, 0]).abs().max() < 1e-12
        targets = [0] if chunk == 0 else range(4 * chunk - 3, 4 * chunk + 1)
        for t in targets:
            assert (y[:, :, t] - frame).abs().max() <= 1e-10 * frame.abs().max(), (chunk, t)
    # Not a no-op: the uninflated model mixes frames in time.
    assert (_roundtrip(plain, x)[:, :, 1] - y[:, :, 1]).abs().max() > 1e-3


def test_inflate_refuses_wan22():
    vae = build_wan_vae("wan2.2", base_dim=8, z_dim=4, seed=0)
    with pytest.raises(ValueError, match="Wan2.1"):
        inflate_temporal(vae)

"""Seeded ``AutoencoderKLWan`` models of the real Wan2.1 and Wan2.2 layouts at any channel width.

No model hub is needed: the architecture (block structure, attention, downsample/upsample kinds, residual
variant, patch size) is the real one; only ``base_dim`` / ``z_dim`` are chosen small for tests and demos.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import AutoencoderKLWan
from diffusers.utils import logging as diffusers_logging

# Real configs (diffusers' Wan-AI/Wan2.1-T2V-*-Diffusers and Wan2.2-TI2V-5B-Diffusers vae/config.json).
WAN21_CONFIG = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    is_residual=False,
    in_channels=3,
    out_channels=3,
    patch_size=None,
    scale_factor_temporal=4,
    scale_factor_spatial=8,
)
WAN22_CONFIG = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_temporal=4,
    scale_factor_spatial=16,
)
LAYOUTS = {"wan2.1": WAN21_CONFIG, "wan2.2": WAN22_CONFIG}


def wan_config(layout: str = "wan2.1", *, base_dim: Optional[int] = None, z_dim: Optional[int] = None) -> dict:
    """The diffusers config of ``layout`` ("wan2.1" or "wan2.2"), optionally at a smaller width.

    For Wan2.2 the decoder keeps the real ratio decoder_base_dim / base_dim = 256 / 160 (rounded to a multiple of
    4, which its DupUp3D channel grouping needs).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    cfg = dict(LAYOUTS[layout])
    if base_dim is not None:
        if layout == "wan2.2":
            cfg["decoder_base_dim"] = max(4, round(base_dim * 256 / 160 / 4) * 4)
        cfg["base_dim"] = base_dim
    if z_dim is not None:
        cfg["z_dim"] = z_dim
    # Pipelines normalize latents with per-channel statistics; keep them the right length (identity at test widths).
    if cfg["z_dim"] != LAYOUTS[layout]["z_dim"]:
        cfg["latents_mean"] = [0.0] * cfg["z_dim"]
        cfg["latents_std"] = [1.0] * cfg["z_dim"]
    return cfg


def build_wan_vae(
    layout: str = "wan2.1",
    *,
    base_dim: Optional[int] = None,
    z_dim: Optional[int] = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    perturb: float = 0.0,
) -> AutoencoderKLWan:
    """A seeded ``AutoencoderKLWan`` of ``layout``; identical weights in every process for the same arguments.

    ``perturb`` adds seeded uniform noise of that amplitude to every parameter, so that unit norm scales and zero
    biases do not hide mistakes in tests (a gradient that only matches when gamma == 1 is not checked).
    """
    cfg = wan_config(layout, base_dim=base_dim, z_dim=z_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**cfg)
        if perturb:
            with torch.no_grad():
                for p in vae.parameters():
                    p.add_(torch.rand_like(p).sub_(0.5).mul_(2 * perturb))
    return cast_quietly(vae, dtype).eval()


def cast_quietly(vae: AutoencoderKLWan, dtype: torch.dtype) -> AutoencoderKLWan:
    """``vae.to(dtype)`` without diffusers' keep-in-fp32 warning, which it prints even when the list is empty
    (Wan has no keep-in-fp32 modules)."""
    if dtype == next(vae.parameters()).dtype:
        return vae
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return vae.to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)

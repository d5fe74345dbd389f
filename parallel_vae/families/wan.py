"""The Wan wiring: which module of a diffusers ``AutoencoderKLWan`` gets which treatment.

The plan is typed data computed from the model (``plan_for``), applied by swapping each instance's class to its
halo-aware subclass (``apply_plan``) and undone by swapping it back (``remove_plan``). Every module of the model
is classified; a module this table does not know is an error, not a silent pass-through, so a future diffusers
release that adds a layer with spatial reach cannot silently make results wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from diffusers.models.autoencoders import autoencoder_kl_wan as wan

from ..core.layers import HaloCausalConv3d, HaloConv2d, HaloZeroPad2d, ShardedWanAttentionBlock, SpatialState

# Modules that act per pixel (channels, time, or within a row pair that shards keep together): no change.
_LOCAL = (
    wan.WanRMS_norm,
    wan.WanUpsample,  # nearest-exact 2x: output row j reads input row j // 2, always local
    wan.AvgDown3D,  # 2x2 spatial blocks; shards start on even rows
    wan.DupUp3D,
    nn.SiLU,
    nn.Dropout,
    nn.Identity,
)
# Modules whose own forward only routes tensors to children (the children are classified).
_CONTAINERS = (
    nn.Sequential,
    nn.ModuleList,
    wan.WanEncoder3d,
    wan.WanDecoder3d,
    wan.WanMidBlock,
    wan.WanResidualBlock,
    wan.WanResample,
    wan.WanUpBlock,
    wan.WanResidualUpBlock,
    wan.WanResidualDownBlock,
)


@dataclass(frozen=True)
class Treatment:
    """One entry of a plan: the module at ``name`` becomes an instance of ``cls``."""

    name: str
    cls: type
    reason: str


def _conv_treatment(name: str, m: nn.Module, parent: nn.Module | None) -> Treatment | None:
    if isinstance(m, wan.WanCausalConv3d):
        kh = m.kernel_size[1]
        if kh == 1:
            return None  # 1x1x1 convs and time_conv (3, 1, 1): local
        if kh == 3 and m._padding[2] == m._padding[3] == 1 and m.stride[1] == 1:
            return Treatment(name, HaloCausalConv3d, "3-row causal conv: one halo row each side")
    elif type(m) is nn.Conv2d:
        kh = m.kernel_size[0]
        if kh == 1 and m.stride[0] == 1:
            return None  # attention to_qkv / proj
        if isinstance(parent, wan.WanResample) and parent.mode.startswith("upsample"):
            if kh == 3 and m.padding[0] == 1 and m.stride[0] == 1 and m.padding_mode == "zeros":
                return Treatment(name, HaloConv2d, "3x3 conv after 2x upsample: one halo row each side")
        if isinstance(parent, wan.WanResample) and parent.mode.startswith("downsample"):
            if kh == 3 and m.padding[0] == 0 and m.stride[0] == 2:
                return None  # its input already carries the halo row (see HaloZeroPad2d)
    raise NotImplementedError(f"parallel_vae does not know how to shard {name} ({m!r})")


def plan_for(vae: nn.Module) -> list[Treatment]:
    """The treatment of every module of ``vae`` that needs one; raises for a module it does not know."""
    if not isinstance(vae, wan.AutoencoderKLWan):
        raise TypeError(f"expected a diffusers AutoencoderKLWan, got {type(vae).__name__}")
    parents = {id(c): p for p in vae.modules() for c in p.children()}
    plan = []
    for name, m in vae.named_modules():
        original = getattr(m, "_pv_original_class", type(m))
        # Exact types: a subclass may override forward with spatial reach we have not read.
        if original in _CONTAINERS or m is vae:
            if original is wan.WanResample and m.mode not in (
                "none",
                "upsample2d",
                "upsample3d",
                "downsample2d",
                "downsample3d",
            ):
                raise NotImplementedError(f"unknown WanResample mode {m.mode!r} at {name}")
            continue
        if original is wan.WanAttentionBlock:
            plan.append(Treatment(name, ShardedWanAttentionBlock, "attention: own queries, all-gathered keys/values"))
        elif original is nn.ZeroPad2d:
            parent = parents.get(id(m))
            pad = tuple(m.padding)
            if not (isinstance(parent, nn.Sequential) and pad == (0, 1, 0, 1)):
                raise NotImplementedError(f"parallel_vae does not know how to shard {name} ({m!r})")
            plan.append(Treatment(name, HaloZeroPad2d, "downsample pad: bottom row from the rank below"))
        elif original in _LOCAL:
            continue
        else:
            # The Conv2d inside WanResample.resample has the Sequential as parent; classify by its grandparent.
            parent = parents.get(id(m))
            grand = parents.get(id(parent)) if isinstance(parent, nn.Sequential) else parent
            t = _conv_treatment(name, m, grand)
            if t is not None:
                plan.append(t)
    return plan


def apply_plan(vae: nn.Module, plan: list[Treatment], state: SpatialState) -> None:
    """Swap every planned module to its halo-aware class, in place (parameters and keys unchanged)."""
    modules = dict(vae.named_modules())
    for t in plan:
        m = modules[t.name]
        if not hasattr(m, "_pv_original_class"):
            m._pv_original_class = type(m)
        m.__class__ = t.cls
        m._pv_state = state


def remove_plan(vae: nn.Module) -> None:
    """Restore every swapped module's original class."""
    for m in vae.modules():
        original = m.__dict__.pop("_pv_original_class", None)
        if original is not None:
            m.__class__ = original
            m.__dict__.pop("_pv_state", None)


def spatial_factor(vae: nn.Module) -> int:
    """Pixel rows per latent row: 2**(number of spatial downsamples) x patch size (8 for Wan2.1, 16 for Wan2.2)."""
    cfg = vae.config
    return 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)


def latent_channels(vae: nn.Module) -> int:
    return int(vae.config.z_dim)


def pixel_channels(vae: nn.Module) -> int:
    """Channels of the pixel video (before Wan2.2's patchify folds patch_size**2 pixels into channels)."""
    p = vae.config.patch_size or 1
    return int(vae.config.in_channels) // (p * p)

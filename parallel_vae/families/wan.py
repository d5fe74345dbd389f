"""The Wan wiring: which module of a diffusers ``AutoencoderKLWan`` gets which treatment, and why.

| module | treatment |
| --- | --- |
| ``WanCausalConv3d`` with a 3-row kernel (conv_in/out, resnet conv1/conv2) | ``HaloCausalConv``: one halo row each side, exchanged after the frame cache is concatenated; zeros at the global edges |
| ``WanCausalConv3d`` with a 1-row kernel (1x1x1, ``time_conv``) | local |
| ``WanResample`` upsample: nearest-exact 2x + ``Conv2d(3, padding=1)`` | the upsample is local; the conv becomes ``HaloConv`` |
| ``WanResample`` downsample: ``ZeroPad2d((0, 1, 0, 1))`` + ``Conv2d(3, stride=2)`` | the pad becomes ``HaloZeroPad2d`` (one row from the rank below; zeros only on the last rank); the conv is then local |
| ``WanAttentionBlock`` (mid blocks) | ``ShardedFrameAttention``: own queries against all-gathered keys/values of the frame |
| ``WanRMS_norm`` (over channels), SiLU, dropout, ``AvgDown3D`` / ``DupUp3D``, patchify | local |

Qwen-Image's VAE is the same architecture under other class names; its adapter reuses these treatments.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.autoencoders import autoencoder_kl_wan as wan

from ..core.attention import sharded_sdpa
from ..core.halo import HaloConv
from ..layers.causal_cache_conv import HaloCausalConv, disable_cache_checkpointing, enable_cache_checkpointing
from ..layers.pad_downsample import HaloZeroPad2d
from ..core.plan import SpatialState, Treatment, classify, original_class, sharded_class, unknown_module
from .base import FamilyAdapter, mean_std_normalization

__all__ = ["WanAdapter", "CausalCacheAdapter", "ShardedFrameAttention", "causal_vae_treatment"]


class ShardedFrameAttention:
    """Single-head attention over each frame whose rows are sharded (``WanAttentionBlock``,
    ``QwenImageAttentionBlock``: channel RMS norm, a 1x1 ``to_qkv`` conv, SDPA, a 1x1 ``proj``, residual).

    Each rank computes queries for its own rows only, against keys and values of the whole frame, all-gathered
    (variable sizes) in row order. The all-gather's backward reduce-scatters, so each owner receives the key/value
    gradients that every rank's queries produced. No rank computes the whole frame's attention.
    """

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        b, c, t, h, w = x.size()
        # (b, c, t, h, w) -> (b*t, c, h, w)
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = self.norm(x)
        qkv = self.to_qkv(x)
        # (b*t, 3c, h, w) -> (b*t, 1, h*w, 3c)
        qkv = qkv.reshape(b * t, 1, c * 3, -1).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        x = sharded_sdpa(q, k, v, self._pv_state.group, self._pv_state.level_sizes(h * w))
        # (b*t, 1, h*w, c) -> (b*t, c, h, w)
        x = x.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        x = self.proj(x)
        # (b*t, c, h, w) -> (b, c, t, h, w)
        x = x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        return x + identity


def causal_vae_treatment(name, m, parents, *, causal_conv, attention, resample, modes) -> Treatment | None:
    """The shared classification of Wan-style VAEs (Wan, Qwen-Image): a causal conv class, a per-frame attention
    block class and a resample class whose ``resample`` Sequential holds the 2-D up/down convs."""
    cls = original_class(m)
    parent = parents.get(id(m))
    if cls is attention:
        return Treatment(name, sharded_class(ShardedFrameAttention, cls), "attention: own queries, gathered keys/values")
    if cls is causal_conv:
        kh = m.kernel_size[1]
        if kh == 1:
            return None  # 1x1x1 convs and time_conv (3, 1, 1): local
        if kh == 3 and m._padding[2] == m._padding[3] == 1 and m.stride[1] == 1:
            return Treatment(name, sharded_class(HaloCausalConv, cls), "3-row causal conv: one halo row each side")
        raise unknown_module(name, m)
    grand = parents.get(id(parent)) if isinstance(parent, nn.Sequential) else None
    in_resample = isinstance(grand, resample) and grand.mode in modes
    if cls is nn.ZeroPad2d:
        if in_resample and grand.mode.startswith("downsample") and tuple(m.padding) == (0, 1, 0, 1):
            return Treatment(name, sharded_class(HaloZeroPad2d, cls), "downsample pad: bottom row from the rank below")
        raise unknown_module(name, m)
    if cls is nn.Conv2d:
        kh = m.kernel_size[0]
        if kh == 1 and m.stride[0] == 1:
            return None  # attention to_qkv / proj
        if in_resample and grand.mode.startswith("upsample"):
            if kh == 3 and m.padding[0] == 1 and m.stride[0] == 1 and m.padding_mode == "zeros":
                return Treatment(name, sharded_class(HaloConv, cls), "3x3 conv after 2x upsample: one halo row each side")
        if in_resample and grand.mode.startswith("downsample"):
            if kh == 3 and m.padding[0] == 0 and m.stride[0] == 2:
                return None  # its input already carries the halo row (see HaloZeroPad2d)
    raise unknown_module(name, m)


_MODES = ("none", "upsample2d", "upsample3d", "downsample2d", "downsample3d")

# Modules that act per pixel (channels, time, or within a row pair that shards keep together): no change.
_LOCAL = (
    wan.WanRMS_norm,
    # nearest-exact 2x: output row j reads input row j // 2, always local. diffusers computes it in float32 even in
    # a float64 model (forward and backward round to float32); kept as it is, so shards round as the whole frame
    # does. The float64 tests compute it in float64 on both sides (tests/float64_internals.py says why).
    wan.WanUpsample,
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


def check_resample_modes(vae: nn.Module, resample: type) -> None:
    for name, m in vae.named_modules():
        if original_class(m) is resample and m.mode not in _MODES:
            raise NotImplementedError(f"unknown {resample.__name__} mode {m.mode!r} at {name}")


class CausalCacheAdapter(FamilyAdapter):
    """What Wan-style causal VAEs (Wan, Qwen-Image) share: the class names differ, the machinery does not. A
    subclass names its causal conv, attention block, resample class and module lists."""

    video = True
    uses_latent_stats = True
    causal_conv: type
    attention: type
    resample: type
    local: tuple = ()
    containers: tuple = ()

    def plan(self, vae):
        check_resample_modes(vae, self.resample)

        def treat(name, m, parents):
            return causal_vae_treatment(
                name, m, parents, causal_conv=self.causal_conv, attention=self.attention, resample=self.resample,
                modes=_MODES,
            )

        return classify(vae, self.containers, self.local, treat)

    def latent_channels(self, vae) -> int:
        return int(vae.config.z_dim)

    def chunks(self, vae, frames: int, decode: bool) -> int:
        # the decoder runs once per latent frame, the encoder once per chunk of 1, 4, 4, ... frames
        return frames if decode else 1 + (frames - 1) // self.temporal_factor(vae)

    def checkpointed_blocks(self, vae):
        blocks = [(f"encoder.down_blocks.{i}", b) for i, b in enumerate(vae.encoder.down_blocks)]
        blocks.append(("encoder.mid_block", vae.encoder.mid_block))
        blocks.append(("decoder.mid_block", vae.decoder.mid_block))
        blocks += [(f"decoder.up_blocks.{i}", b) for i, b in enumerate(vae.decoder.up_blocks)]
        return blocks

    def enable_checkpointing(self, vae, offload: bool = False) -> None:
        # diffusers marks these classes as not supporting checkpointing (their blocks mutate a shared cache list)
        enable_cache_checkpointing(self.checkpointed_blocks(vae), offload=offload)

    def disable_checkpointing(self, vae) -> None:
        disable_cache_checkpointing(self.checkpointed_blocks(vae))

    def denormalize(self, vae, z):
        mean, std = mean_std_normalization(vae, z)
        return z * std + mean

    def normalize(self, vae, z):
        mean, std = mean_std_normalization(vae, z)
        return (z - mean) / std


class WanAdapter(CausalCacheAdapter):
    name = "wan"
    model_class = wan.AutoencoderKLWan
    causal_conv, attention, resample = wan.WanCausalConv3d, wan.WanAttentionBlock, wan.WanResample
    local, containers = _LOCAL, _CONTAINERS

    def spatial_factor(self, vae) -> int:
        """2**(number of spatial downsamples) x patch size (8 for Wan2.1, 16 for Wan2.2)."""
        cfg = vae.config
        return 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)

    def temporal_factor(self, vae) -> int:
        return int(vae.config.scale_factor_temporal)

    def pixel_channels(self, vae) -> int:
        """Channels of the pixel video (before Wan2.2's patchify folds patch_size**2 pixels into channels)."""
        p = vae.config.patch_size or 1
        return int(vae.config.in_channels) // (p * p)


ADAPTER = WanAdapter()

"""The Cosmos tokenizer wiring: diffusers ``AutoencoderKLCosmos`` (Cosmos-1.0 CV8x8x8 in the default config).

A causal 3-D VAE without frame caches (the whole clip goes through every layer at once): a Haar-wavelet patcher
(two levels of 2x2x2 DWT for ``patch_size`` 4) into factorized (1x3x3 then 3x1x1) causal convolutions, per-frame
one-group GroupNorms, mid blocks with spatial and temporal attention, and an inverse Haar unpatcher. Time is never
split, so every temporal pad, stride and the causal first-frame repeats run unchanged on each rank's rows.

| module | treatment | why |
| --- | --- | --- |
| ``CosmosCausalConv3d`` with a 3-row kernel and padding 1 (every ``conv_s``, the upsampler's ``conv2``) | ``HaloCosmosConv`` | its forward repeats the first frame ``temporal_pad`` times and zero-pads rows and columns with ``F.pad``; here the rows' pad is a halo of one row each side (zeros at the global edges) |
| the downsampler's ``conv1`` (1x3x3, stride 2, no padding) | ``HaloBelowPaddedConv`` | ``CosmosDownsample3d`` zero-pads one row below (``F.pad(x, (0, 1, 0, 1))``) before it: that row comes from the rank below, zeros on the last rank |
| 1-row ``CosmosCausalConv3d`` (the 3x1x1 ``conv_t``, 1x1x1 shortcuts, quant convs, q/k/v/out projections) | local | per pixel (time is whole) |
| ``nn.GroupNorm`` inside ``CosmosCausalGroupNorm`` (one group: called on (B*T, C, H, W), statistics per frame) | ``ShardedGroupNorm`` | statistics per sample and group merged over the group (Chan); the frames are the samples |
| ``CosmosCausalAttention`` with ``CosmosSpatialAttentionProcessor2_0`` (mid blocks) | ``ShardedCosmosAttention`` | attention over each frame's pixels: own queries against all-gathered keys/values |
| ``CosmosCausalAttention`` with ``CosmosTemporalAttentionProcessor2_0`` | local (container) | each pixel attends to its own frames (causal mask over time) |
| ``CosmosPatchEmbed3d`` (Haar DWT: reflect pad of one row below, then kernel-2 stride-2 filters) | local | the pad row is never read for an even height, and every level's shard height is even |
| ``CosmosUnpatcher3d`` (transposed kernel-2 stride-2 filters), ``CosmosUpsample3d``'s ``repeat_interleave`` 2x, ``CosmosDownsample3d``'s 2x2 average pool | local | row groups never straddle ranks: shards start on latent rows |
| resnet / down / mid / up blocks, ``CosmosConvProjection3d``, encoder, decoder, ``CosmosCausalGroupNorm``, ``nn.ModuleList`` | containers | they route tensors |
| SiLU, dropout, ``nn.Identity`` | local | |

Latents: the encoder is deterministic (``IdentityDistribution``): ``encode`` returns the latents. Pipelines decode
``z * latents_std / sigma_data + latents_mean`` with per-(channel, frame) statistics and the scheduler's
``sigma_data`` (0.5 in the Cosmos pipelines).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders import autoencoder_kl_cosmos as cos

from ..core.attention import sharded_sdpa
from ..core.halo import _conv, halo_for_conv
from ..core.norm import ShardedGroupNorm
from ..core.plan import SpatialState, Treatment, classify, original_class, sharded_class, unknown_module
from ..layers.cogvideox_conv import HaloBelowPaddedConv
from .base import FamilyAdapter, PointPosterior

__all__ = ["CosmosAdapter", "HaloCosmosConv", "ShardedCosmosAttention", "ADAPTER", "SIGMA_DATA"]

#: the EDM scheduler's ``sigma_data`` the Cosmos pipelines divide by when denormalizing latents
SIGMA_DATA = 0.5


class HaloCosmosConv:
    """``CosmosCausalConv3d`` on row shards: its forward (repeat the first frame ``temporal_pad`` times, zero-pad
    columns), with the rows' zero padding replaced by a halo from the neighbours (zeros at the global edges)."""

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prev = x[:, :, :1, ...].repeat(1, 1, self.temporal_pad, 1, 1)
        x = torch.cat([prev, x], dim=2)
        left, right, top, bottom = self.spatial_pad
        x = F.pad(x, (left, right, 0, 0, 0, 0), mode=self.pad_mode, value=0.0)
        kh, sh, dh = self.kernel_size[-2], self.stride[-2], self.dilation[-2]
        x = halo_for_conv(x, self._pv_state.group, kh, sh, dh, top, bottom)
        return _conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ShardedCosmosAttention:
    """``CosmosCausalAttention`` with the spatial processor on row shards: the processor's steps (group norm, 1x1
    q/k/v, SDPA over each frame's pixels, 1x1 out, dropout, residual) with this rank's queries against every rank's
    keys and values, all-gathered in row order (reduce-scatter backward). The temporal processor runs as it is."""

    _pv_state: SpatialState

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(self.processor, cos.CosmosTemporalAttentionProcessor2_0):
            return super().forward(hidden_states, attention_mask)  # per pixel, over its frames
        if attention_mask is not None:
            raise NotImplementedError("parallel_vae: a mask on Cosmos's spatial attention has no sharded treatment")
        batch, _, frames, rows, width = hidden_states.shape
        residual = hidden_states
        x = self.norm(hidden_states)
        heads = self.num_attention_heads

        def tokens(t: torch.Tensor) -> torch.Tensor:
            # (B, C, T, h, W) -> (B*T, h*W, C) -> (B*T, heads, h*W, C // heads)
            t = t.permute(0, 2, 3, 4, 1).flatten(2, 3).flatten(0, 1)
            return t.unflatten(2, (heads, -1)).transpose(1, 2)

        query, key, value = tokens(self.to_q(x)), tokens(self.to_k(x)), tokens(self.to_v(x))
        out = sharded_sdpa(query, key, value, self._pv_state.group, self._pv_state.level_sizes(rows * width))
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = out.unflatten(1, (rows, width)).unflatten(0, (batch, frames)).permute(0, 4, 1, 2, 3)
        out = self.to_out[1](self.to_out[0](out))
        return out + residual


_CONTAINERS = (
    nn.ModuleList,
    cos.CosmosEncoder3d,
    cos.CosmosDecoder3d,
    cos.CosmosDownBlock3d,
    cos.CosmosMidBlock3d,
    cos.CosmosUpBlock3d,
    cos.CosmosResnetBlock3d,
    cos.CosmosConvProjection3d,
    cos.CosmosCausalGroupNorm,  # its nn.GroupNorm is classified on its own
    cos.CosmosDownsample3d,  # pad + conv1 (below) + 2x2 pool, then the time convs
    cos.CosmosUpsample3d,  # repeat_interleave, conv2 (a halo conv), conv3
)
_LOCAL = (cos.CosmosPatchEmbed3d, cos.CosmosUnpatcher3d, nn.SiLU, nn.Dropout, nn.Identity)


def _conv_treatment(name: str, m: nn.Module, parent) -> Optional[Treatment]:
    kh, sh, dh = m.kernel_size[1], m.stride[1], m.dilation[1]
    left, right, top, bottom = m.spatial_pad
    if m.pad_mode != "constant" or tuple(m.padding) != (0, 0, 0) or left != right or top != bottom:
        raise unknown_module(name, m, f"pad_mode {m.pad_mode!r}, spatial_pad {m.spatial_pad!r}, padding {m.padding!r}")
    if kh == 1 and sh == 1 and top == 0:
        return None  # one row of kernel: per pixel (the 3x1x1 time convs too)
    if kh == 2 * top + 1 and sh == 1 and dh == 1:
        return Treatment(name, sharded_class(HaloCosmosConv, cos.CosmosCausalConv3d), f"{kh}-row conv: halo rows")
    if (
        isinstance(parent, cos.CosmosDownsample3d) and parent.conv1 is m and (kh, sh, dh, top) == (3, 2, 1, 0)
        and m.temporal_pad == 0
    ):
        why = "stride-2 conv after the downsampler's bottom zero row: that row from the rank below"
        return Treatment(name, sharded_class(HaloBelowPaddedConv, cos.CosmosCausalConv3d), why)
    raise unknown_module(name, m, f"row kernel {kh}, stride {sh}, dilation {dh}, row padding {top}")


def _treat(name: str, m: nn.Module, parents: dict) -> Optional[Treatment]:
    cls = original_class(m)
    parent = parents.get(id(m))
    if cls is cos.CosmosCausalConv3d:
        return _conv_treatment(name, m, parent)
    if cls is nn.GroupNorm:
        if not isinstance(parent, cos.CosmosCausalGroupNorm):
            raise unknown_module(name, m)
        return Treatment(name, sharded_class(ShardedGroupNorm, cls), "GroupNorm: statistics merged over all rows")
    if cls is cos.CosmosCausalAttention:
        if isinstance(m.processor, cos.CosmosTemporalAttentionProcessor2_0):
            return None  # over each pixel's frames: local
        if type(m.processor) is not cos.CosmosSpatialAttentionProcessor2_0:
            raise unknown_module(name, m, f"processor {type(m.processor).__name__}")
        why = "attention over each frame's pixels: own queries, gathered keys/values"
        return Treatment(name, sharded_class(ShardedCosmosAttention, cls), why)
    raise unknown_module(name, m)


class CosmosAdapter(FamilyAdapter):
    name = "cosmos"
    model_class = cos.AutoencoderKLCosmos
    video = True
    uses_latent_stats = True
    deterministic = True

    def plan(self, vae):
        self.spatial_factor(vae)
        if vae.config.patch_type != "haar" and vae.config.patch_type != "rearrange":
            raise NotImplementedError(f"AutoencoderKLCosmos: patch_type {vae.config.patch_type!r}")
        return classify(vae, _CONTAINERS, _LOCAL, _treat)

    def spatial_factor(self, vae) -> int:
        """``patch_size`` x 2 ** (spatial downsamplers): 8 in the default config, checked against the decoder's
        spatial upsamplers and ``spatial_compression_ratio``."""
        p = int(vae.config.patch_size)
        down = sum(1 for m in vae.encoder.modules() if isinstance(m, cos.CosmosDownsample3d) and m.spatial_downsample)
        up = sum(1 for m in vae.decoder.modules() if isinstance(m, cos.CosmosUpsample3d) and m.spatial_upsample)
        factor = p * 2**down
        if down != up or factor != int(vae.config.spatial_compression_ratio):
            raise NotImplementedError(
                f"AutoencoderKLCosmos: patch {p} x {down} downsamplers ({up} upsamplers) against "
                f"spatial_compression_ratio {vae.config.spatial_compression_ratio}; parallel_vae cannot derive its "
                "rows per latent row"
            )
        return factor

    def latent_channels(self, vae) -> int:
        return int(vae.config.latent_channels)

    def posterior_of(self, encoded):
        return PointPosterior(encoded.latent_dist.mode())

    def _stats(self, vae, z):
        c, t = z.shape[1], z.shape[2]
        mean = torch.tensor(vae.config.latents_mean, dtype=z.dtype, device=z.device).view(1, c, -1, 1, 1)[:, :, :t]
        std = torch.tensor(vae.config.latents_std, dtype=z.dtype, device=z.device).view(1, c, -1, 1, 1)[:, :, :t]
        return mean, std

    def denormalize(self, vae, z):
        """The Cosmos pipelines' ``z * latents_std / sigma_data + latents_mean`` (per channel and latent frame)."""
        if vae.config.latents_mean is None:
            return z / SIGMA_DATA
        mean, std = self._stats(vae, z)
        return z * std / SIGMA_DATA + mean

    def normalize(self, vae, z):
        if vae.config.latents_mean is None:
            return z * SIGMA_DATA
        mean, std = self._stats(vae, z)
        return (z - mean) * SIGMA_DATA / std


ADAPTER = CosmosAdapter()

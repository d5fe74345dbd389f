"""The HunyuanImage-2.1 refiner wiring: diffusers ``AutoencoderKLHunyuanImageRefiner`` (5-D clips, 16x spatial).

HunyuanVideo-1.5's layer kinds (``families/hunyuan_video15.py``) with one difference: the mid-block attention is
over the whole clip without a frame-causal mask. No frame caches: the whole clip goes through every layer at once.

| module | treatment |
| --- | --- |
| ``HunyuanImageRefinerCausalConv3d`` (3x3x3: conv_in/out, resnet conv1/conv2, resampler convs) | ``HaloPadConv``: ``F.pad(time_causal_padding, "replicate")`` then an unpadded conv; one halo row each side, the global top/bottom rank replicates its own edge row as the layer does |
| its inner ``nn.Conv3d`` | ``HaloedInnerConv``: called by the halo forward on rows that already carry the halo |
| ``nn.Conv3d`` 1x1x1 (attention to_q/k/v/proj_out, resnet conv_shortcut) | local |
| ``HunyuanImageRefinerAttnBlock`` (encoder and decoder mid block) | ``ShardedClipAttention``: single-head attention over every (frame, row, column) token of the clip: own queries against the all-gathered keys/values of the whole clip |
| ``HunyuanImageRefinerDownsampleDCAE`` / ``HunyuanImageRefinerUpsampleDCAE`` (2x2 pixel (un)shuffle, channel average / repeat shortcut) | local (their conv is treated above): shards start on a multiple of the remaining downsampling factor |
| ``HunyuanImageRefinerRMS_norm`` (``F.normalize`` over channels), SiLU | local |
| encoder / decoder / mid / down / up / resnet blocks | containers (the encoder's channel-group mean and the decoder's channel repeat shortcuts are per pixel) |

Frames: in diffusers 0.42.1 the resamplers' "temporal" branch rearranges with ``r1=1`` (it duplicates or halves
channels instead), so the model keeps every frame: T pixel frames <-> T latent frames, whatever
``temporal_compression_ratio`` (4) says. parallel_vae follows the code (``temporal_factor`` 1).

Pipelines (``HunyuanImageRefinerPipeline``) scale latents by ``config.scaling_factor`` only (no shift).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders import autoencoder_kl_hunyuanimage_refiner as hr

from ..core.attention import fan_out, start_kv_gather
from ..core.comm import overlap_enabled
from ..core.plan import SpatialState, Treatment, classify, original_class, sharded_class, unknown_module
from ..layers.pad_conv import HaloedInnerConv, HaloPadConv
from .base import FamilyAdapter, ScalingFactorLatents

__all__ = ["HunyuanImageRefinerAdapter", "ShardedClipAttention", "ADAPTER"]


class ShardedClipAttention:
    """``HunyuanImageRefinerAttnBlock`` on row shards: channel RMS norm, 1x1x1 q/k/v convs, single-head attention
    of my tokens (my rows of every frame) against the keys/values of every token of the clip, gathered per frame in
    rank order so that they come in diffusers' (frame, row, column) order; 1x1x1 ``proj_out``, residual. The
    gather's backward reduce-scatters the key/value gradients to their owners."""

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        x = self.norm(x)
        x_q, x_k, x_v = fan_out(x, 3)  # the gradient's grouping of the query-first order (core/attention.py)
        key, value = self.to_k(x_k), self.to_v(x_v)
        b, c, t, h, w = key.shape
        # (b, c, t, h_r, w) -> (b, 1, t * h_r * w, c), as diffusers orders its tokens
        tokens = lambda y: y.reshape(b, c, t * h * w).permute(0, 2, 1).unsqueeze(1).contiguous()  # noqa: E731
        state = self._pv_state
        pending = start_kv_gather(tokens(key), tokens(value), state.group, state.level_sizes(h * w), t)
        if not overlap_enabled():
            pending.wait()
        q = tokens(self.to_q(x_q))
        kv = pending.wait()  # (b, 1, t, h * w, 2c): every frame's positions in rank (= row) order
        k, v = kv.reshape(b, 1, -1, 2 * c).split([c, c], -1)
        out = F.scaled_dot_product_attention(q, k, v)
        # (b, 1, t * h_r * w, c) -> (b, c, t, h_r, w)
        out = out.squeeze(1).reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        return self.proj_out(out) + identity


_LOCAL = (
    hr.HunyuanImageRefinerRMS_norm,  # F.normalize over channels: never rows
    hr.HunyuanImageRefinerDownsampleDCAE,  # pixel unshuffle of row pairs + channel average; its conv apart
    hr.HunyuanImageRefinerUpsampleDCAE,  # pixel shuffle (row j <- row j // 2) + channel repeat; its conv likewise
    nn.SiLU,
)
_CONTAINERS = (
    nn.ModuleList,
    hr.HunyuanImageRefinerEncoder3D,
    hr.HunyuanImageRefinerDecoder3D,
    hr.HunyuanImageRefinerMidBlock,
    hr.HunyuanImageRefinerDownBlock3D,
    hr.HunyuanImageRefinerUpBlock3D,
    hr.HunyuanImageRefinerResnetBlock,
)
_PAD_MODES = ("replicate", "constant")  # edge rows from the edge row alone


def _treat(name: str, m: nn.Module, parents: dict) -> Optional[Treatment]:
    cls = original_class(m)
    parent = parents.get(id(m))
    if cls is hr.HunyuanImageRefinerAttnBlock:
        return Treatment(name, sharded_class(ShardedClipAttention, cls), "attention over the clip: gathered keys/values")
    if cls is hr.HunyuanImageRefinerCausalConv3d:
        conv = m.conv
        ht, hb = m.time_causal_padding[2], m.time_causal_padding[3]
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.stride[1] != 1:
            raise unknown_module(name, m, f"inner conv padding {conv.padding!r} / {conv.padding_mode!r}, stride {conv.stride}")
        if m.pad_mode not in _PAD_MODES:
            raise unknown_module(name, m, f"pad_mode {m.pad_mode!r}")
        if conv.kernel_size[1] == 1 and ht == hb == conv.padding[1] == 0:
            return None  # no row reach
        why = f"{conv.kernel_size[1]}-row causal conv: halo rows, {m.pad_mode} at the global edges"
        return Treatment(name, sharded_class(HaloPadConv, cls), why)
    if cls is nn.Conv3d:
        if parent is not None and original_class(parent) is hr.HunyuanImageRefinerCausalConv3d:
            if _treat(name.rpartition(".")[0], parent, parents) is None:
                return None
            return Treatment(name, sharded_class(HaloedInnerConv, cls), "inner conv of a halo conv: rows arrive haloed")
        if tuple(m.kernel_size) == (1, 1, 1) and tuple(m.stride) == (1, 1, 1) and tuple(m.padding) == (0, 0, 0):
            return None  # 1x1x1: per pixel
    raise unknown_module(name, m)


def _resamplers(vae: nn.Module, cls: type) -> list:
    return [m for m in vae.modules() if original_class(m) is cls]


class HunyuanImageRefinerAdapter(ScalingFactorLatents, FamilyAdapter):
    name = "hunyuanimage_refiner"
    model_class = hr.AutoencoderKLHunyuanImageRefiner
    video = True
    decode_returns_output = False  # its _decode(z) returns the tensor

    def plan(self, vae):
        self.spatial_factor(vae)
        return classify(vae, _CONTAINERS, _LOCAL, _treat)

    def spatial_factor(self, vae) -> int:
        """2 ** (number of encoder downsamplers) (16 in the released config), checked against the decoder's
        upsamplers and ``spatial_compression_ratio``."""
        down = len(_resamplers(vae.encoder, hr.HunyuanImageRefinerDownsampleDCAE))
        up = len(_resamplers(vae.decoder, hr.HunyuanImageRefinerUpsampleDCAE))
        factor = 2**down
        if up != down or factor != vae.config.spatial_compression_ratio:
            raise NotImplementedError(
                f"{type(vae).__name__}: {down} spatial downsamplers, {up} upsamplers and spatial_compression_ratio "
                f"{vae.config.spatial_compression_ratio} disagree; parallel_vae cannot derive its rows per latent row"
            )
        return factor

    def latent_channels(self, vae) -> int:
        return int(vae.config.latent_channels)

    def temporal_factor(self, vae) -> int:
        """1: diffusers' resamplers keep every frame (see the module docstring)."""
        return 1

    def check_frames(self, vae, frames: int, latent: bool):
        return None if frames >= 1 else f"{'decode' if latent else 'encode'} needs at least 1 frame, got {frames}"



ADAPTER = HunyuanImageRefinerAdapter()

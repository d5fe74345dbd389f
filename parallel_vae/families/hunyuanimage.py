"""The HunyuanImage-2.1 wiring: diffusers ``AutoencoderKLHunyuanImage`` (2-D images, 32x spatial compression).

An image VAE in DC-AE style: plain 3x3 ``nn.Conv2d`` (zero padding), GroupNorms of 32 groups, a single-head
attention in each mid block, and resamplers that are a conv followed by a 2x2 pixel (un)shuffle with a
parameter-free channel average / repeat shortcut. The whole image goes through every layer at once.

| module | treatment |
| --- | --- |
| ``nn.Conv2d`` 3x3 (conv_in/out, resnet conv1/conv2, the resamplers' convs) | ``HaloConv``: one halo row each side, zeros at the global edges |
| ``nn.Conv2d`` 1x1 (conv_shortcut, attention to_q/k/v/proj) | local |
| ``nn.GroupNorm`` (resnet norms, attention norm, norm_out) | ``ShardedGroupNorm``: count/mean/M2 merged over the group |
| ``HunyuanImageAttentionBlock`` (encoder and decoder mid block) | ``ShardedImageAttention``: own queries against all-gathered keys/values |
| ``HunyuanImageDownsample`` / ``HunyuanImageUpsample`` (2x2 pixel (un)shuffle + channel average / repeat) | local (their conv is treated above): output row j reads rows 2j, 2j+1 (down) or j // 2 (up), and every shard starts on a multiple of the remaining downsampling factor |
| SiLU | local |
| encoder / decoder / mid / resnet blocks | containers: the encoder's output shortcut (a mean over channel groups) and the decoder's input shortcut (a channel repeat) are per pixel |

Pipelines (``HunyuanImagePipeline``) divide latents by ``config.scaling_factor`` before decoding (no shift).
diffusers has no activation checkpointing for this class (``_supports_gradient_checkpointing = False``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from diffusers.models.autoencoders import autoencoder_kl_hunyuanimage as hi

from ..core.attention import fan_out, start_kv_gather
from ..core.comm import overlap_enabled
from ..core.halo import conv_treatment
from ..core.norm import ShardedGroupNorm
from ..core.plan import SpatialState, Treatment, classify, original_class, sharded_class, unknown_module
from .base import FamilyAdapter, ScalingFactorLatents

__all__ = ["HunyuanImageAdapter", "ShardedImageAttention", "ADAPTER"]


class ShardedImageAttention:
    """A single-head attention block over the pixels of an image (``HunyuanImageAttentionBlock``) on row shards:
    GroupNorm (statistics merged over the group), 1x1 q/k/v convs of my rows, SDPA of my queries against the
    all-gathered keys/values of the whole image (tokens in row-major order, so rank order is diffusers' token
    order), 1x1 ``proj``, residual. The gather's backward reduce-scatters the key/value gradients to their owners."""

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        x = self.norm(x)
        # keys and values first: their gather travels while this rank projects its queries (core.comm.set_overlap)
        x_q, x_k, x_v = fan_out(x, 3)  # the gradient's grouping of the query-first order (core/attention.py)
        key, value = self.to_k(x_k), self.to_v(x_v)
        b, c, h, w = key.shape
        # (b, c, h_r, w) -> (b, h_r * w, c), diffusers' permute(0, 2, 3, 1)
        tokens = lambda y: y.permute(0, 2, 3, 1).reshape(b, h * w, c).contiguous()  # noqa: E731
        state = self._pv_state
        pending = start_kv_gather(tokens(key), tokens(value), state.group, state.level_sizes(h * w))
        if not overlap_enabled():
            pending.wait()
        out = pending.attend(tokens(self.to_q(x_q)))
        # (b, h_r * w, c) -> (b, c, h_r, w)
        out = out.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return self.proj(out) + identity


_LOCAL = (
    hi.HunyuanImageDownsample,  # pixel unshuffle of 2x2 blocks + channel average; its conv is classified apart
    hi.HunyuanImageUpsample,  # pixel shuffle (row j <- row j // 2) + channel repeat; its conv likewise
    nn.SiLU,
)
_CONTAINERS = (
    nn.ModuleList,
    hi.HunyuanImageEncoder2D,
    hi.HunyuanImageDecoder2D,
    hi.HunyuanImageMidBlock,
    hi.HunyuanImageResnetBlock,
)


def _treat(name: str, m: nn.Module, parents: dict) -> Optional[Treatment]:
    cls = original_class(m)
    if cls is nn.GroupNorm:
        return Treatment(name, sharded_class(ShardedGroupNorm, cls), "GroupNorm: statistics merged over all rows")
    if cls is hi.HunyuanImageAttentionBlock:
        return Treatment(name, sharded_class(ShardedImageAttention, cls), "attention: own queries, gathered keys/values")
    if cls is nn.Conv2d:
        if m.stride[-2] != 1:
            raise unknown_module(name, m, f"row stride {m.stride[-2]}")
        return conv_treatment(name, m)
    raise unknown_module(name, m)


def _count(vae: nn.Module, cls: type) -> int:
    return sum(original_class(m) is cls for m in vae.modules())


class HunyuanImageAdapter(ScalingFactorLatents, FamilyAdapter):
    name = "hunyuanimage"
    model_class = hi.AutoencoderKLHunyuanImage
    video = False

    def plan(self, vae):
        self.spatial_factor(vae)  # a layout whose resamplers disagree with its config is refused here
        return classify(vae, _CONTAINERS, _LOCAL, _treat)

    def spatial_factor(self, vae) -> int:
        """2 ** (number of encoder downsamplers): 32 in the released config, checked against the decoder's
        upsamplers and ``spatial_compression_ratio``."""
        down = _count(vae.encoder, hi.HunyuanImageDownsample)
        up = _count(vae.decoder, hi.HunyuanImageUpsample)
        factor = 2**down
        ratio = vae.config.spatial_compression_ratio
        if up != down or factor != ratio or not math.log2(ratio).is_integer():
            raise NotImplementedError(
                f"{type(vae).__name__}: {down} downsamplers, {up} upsamplers and spatial_compression_ratio {ratio} "
                f"disagree; parallel_vae cannot derive its rows per latent row"
            )
        return factor

    def latent_channels(self, vae) -> int:
        return int(vae.config.latent_channels)



ADAPTER = HunyuanImageAdapter()

"""The HunyuanVideo-1.5 wiring: which module of a diffusers ``AutoencoderKLHunyuanVideo15`` gets which treatment.

A causal 3-D VAE without frame caches (the whole clip goes through every layer at once), 16x spatial and 4x temporal
compression in DC-AE style: every resampler is a conv followed by a pixel (un)shuffle rearrange plus a
parameter-free channel average / repeat shortcut, with the first frame taking its own path (no temporal factor).

| module | treatment | why |
| --- | --- | --- |
| ``HunyuanVideo15CausalConv3d`` (3x3x3: conv_in/out, resnet conv1/conv2, resampler convs) | ``HaloPadConv`` | ``F.pad(time_causal_padding, "replicate")`` then an unpadded conv: one halo row each side; the global top/bottom rank replicates its own edge row, as the layer does |
| its inner ``nn.Conv3d`` | ``HaloedInnerConv`` | called (not read: hooks on it run) by the halo forward above on rows that already carry the halo, so no row padding of its own |
| ``nn.Conv3d`` 1x1x1 (attention to_q/k/v/proj_out, resnet conv_shortcut) | local | per pixel |
| ``HunyuanVideo15AttnBlock`` (encoder and decoder mid block) | ``ShardedCausalFrameAttention`` | single-head attention over the whole clip with a frame-causal mask: own queries against the all-gathered keys/values of frames <= t (``frame_causal_sdpa``), no mask built |
| ``HunyuanVideo15Downsample`` / ``HunyuanVideo15Upsample`` (pixel (un)shuffle by 2 in rows and columns, first frame apart; channel average / repeat shortcut) | local (their conv is treated above) | output row j reads input rows 2j, 2j+1 (down) or j // 2 (up): local because every shard starts on a multiple of the remaining downsampling factor (shards are split in latent rows); the first-frame path splits time, not rows |
| ``HunyuanVideo15RMS_norm`` (``F.normalize`` over channels), SiLU | local | per pixel |
| encoder / decoder / mid / down / up / resnet blocks | containers | their own forwards only route tensors, plus channel-group means (encoder output shortcut) and channel repeats (decoder input shortcut), which are per pixel |

Batches: diffusers' own ``HunyuanVideo15AttnBlock`` cannot run a batch of more than one (diffusers 0.42.1: its
(B, S, S) mask broadcasts against the head dim of the (B, 1, S, C) queries, and SDPA raises "output with shape
[B, 1, S, S] doesn't match the broadcast shape [B, B, S, S]"); with ``enable_slicing()`` it runs one sample at a
time. The sharded block attends per sample, so the parallel model returns, for a batch, what the unmodified model
returns with slicing (the tests compare against that).

Pipelines (``HunyuanVideo15Pipeline``, image-to-video) scale latents by ``config.scaling_factor`` only (no shift):
``normalize`` is ``z * scaling_factor``, ``denormalize`` ``z / scaling_factor``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.autoencoders import autoencoder_kl_hunyuanvideo15 as hv15

from ..core.attention import fan_out, start_kv_gather
from ..core.comm import overlap_enabled
from ..layers.pad_conv import HaloedInnerConv, HaloPadConv
from ..core.plan import SpatialState, Treatment, classify, original_class, sharded_class, unknown_module
from .base import FamilyAdapter, ScalingFactorLatents

__all__ = ["HunyuanVideo15Adapter", "ShardedCausalFrameAttention", "ADAPTER"]


class ShardedCausalFrameAttention:
    """``HunyuanVideo15AttnBlock`` on row shards: channel RMS norm, 1x1x1 q/k/v convs, single-head attention over
    all (frame, row, column) tokens of the clip where a query of frame t sees the keys of frames <= t, a 1x1x1
    ``proj_out``, residual.

    diffusers builds a (T*H*W)^2 additive mask in its forward; here each rank's queries (its own rows of every frame)
    attend, one query frame at a time, to the all-gathered keys/values of frames 0..t with no mask
    (:func:`frame_causal_sdpa`), so the peak is (H_r*W) x ((t + 1)*H*W) scores. The gather's backward
    reduce-scatters the key/value gradients to their owners.
    """

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        x = self.norm(x)
        # Keys and values first: their gather travels while this rank projects its queries (core.comm.set_overlap).
        x_q, x_k, x_v = fan_out(x, 3)  # the gradient's grouping of the query-first order (core/attention.py)
        key, value = self.to_k(x_k), self.to_v(x_v)
        b, c, t, h, w = key.shape
        # (b, c, t, h_r, w) -> (b, 1, t * h_r * w, c): tokens ordered (frame, my rows, columns), as diffusers orders
        # (frame, rows, columns), so gathering each frame's positions in rank order gives diffusers' token order.
        tokens = lambda y: y.reshape(b, c, t * h * w).permute(0, 2, 1).unsqueeze(1).contiguous()  # noqa: E731
        state = self._pv_state
        pending = start_kv_gather(tokens(key), tokens(value), state.group, state.level_sizes(h * w), t)
        if not overlap_enabled():
            pending.wait()
        x = pending.attend(tokens(self.to_q(x_q)))
        # (b, 1, t * h_r * w, c) -> (b, c, t, h_r, w)
        x = x.squeeze(1).reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        x = self.proj_out(x)
        return x + identity


# Per pixel (or within the 2x2 row blocks that aligned shards keep together): no change.
_LOCAL = (
    hv15.HunyuanVideo15RMS_norm,  # F.normalize over channels (dim 1) or the last dim (columns): never rows
    hv15.HunyuanVideo15Downsample,  # pixel unshuffle of row pairs + channel average; its conv is classified apart
    hv15.HunyuanVideo15Upsample,  # pixel shuffle (row j <- row j // 2) + channel repeat; its conv likewise
    nn.SiLU,
)
# Forwards that only route tensors to children (plus per-pixel channel means / repeats).
_CONTAINERS = (
    nn.ModuleList,
    hv15.HunyuanVideo15Encoder3D,
    hv15.HunyuanVideo15Decoder3D,
    hv15.HunyuanVideo15MidBlock,
    hv15.HunyuanVideo15DownBlock3D,
    hv15.HunyuanVideo15UpBlock3D,
    hv15.HunyuanVideo15ResnetBlock,
)
# Edge paddings whose rows come from the edge row alone (reflect would need n + 1 rows of the edge shard).
_PAD_MODES = ("replicate", "constant")


def _treat(name: str, m: nn.Module, parents: dict) -> Treatment | None:
    cls = original_class(m)
    parent = parents.get(id(m))
    if cls is hv15.HunyuanVideo15AttnBlock:
        mixin = sharded_class(ShardedCausalFrameAttention, cls)
        return Treatment(name, mixin, "frame-causal attention: own queries, gathered keys/values")
    if cls is hv15.HunyuanVideo15CausalConv3d:
        conv = m.conv
        ht, hb = m.time_causal_padding[2], m.time_causal_padding[3]
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise unknown_module(name, m, f"inner conv padding {conv.padding!r} / {conv.padding_mode!r}")
        if conv.stride[1] != 1:
            raise unknown_module(name, m, f"row stride {conv.stride[1]}")
        if m.pad_mode not in _PAD_MODES:
            raise unknown_module(name, m, f"pad_mode {m.pad_mode!r}")
        if conv.kernel_size[1] == 1 and ht == hb == conv.padding[1] == 0:
            return None  # no row reach: time/width padding only
        why = f"{conv.kernel_size[1]}-row causal conv: halo rows, {m.pad_mode} at the global edges"
        return Treatment(name, sharded_class(HaloPadConv, cls), why)
    if cls is nn.Conv3d:
        if parent is not None and original_class(parent) is hv15.HunyuanVideo15CausalConv3d:
            if _treat(name.rpartition(".")[0], parent, parents) is None:
                return None  # the body of a causal conv with no row reach
            return Treatment(name, sharded_class(HaloedInnerConv, cls), "inner conv of a halo conv: rows arrive haloed")
        if tuple(m.kernel_size) == (1, 1, 1) and tuple(m.stride) == (1, 1, 1) and tuple(m.padding) == (0, 0, 0):
            return None  # 1x1x1: per pixel
    raise unknown_module(name, m)


def _resamplers(vae: nn.Module, cls: type) -> list[nn.Module]:
    return [m for m in vae.modules() if original_class(m) is cls]


class HunyuanVideo15Adapter(ScalingFactorLatents, FamilyAdapter):
    name = "hunyuanvideo15"
    model_class = hv15.AutoencoderKLHunyuanVideo15
    video = True
    decode_returns_output = False  # its _decode(z) returns the tensor

    def plan(self, vae):
        self.spatial_factor(vae)  # a layout whose resamplers disagree with its config is refused here
        return classify(vae, _CONTAINERS, _LOCAL, _treat)

    def spatial_factor(self, vae) -> int:
        """2 ** (number of encoder downsamplers): every ``HunyuanVideo15Downsample`` halves rows and columns
        (16 in the released config); checked against the decoder's upsamplers and ``spatial_compression_ratio``."""
        down = len(_resamplers(vae.encoder, hv15.HunyuanVideo15Downsample))
        up = len(_resamplers(vae.decoder, hv15.HunyuanVideo15Upsample))
        factor = 2**down
        if up != down or factor != vae.config.spatial_compression_ratio:
            raise NotImplementedError(
                f"{type(vae).__name__}: {down} spatial downsamplers, {up} upsamplers and spatial_compression_ratio "
                f"{vae.config.spatial_compression_ratio} disagree; parallel_vae cannot derive its rows per latent row"
            )
        return factor

    def latent_channels(self, vae) -> int:
        return int(vae.config.latent_channels)

    def _temporal_factor(self, vae) -> int:
        """2 ** (number of encoder downsamplers that also halve time): 4 in the released config."""
        return 2 ** sum(m.add_temporal_downsample for m in _resamplers(vae.encoder, hv15.HunyuanVideo15Downsample))

    def check_frames(self, vae, frames: int, latent: bool):
        if latent:
            return None if frames >= 1 else f"decode needs at least 1 latent frame, got {frames}"
        k = self._temporal_factor(vae)
        # Each temporal downsampler keeps frame 0 and halves the rest in pairs, so frames - 1 must divide by k.
        if frames < 1 or (frames - 1) % k:
            return (
                f"HunyuanVideo-1.5 encodes 1 + {k}n pixel frames (1, {1 + k}, {1 + 2 * k}, ...), got {frames} "
                f"(its temporal downsamplers keep the first frame and pair up the rest)"
            )
        return None



ADAPTER = HunyuanVideo15Adapter()

"""The HunyuanVideo wiring: which module of a diffusers ``AutoencoderKLHunyuanVideo`` gets which treatment, and why.

diffusers' own ``_encode`` / ``_decode`` run unchanged on each rank's rows, including the framewise (temporal tiled)
encode and decode that are on by default: time is never split, so every temporal tile is the same tile on every
rank, cut from that rank's rows.

| module | treatment | why |
| --- | --- | --- |
| ``HunyuanVideoCausalConv3d`` with a kernel of more than one row (conv_in/out, resnet conv1/conv2, up/downsample convs) | ``HaloPadConv`` | ``F.pad(x, time_causal_padding, mode="replicate")`` then ``self.conv``: the row part of the pad becomes a halo; the edge ranks replicate their own edge row, as the layer does |
| the inner ``nn.Conv3d`` of such a conv | ``HaloedInnerConv`` | ``HaloPadConv`` calls it on the haloed rows, so it adds no row padding; called, not read, so hooks on it run |
| ``HunyuanVideoCausalConv3d`` with a 1-row kernel (resnet ``conv_shortcut``) and its inner conv | local | 1x1x1, no padding |
| ``HunyuanVideoDownsampleCausal3D`` (replicate pad 1 + 3-row stride-2 conv, ``padding=0`` in the encoder) | routes to its conv (``HaloPadConv``) | ``conv_halo(3, 2, 1, 1, 1)`` = one row from above, none from below; shards start on even rows at every level |
| ``HunyuanVideoUpsampleCausal3D`` (nearest 2x of the first frame in 2-D, of the rest in 3-D, then its conv) | the resize is local; the conv gets ``HaloPadConv`` | nearest by an integer factor: output row j reads input row j // 2 of the same shard |
| ``nn.GroupNorm`` (resnet norms, conv_norm_out, the attention's group norm) | ``ShardedGroupNorm`` | statistics over all rows: count/mean/M2 merged over the group (Chan) |
| ``HunyuanVideoMidBlock3D`` | ``ShardedHunyuanMidBlock`` | diffusers builds a (T*H*W)^2 frame-causal mask; here the attention is told the frame count instead and builds none |
| ``Attention`` (mid blocks only: one head over every pixel of the clip, frame-causal) | ``ShardedAttention`` with ``frames=T`` | own queries against all-gathered keys/values, one SDPA call per query frame over frames <= t |
| resnet blocks, down/up blocks, encoder/decoder, ``nn.ModuleList`` | containers | they only route tensors to the modules above |
| 1x1x1 ``quant_conv`` / ``post_quant_conv``, linear q/k/v/out, SiLU (and other pointwise activations), dropout | local | per pixel |
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders import autoencoder_kl_hunyuan_video as hv

from ..core.attention import ShardedAttention, check_pixel_attention
from ..layers.pad_conv import HaloedInnerConv, HaloPadConv
from ..core.norm import ShardedGroupNorm
from ..core.plan import SpatialState, Treatment, classify, original_class, sharded_class, unknown_module
from .base import FamilyAdapter, scaling_shift_normalization, temporal_tiles

__all__ = ["HunyuanVideoAdapter", "ShardedHunyuanMidBlock", "hunyuan_video_treatment", "ADAPTER"]


class ShardedHunyuanMidBlock:
    """``HunyuanVideoMidBlock3D`` on row shards: diffusers' forward (both its gradient-checkpointing branch and the
    plain one), except that the attention receives ``frames=T`` and no mask.

    diffusers passes ``prepare_causal_attention_mask(T, H * W)``: a (T H W)^2 matrix, 0 where the key's frame is at
    most the query's and -inf elsewhere. ``ShardedAttention(frames=T)`` computes exactly that attention (the masked
    keys' weights are exp(-inf) = 0) by attending each query frame to the keys of frames <= t, so neither the mask
    nor a score matrix over all tokens is ever built.
    """

    _pv_state: SpatialState

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        checkpointed = torch.is_grad_enabled() and self.gradient_checkpointing

        def resnet_call(resnet, x):
            return self._gradient_checkpointing_func(resnet, x) if checkpointed else resnet(x)

        hidden_states = resnet_call(self.resnets[0], hidden_states)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                b, c, frames, rows, width = hidden_states.shape
                # (B, C, T, h_r, W) -> (B, T * h_r * W, C): tokens ordered (frame, my positions), as the mask's
                # frame blocks and frame_causal_sdpa expect
                hidden_states = hidden_states.permute(0, 2, 3, 4, 1).flatten(1, 3)
                hidden_states = attn(hidden_states, frames=frames)
                # (B, T * h_r * W, C) -> (B, C, T, h_r, W)
                hidden_states = hidden_states.unflatten(1, (frames, rows, width)).permute(0, 4, 1, 2, 3)
            hidden_states = resnet_call(resnet, hidden_states)
        return hidden_states


# Modules whose own forward only routes tensors to children (the children are classified).
_CONTAINERS = (
    nn.ModuleList,
    hv.HunyuanVideoEncoder3D,
    hv.HunyuanVideoDecoder3D,
    hv.HunyuanVideoDownBlock3D,
    hv.HunyuanVideoUpBlock3D,
    hv.HunyuanVideoResnetBlockCausal3D,
    hv.HunyuanVideoDownsampleCausal3D,  # forward is self.conv(x)
)
# Per pixel: no change. (get_activation returns one of these for the resnets' non_linearity.)
_LOCAL = (nn.SiLU, nn.Mish, nn.GELU, nn.ReLU, nn.Dropout, nn.Identity, nn.Linear)

_PAD_MODES = ("replicate", "constant", "reflect")


def _causal_conv(name: str, m: nn.Module) -> Optional[Treatment]:
    conv = m.conv
    if type(conv) is not nn.Conv3d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise unknown_module(name, m, "its inner conv is not a zero-padded nn.Conv3d")
    if m.pad_mode not in _PAD_MODES:
        raise unknown_module(name, m, f"pad_mode {m.pad_mode!r}")
    top, bottom = m.time_causal_padding[2], m.time_causal_padding[3]
    kh, sh, ph = conv.kernel_size[1], conv.stride[1], conv.padding[1]
    if kh == 1 and sh == 1 and top == bottom == ph == 0:
        return None  # 1x1x1 (conv_shortcut): local
    why = f"{kh}-row causal conv (stride {sh}): halo rows, the layer's own pad at the global edges"
    return Treatment(name, sharded_class(HaloPadConv, original_class(m)), why)


def _parent_is(parents: dict, m: nn.Module, cls: type, through_list: bool = False) -> bool:
    parent = parents.get(id(m))
    if through_list:
        if original_class(parent) is not nn.ModuleList:
            return False
        parent = parents.get(id(parent))
    return parent is not None and original_class(parent) is cls


def hunyuan_video_treatment(name: str, m: nn.Module, parents: dict) -> Optional[Treatment]:
    """The classification of every non-container, non-local module of ``AutoencoderKLHunyuanVideo``."""
    cls = original_class(m)
    if cls is hv.HunyuanVideoCausalConv3d:
        return _causal_conv(name, m)
    if cls is nn.Conv3d:
        if _parent_is(parents, m, hv.HunyuanVideoCausalConv3d):
            if _causal_conv(name.rpartition(".")[0], parents[id(m)]) is None:
                return None  # the 1x1x1 body of a local causal conv
            return Treatment(name, sharded_class(HaloedInnerConv, cls), "inner conv of a halo conv: rows arrive haloed")
        if m.kernel_size[1] == 1 and m.stride[1] == 1 and not isinstance(m.padding, str) and m.padding[1] == 0:
            return None  # quant_conv / post_quant_conv: 1x1x1
        raise unknown_module(name, m)
    if cls is nn.GroupNorm:
        return Treatment(name, sharded_class(ShardedGroupNorm, cls), "GroupNorm: statistics merged over all rows")
    if cls is hv.HunyuanVideoMidBlock3D:
        return Treatment(name, sharded_class(ShardedHunyuanMidBlock, cls), "mid block: frame-causal attention, no mask")
    if cls is Attention:
        if not _parent_is(parents, m, hv.HunyuanVideoMidBlock3D, through_list=True):
            raise unknown_module(name, m, "attention outside a HunyuanVideo mid block (which passes the frame count)")
        check_pixel_attention(m, name)
        why = "frame-causal attention: own queries, gathered keys/values"
        return Treatment(name, sharded_class(ShardedAttention, cls), why)
    if cls is hv.HunyuanVideoUpsampleCausal3D:
        # forward: F.interpolate(mode="nearest") by upsample_factor (first frame: the spatial factors only)
        factors = tuple(m.upsample_factor)
        if len(factors) != 3 or any(float(f) != int(f) or f < 1 for f in factors):
            raise unknown_module(name, m, f"upsample_factor {factors} (only integer nearest factors are row-local)")
        return None  # local; its conv is classified on its own
    raise unknown_module(name, m)


def _spatial_downsamples(vae) -> int:
    return sum(
        1
        for m in vae.encoder.modules()
        if original_class(m) is hv.HunyuanVideoDownsampleCausal3D and m.conv.conv.stride[1] == 2
    )


def _spatial_upsamples(vae) -> int:
    return sum(
        1
        for m in vae.decoder.modules()
        if original_class(m) is hv.HunyuanVideoUpsampleCausal3D and int(m.upsample_factor[1]) == 2
    )


class HunyuanVideoAdapter(FamilyAdapter):
    name = "hunyuanvideo"
    model_class = hv.AutoencoderKLHunyuanVideo
    video = True

    def plan(self, vae):
        self.spatial_factor(vae)  # refuses a layout whose strides disagree with its config
        return classify(vae, _CONTAINERS, _LOCAL, hunyuan_video_treatment)

    def chunks(self, vae, frames: int, decode: bool) -> int:
        # diffusers' framewise (temporal tiled) path, on by default: more than 16 pixel frames (4 latent) in tiles
        # every 12 pixel frames (3 latent)
        tcr = int(vae.temporal_compression_ratio)
        if decode:
            on, least, stride = vae.use_framewise_decoding, vae.tile_sample_min_num_frames // tcr, vae.tile_sample_stride_num_frames // tcr
        else:
            on, least, stride = vae.use_framewise_encoding, vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames
        return temporal_tiles(frames, least, stride) if on else 1

    def spatial_factor(self, vae) -> int:
        """``spatial_compression_ratio`` (8), checked against the stride-2 downsamples actually built: diffusers
        derives them from log2 of the ratio and the block count, so a ratio the blocks cannot reach would make
        the shards misaligned."""
        ratio = int(vae.config.spatial_compression_ratio)
        down, up = _spatial_downsamples(vae), _spatial_upsamples(vae)
        if 2**down != ratio or 2**up != ratio:
            raise ValueError(
                f"spatial_compression_ratio {ratio} disagrees with the model's {down} stride-2 downsamples and "
                f"{up} 2x upsamples (2**{down} = {2**down}); parallel_vae needs the ratio the layers implement"
            )
        return ratio

    def latent_channels(self, vae) -> int:
        return int(vae.config.latent_channels)

    def check_frames(self, vae, frames: int, latent: bool) -> Optional[str]:
        """diffusers' HunyuanVideo VAE takes any number of frames >= 1 (its causal convs pad time, and it encodes
        T frames to (T - 1) // 4 + 1 latent frames); 1 + 4k frames round-trip to the same count. Time is never
        split, so every count diffusers accepts runs here; only an empty clip is refused."""
        if frames < 1:
            what = "latent" if latent else "pixel"
            return f"{'decode' if latent else 'encode'} needs at least one {what} frame (dim 2), got {frames}"
        return None

    def denormalize(self, vae, z):
        """The HunyuanVideo pipelines decode ``latents / scaling_factor`` (no shift)."""
        scale, shift = scaling_shift_normalization(vae)
        return z / scale + shift

    def normalize(self, vae, z):
        scale, shift = scaling_shift_normalization(vae)
        return (z - shift) * scale


ADAPTER = HunyuanVideoAdapter()

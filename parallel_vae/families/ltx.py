"""The LTX-Video and LTX-2 wiring: which module of a diffusers ``AutoencoderKLLTXVideo`` / ``AutoencoderKLLTX2Video``
gets which treatment, and why.

Both are causal 3-D VAEs without frame caches (the whole clip goes through every layer at once): a 4x4 patchify,
then convolutions, per-pixel RMS norms and depth-to-space / space-to-depth resamplers. There is no attention and no
GroupNorm. Time is never split, so the causal (or symmetric) replicate padding of time, the temporal strides and
diffusers' own framewise (temporal tiled) encode and decode run unchanged on each rank's rows. One adapter class
serves both; the class names differ.

| module | treatment | why |
| --- | --- | --- |
| the ``nn.Conv3d`` inside ``LTXVideoCausalConv3d`` / ``LTX2VideoCausalConv3d`` with a 3-row kernel (conv_in/out, resnet conv1/conv2, resampler convs, LTX-Video's stride-2 ``conv`` downsamplers) | ``HaloConv`` | one halo row each side (stride 2: one from above, none from below); at the global edges the conv's own ``padding_mode``: zeros (LTX-Video, LTX-2's encoder) or reflect (LTX-2's decoder, whose edge shard builds the reflected row from its rows and its halo when it holds a single row) |
| ``LTXVideoCausalConv3d`` / ``LTX2VideoCausalConv3d`` | container | its forward repeats the first (and, non-causal, last) frame in time, then runs its conv |
| 1-row convs (LTX-Video's ``conv_shortcut`` causal conv, LTX-2's plain ``nn.Conv3d`` shortcut) | local | 1x1x1 |
| ``LTX(2)VideoDownsampler3d`` (``spatial`` / ``temporal`` / ``spatiotemporal``: space-to-depth of the conv output plus a space-to-depth channel-mean shortcut) | local (its conv is treated above) | output row j reads rows 2j and 2j+1 of its own shard: every shard starts on a multiple of the remaining downsampling (rows are split in latent rows), so row pairs never straddle ranks; the shortcut is the same rearrangement of the input |
| ``LTX(2)VideoUpsampler3d`` (depth-to-space of the conv output, optional depth-to-space ``residual`` shortcut) | local (its conv is treated above) | output row j reads input row j // 2 |
| encoder patchify / decoder unpatchify (``patch_size`` 4, ``patch_size_t`` 1) | local (in the encoder/decoder forward) | 4 pixel rows per patch row; a latent row is ``spatial_factor`` pixel rows |
| ``RMSNorm`` (LTX-Video, applied channels-last), ``PerChannelRMSNorm`` (LTX-2, ``channel_dim`` 1), the resnet shortcut's ``nn.LayerNorm`` (channels-last, over its channels) | local | per pixel |
| resnet blocks with ``inject_noise`` (decoder, LTX-Video 0.9.1) | ``ShardedNoiseResnet`` | diffusers adds ``torch.randn((H, W))`` over the whole frame; here every rank draws the whole frame's field the same way and keeps its rows of group rank 0's (``layers.ltx_noise.frame_noise``) |
| resnet blocks without noise, down/mid/up blocks, encoder/decoder, ``nn.ModuleList`` | containers | they route tensors; their timestep modulation (``scale_shift_table``) is per channel and sample |
| ``PixArtAlphaCombinedTimestepSizeEmbeddings`` and its ``Timesteps`` / ``TimestepEmbedding`` (``Linear``, SiLU): the timestep conditioning | local | per sample: no rows |
| SiLU, dropout | local | per pixel |

The default configurations: LTX-Video's is the released 0.9.0 VAE (``Lightricks/LTX-Video``): ``conv`` downsamplers,
no timestep conditioning, no noise, zero padding. LTX-2's class default differs from the released LTX-2 VAE in
``decoder_causal`` (True; released False) and in leaving ``spatial_compression_ratio`` unset, which diffusers then
computes as 64 from four ``spatio_temporal_scaling`` entries although one of the four downsamplers is temporal
only: the layers compress 32x. This adapter derives the factor from the layers (32), and refuses a config whose
explicit ratio disagrees with them.

Pipelines normalize LTX latents with the model's ``latents_mean`` / ``latents_std`` buffers and
``scaling_factor``: ``(z - mean) * scaling_factor / std``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from diffusers.models.autoencoders import autoencoder_kl_ltx as ltx
from diffusers.models.autoencoders import autoencoder_kl_ltx2 as ltx2
from diffusers.models.embeddings import PixArtAlphaCombinedTimestepSizeEmbeddings, TimestepEmbedding, Timesteps
from diffusers.models.normalization import RMSNorm

from ..core.halo import HaloConv
from ..layers.ltx_noise import frame_noise
from ..core.plan import SpatialState, Treatment, classify, original_class, sharded_class, unknown_module
from .base import FamilyAdapter, temporal_tiles

__all__ = ["LTXVideoAdapter", "ShardedNoiseResnet", "LTXVIDEO", "LTX2"]

_CAUSAL_CONVS = (ltx.LTXVideoCausalConv3d, ltx2.LTX2VideoCausalConv3d)
_RESNETS = (ltx.LTXVideoResnetBlock3d, ltx2.LTX2VideoResnetBlock3d)
_DOWNSAMPLERS = (ltx.LTXVideoDownsampler3d, ltx2.LTX2VideoDownsampler3d)
_UPSAMPLERS = (ltx.LTXVideoUpsampler3d, ltx2.LTX2VideoUpsampler3d)


class ShardedNoiseResnet:
    """An LTX resnet block with decoder noise injection (``per_channel_scale1/2``) on row shards: diffusers' forward
    (LTX-Video's and LTX-2's, which differ only in how they call their norms and convs), except that each noise
    field is this rank's rows of the whole frame's ``torch.randn((H, W), generator=generator)``
    (:func:`parallel_vae.layers.ltx_noise.frame_noise`), not a field of the shard's own size."""

    _pv_state: SpatialState

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(norm, ltx2.PerChannelRMSNorm):
            return norm(x)
        return norm(x.movedim(1, -1)).movedim(-1, 1)  # RMSNorm / LayerNorm over channels, channels-last

    def _conv(self, conv: nn.Module, x: torch.Tensor, causal: Optional[bool]) -> torch.Tensor:
        return conv(x) if causal is None else conv(x, causal=causal)

    def _noise(self, x: torch.Tensor, scale: torch.Tensor, generator) -> torch.Tensor:
        rows, width = x.shape[-2:]
        noise = frame_noise(
            rows,
            width,
            self._pv_state.group,
            generator=generator,
            device=x.device,
            dtype=x.dtype,
            sizes=self._pv_state.level_sizes(rows),
        )
        # (rows, W) -> (1, rows, W) * (C, 1, 1) -> (1, C, 1, rows, W): one field for every channel and frame
        return x + (noise[None] * scale)[None, :, None, ...]

    def forward(self, inputs, temb=None, generator=None, causal: Optional[bool] = None):
        if causal is None and isinstance(self, ltx2.LTX2VideoResnetBlock3d):
            causal = True  # LTX-2's own default
        hidden_states = self._norm(self.norm1, inputs)
        if self.scale_shift_table is not None:
            temb = temb.unflatten(1, (4, -1)) + self.scale_shift_table[None, ..., None, None, None]
            shift_1, scale_1, shift_2, scale_2 = temb.unbind(dim=1)
            hidden_states = hidden_states * (1 + scale_1) + shift_1
        hidden_states = self._conv(self.conv1, self.nonlinearity(hidden_states), causal)
        if self.per_channel_scale1 is not None:
            hidden_states = self._noise(hidden_states, self.per_channel_scale1, generator)
        hidden_states = self._norm(self.norm2, hidden_states)
        if self.scale_shift_table is not None:
            hidden_states = hidden_states * (1 + scale_2) + shift_2
        hidden_states = self.dropout(self.nonlinearity(hidden_states))
        hidden_states = self._conv(self.conv2, hidden_states, causal)
        if self.per_channel_scale2 is not None:
            hidden_states = self._noise(hidden_states, self.per_channel_scale2, generator)
        if self.norm3 is not None:
            inputs = self._norm(self.norm3, inputs)
        if self.conv_shortcut is not None:
            inputs = self.conv_shortcut(inputs)
        return hidden_states + inputs


# Forwards that only route tensors to children (plus per-pixel / per-sample arithmetic and aligned row rearrangements).
_CONTAINERS = (
    nn.ModuleList,
    ltx.LTXVideoEncoder3d,
    ltx.LTXVideoDecoder3d,
    ltx.LTXVideoDownBlock3D,
    ltx.LTXVideo095DownBlock3D,
    ltx.LTXVideoMidBlock3d,
    ltx.LTXVideoUpBlock3d,
    ltx.LTXVideoCausalConv3d,  # time padding, then its conv (classified on its own)
    ltx2.LTX2VideoEncoder3d,
    ltx2.LTX2VideoDecoder3d,
    ltx2.LTX2VideoDownBlock3D,
    ltx2.LTX2VideoMidBlock3d,
    ltx2.LTX2VideoUpBlock3d,
    ltx2.LTX2VideoCausalConv3d,
)
# Per pixel or per sample: no change.
_LOCAL = (
    RMSNorm,  # LTX-Video calls it on x.movedim(1, -1): over channels
    nn.SiLU,
    nn.Dropout,
    nn.Linear,  # inside the timestep embedding
    PixArtAlphaCombinedTimestepSizeEmbeddings,
    Timesteps,
    TimestepEmbedding,
)
# Edge paddings a halo conv reproduces at the global top/bottom (circular would wrap rows around the frame).
_PAD_MODES = ("zeros", "reflect", "replicate")


def _row_stride(m: nn.Module) -> int:
    """Rows one output row of a resampler advances over (1 or 2)."""
    return int(m.stride[1])


def _treat(name: str, m: nn.Module, parents: dict) -> Optional[Treatment]:
    cls = original_class(m)
    parent = parents.get(id(m))
    parent_cls = original_class(parent) if parent is not None else None
    if cls is nn.Conv3d:
        if isinstance(m.padding, str) or m.padding_mode not in _PAD_MODES:
            raise unknown_module(name, m, f"padding {m.padding!r} / {m.padding_mode!r}")
        kh, sh, ph = m.kernel_size[1], m.stride[1], m.padding[1]
        if kh == 1 and sh == 1 and ph == 0:
            return None  # 1x1x1 (shortcuts): per pixel
        if parent_cls not in _CAUSAL_CONVS or sh not in (1, 2):
            raise unknown_module(name, m)
        why = f"{kh}-row conv (stride {sh}): halo rows, {m.padding_mode} padding at the global edges"
        return Treatment(name, sharded_class(HaloConv, cls), why)
    if cls in _RESNETS:
        if m.norm3 is not None and tuple(m.norm3.normalized_shape) != (m.norm3.weight.shape[0],):
            raise unknown_module(name, m, "a shortcut LayerNorm over more than the channels")
        if m.per_channel_scale1 is None and m.per_channel_scale2 is None:
            return None  # a container: norms, convs and activations are classified on their own
        return Treatment(name, sharded_class(ShardedNoiseResnet, cls), "noise injection: the whole frame's noise")
    if cls is nn.LayerNorm:
        if parent_cls not in _RESNETS or parent.norm3 is not m or len(m.normalized_shape) != 1:
            raise unknown_module(name, m)
        return None  # the resnet applies it channels-last: over the channels of each pixel
    if cls is ltx2.PerChannelRMSNorm:
        if m.channel_dim != 1:
            raise unknown_module(name, m, f"channel_dim {m.channel_dim}")
        return None
    if cls in _DOWNSAMPLERS or cls in _UPSAMPLERS:
        if _row_stride(m) not in (1, 2):
            raise unknown_module(name, m, f"row stride {_row_stride(m)}")
        return None  # aligned row pairs: local; its conv is classified on its own
    raise unknown_module(name, m)


class LTXVideoAdapter(FamilyAdapter):
    """``AutoencoderKLLTXVideo`` (name "ltxvideo") and, as :data:`LTX2`, ``AutoencoderKLLTX2Video`` ("ltx2")."""

    video = True

    def __init__(self, name: str, model_class: type):
        self.name = name
        self.model_class = model_class

    def plan(self, vae):
        self.spatial_factor(vae)  # a layout whose resamplers disagree with its config is refused here
        return classify(vae, _CONTAINERS, _LOCAL, _treat)

    def chunks(self, vae, frames: int, decode: bool) -> int:
        # diffusers' framewise (temporal tiled) path, off by default; its _encode tests use_framewise_decoding too
        tcr = int(vae.temporal_compression_ratio)
        if not vae.use_framewise_decoding:
            return 1
        if decode:
            return temporal_tiles(frames, vae.tile_sample_min_num_frames // tcr, vae.tile_sample_stride_num_frames // tcr)
        return temporal_tiles(frames, vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames)

    # --- geometry: from the layers ----------------------------------------------------------------------------
    @staticmethod
    def _down_strides(vae) -> list[tuple[int, int]]:
        """(time, rows) stride of every encoder downsampler, in the order the encoder runs them."""
        out = []
        for m in vae.encoder.modules():
            cls = original_class(m)
            if cls in _DOWNSAMPLERS:
                out.append((int(m.stride[0]), int(m.stride[1])))
            elif cls is nn.Conv3d and (m.stride[0] > 1 or m.stride[1] > 1):
                out.append((int(m.stride[0]), int(m.stride[1])))
        return out

    @staticmethod
    def _up_strides(vae) -> list[tuple[int, int]]:
        return [(int(m.stride[0]), int(m.stride[1])) for m in vae.decoder.modules() if original_class(m) in _UPSAMPLERS]

    def spatial_factor(self, vae) -> int:
        """``patch_size`` x 2 ** (encoder downsamplers that halve rows): 32 for the released LTX-Video and LTX-2
        VAEs; checked against the decoder's upsamplers and an explicit ``spatial_compression_ratio``."""
        p = int(vae.config.patch_size)
        down = [s for _, s in self._down_strides(vae)]
        up = [s for _, s in self._up_strides(vae)]
        factor = p
        for s in down:
            factor *= s
        up_factor = p
        for s in up:
            up_factor *= s
        ratio = vae.config.spatial_compression_ratio
        if factor != up_factor or (ratio is not None and int(ratio) != factor):
            raise NotImplementedError(
                f"{type(vae).__name__}: the encoder compresses rows {factor}x, the decoder expands them {up_factor}x "
                f"and spatial_compression_ratio is {ratio}; parallel_vae cannot derive its rows per latent row"
            )
        return factor

    def temporal_factor(self, vae) -> int:
        """``patch_size_t`` x the product of the encoder's temporal strides: 8 for both released VAEs."""
        factor = int(vae.config.patch_size_t)
        for t, _ in self._down_strides(vae):
            factor *= t
        return factor

    def latent_channels(self, vae) -> int:
        return int(vae.config.latent_channels)

    def check_frames(self, vae, frames: int, latent: bool) -> Optional[str]:
        """Latent frames: any count >= 1. Pixel frames: those the encoder's temporal layers accept, found by running
        its frame arithmetic (the patchify by ``patch_size_t``; a stride-2 ``conv`` downsampler pads two frames and
        takes (T - 1) // 2 + 1; a ``Downsampler3d`` of temporal stride s prepends s - 1 frames and needs (T + s - 1)
        to divide by s). The clips pipelines use, 1 + 8k frames, always pass."""
        if frames < 1:
            what = "latent" if latent else "pixel"
            return f"{'decode' if latent else 'encode'} needs at least one {what} frame (dim 2), got {frames}"
        if latent:
            return None
        t, ok = frames, frames % int(vae.config.patch_size_t) == 0
        t //= int(vae.config.patch_size_t)
        for m in vae.encoder.modules():
            cls = original_class(m)
            if cls in _DOWNSAMPLERS and m.stride[0] > 1:
                s = int(m.stride[0])
                ok = ok and (t + s - 1) % s == 0
                t = (t + s - 1) // s
            elif cls is nn.Conv3d and m.stride[0] > 1:
                # kernel k with k - 1 frames of replicate padding: (T + k - 1 - k) // s + 1
                t = (t - 1) // int(m.stride[0]) + 1
        if not ok:
            k = self.temporal_factor(vae)
            return (
                f"{type(vae).__name__} cannot encode {frames} frames (its temporal downsamplers pair up frames); "
                f"use 1 + {k}n frames (1, {1 + k}, {1 + 2 * k}, ...)"
            )
        return None

    def default_decode_kwargs(self, vae, z) -> dict:
        """A timestep-conditioned decoder (LTX-Video 0.9.1 and later) takes a decode timestep; LTX pipelines'
        default is ``decode_timestep=0.0`` (with ``decode_noise_scale`` 0: the latents are decoded as they are)."""
        if not vae.config.timestep_conditioning:
            return {}
        return {"temb": torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)}

    def denormalize(self, vae, z):
        """LTX pipelines decode ``z * latents_std / scaling_factor + latents_mean`` (the model's buffers)."""
        mean, std = _stats(vae, z)
        return z * std / float(vae.config.scaling_factor) + mean

    def normalize(self, vae, z):
        mean, std = _stats(vae, z)
        return (z - mean) * float(vae.config.scaling_factor) / std


def _stats(vae, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1) + (1,) * (z.dim() - 2)
    return vae.latents_mean.to(z).reshape(shape), vae.latents_std.to(z).reshape(shape)


LTXVIDEO = LTXVideoAdapter("ltxvideo", ltx.AutoencoderKLLTXVideo)
LTX2 = LTXVideoAdapter("ltx2", ltx2.AutoencoderKLLTX2Video)

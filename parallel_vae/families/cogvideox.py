"""The CogVideoX wiring: which module of a diffusers ``AutoencoderKLCogVideoX`` gets which treatment, and why.

A causal 3-D VAE with conv caches over frame batches: ``_encode`` runs the encoder on batches of
``num_sample_frames_batch_size`` (8) pixel frames, ``_decode`` the decoder on batches of
``num_latent_frames_batch_size`` (2) latent frames (the first batch takes the remainder), and every causal conv
hands the last ``k - 1`` frames of its input to the next batch. Those run unchanged on each rank's rows: time is
never split, so every rank cuts the same frame batches, and each rank's conv cache holds its own rows.

| module | treatment | why |
| --- | --- | --- |
| ``CogVideoXCausalConv3d`` (pad mode "first", the only one the class builds) | local | its forward pads time with its cache or copies of the first frame (per row) and calls its inner conv; all row reach is in that conv's own zero padding |
| its ``CogVideoXSafeConv3d`` with a 3-row kernel (conv_in/out, resnet conv1/conv2) | ``HaloOwnForwardConv`` | one halo row each side; the class's forward (time chunks above 2 GB, decided from the rank's own size) runs on the shard with its zero padding, and the boundary rows get the neighbours' taps |
| ``CogVideoXSafeConv3d`` 1x1x1 (``conv_y``/``conv_b`` of the spatial norms, resnet ``conv_shortcut``, ``quant_conv``/``post_quant_conv``) | local | per pixel |
| ``nn.GroupNorm`` (resnet norms, encoder ``norm_out``, the spatial norms' ``norm_layer``) | ``ShardedGroupNorm`` | diffusers normalizes each frame batch as one (B, C, T, H, W) tensor: statistics over that batch's frames and all rows, merged over the group (Chan); the frame batching is the class's own |
| ``CogVideoXSpatialNorm3D`` (decoder) | ``RowLocalSpatialNorm`` (diffusers' forward after a check) | it resizes the decoder's latent input ``zq`` to the level's size with nearest interpolation (the first frame and the rest apart). The decoder receives this rank's latent rows only, and the level's rows are exactly 2^k times them, so output row j reads latent row j >> k of the same shard: no halo and no gathered ``zq``. The check refuses any other ratio |
| ``CogVideoXDownsample3D`` (time: average pairs per pixel; then ``F.pad(x, (0, 1, 0, 1))`` and a 3x3 stride-2 conv per frame) | local; its conv is ``HaloBelowPaddedConv`` | the pad's bottom row becomes the first row of the rank below (zeros only on the global last rank): ``conv_halo(3, 2, 1, 0, 1)``; shards start on even rows at every level |
| ``CogVideoXUpsample3D`` (nearest 2x, 3-D for frame batches that compress time; then a 3x3 conv per frame) | local; its conv is ``HaloConv`` | nearest by 2: output row j reads input row j // 2 of the same shard; the conv has padding 1 |
| encoder / decoder, down / mid / up blocks, resnet blocks, ``nn.ModuleList`` | containers | they route tensors and caches (``temb`` is unused: ``temb_channels`` is 0) |
| SiLU, dropout | local | per pixel |

Tiling is off by default; with ``enable_tiling()`` the parallel model refuses (the rows are already split), as for
every family. Latents: the CogVideoX pipelines decode ``latents / scaling_factor`` (no shift; their latents are
(B, T, C, H, W), permuted to the (B, C, T, H, W) the VAE takes before decoding).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from diffusers.models.autoencoders import autoencoder_kl_cogvideox as cog
from diffusers.models.downsampling import CogVideoXDownsample3D
from diffusers.models.upsampling import CogVideoXUpsample3D

from ..core.halo import HaloConv
from ..core.norm import ShardedGroupNorm
from ..core.plan import SpatialState, Treatment, classify, original_class, sharded_class, unknown_module
from ..layers.cogvideox_conv import HaloBelowPaddedConv, HaloOwnForwardConv
from .base import FamilyAdapter, ScalingFactorLatents

__all__ = ["CogVideoXAdapter", "RowLocalSpatialNorm", "ADAPTER"]


class RowLocalSpatialNorm:
    """``CogVideoXSpatialNorm3D`` on row shards: diffusers' own forward, once the resize of ``zq`` is known to be
    row-local.

    ``F.interpolate(zq, size=f.shape[-3:])`` (nearest) maps output row j to input row floor(j * h / H). With
    H = 2^k h on every rank, h / H = 2^-k is exact in floating point, so the rank's rows map to its own rows
    exactly as the whole tensor's do. Any other ratio (which the decoder never produces from aligned shards) is an
    error rather than a silently shifted condition; every rank sees the same ratio, so every rank raises.
    """

    _pv_state: SpatialState

    def forward(self, f: torch.Tensor, zq: torch.Tensor, conv_cache: Optional[dict] = None):
        rows, z_rows = f.shape[-2], zq.shape[-2]
        ratio = rows // z_rows if z_rows else 0
        if ratio < 1 or ratio * z_rows != rows or ratio & (ratio - 1):
            raise NotImplementedError(
                f"{type(self).__name__}: {rows} feature rows from {z_rows} rows of zq is not a power-of-two nearest "
                "resize, which is the only one that stays on the rank's own rows"
            )
        return super().forward(f, zq, conv_cache=conv_cache)


# Forwards that only route tensors (and conv caches) to children.
_CONTAINERS = (
    nn.ModuleList,
    cog.CogVideoXEncoder3D,
    cog.CogVideoXDecoder3D,
    cog.CogVideoXDownBlock3D,
    cog.CogVideoXMidBlock3D,
    cog.CogVideoXUpBlock3D,
    cog.CogVideoXResnetBlock3D,
)
# Per pixel, or per row within what aligned shards keep together (their convs are classified on their own).
_LOCAL = (nn.SiLU, nn.Dropout, CogVideoXDownsample3D, CogVideoXUpsample3D)


def _rows(conv: nn.Conv2d | nn.Conv3d) -> tuple[int, int, int, int]:
    """(kernel, stride, dilation, padding) along the rows (dim -2)."""
    return conv.kernel_size[-2], conv.stride[-2], conv.dilation[-2], conv.padding[-2]


def _zero_padded(conv: nn.Module) -> bool:
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _treat(name: str, m: nn.Module, parents: dict) -> Optional[Treatment]:
    cls = original_class(m)
    parent = parents.get(id(m))
    parent_cls = original_class(parent) if parent is not None else None
    if cls is cog.CogVideoXCausalConv3d:
        if m.pad_mode == "replicate":
            # F.pad(..., "replicate") pads the rows before an unpadded conv; AutoencoderKLCogVideoX never builds it
            raise unknown_module(name, m, "pad_mode 'replicate' (AutoencoderKLCogVideoX builds pad mode 'first')")
        return None  # time padding and cache per row; the inner conv holds the row reach (classified below)
    if cls is cog.CogVideoXSafeConv3d:
        if not _zero_padded(m):
            raise unknown_module(name, m, f"padding {m.padding!r} / {m.padding_mode!r}")
        kh, sh, dh, ph = _rows(m)
        if kh == 1 and sh == 1 and ph == 0:
            return None  # one row of kernel, unpadded: conv_y/conv_b, conv_shortcut, quant convs (all 1x1x1)
        if parent_cls is cog.CogVideoXCausalConv3d and sh == 1 and dh * (kh - 1) == 2 * ph:
            why = f"{kh}-row conv: {ph} halo row(s) each side, zeros at the global edges; its own time chunking kept"
            return Treatment(name, sharded_class(HaloOwnForwardConv, cls), why)
        raise unknown_module(name, m)
    if cls is nn.GroupNorm:
        return Treatment(name, sharded_class(ShardedGroupNorm, cls), "GroupNorm: statistics merged over all rows")
    if cls is cog.CogVideoXSpatialNorm3D:
        why = "spatial norm: nearest resize of this rank's own latent rows, checked row-local"
        return Treatment(name, sharded_class(RowLocalSpatialNorm, cls), why)
    if cls is nn.Conv2d and _zero_padded(m):
        kh, sh, dh, ph = _rows(m)
        if parent_cls is CogVideoXDownsample3D and kh == 3 and sh == 2 and dh == 1 and ph == 0:
            why = "downsample conv after F.pad(0, 1, 0, 1): the pad row comes from the rank below"
            return Treatment(name, sharded_class(HaloBelowPaddedConv, cls), why)
        if parent_cls is CogVideoXUpsample3D and sh == 1 and dh * (kh - 1) == 2 * ph:
            why = f"{kh}x{kh} conv after the 2x upsample: {ph} halo row(s) each side"
            return Treatment(name, sharded_class(HaloConv, cls), why)
    raise unknown_module(name, m)


def _resamplers(vae: nn.Module, cls: type) -> int:
    return sum(1 for m in vae.modules() if original_class(m) is cls)


class CogVideoXAdapter(ScalingFactorLatents, FamilyAdapter):
    name = "cogvideox"
    model_class = cog.AutoencoderKLCogVideoX
    video = True

    def plan(self, vae):
        self.spatial_factor(vae)  # a layout whose resamplers disagree is refused before anything changes
        return classify(vae, _CONTAINERS, _LOCAL, _treat)

    def chunks(self, vae, frames: int, decode: bool) -> int:
        # diffusers' _encode / _decode run the encoder / decoder on batches of 8 pixel / 2 latent frames
        batch = vae.num_latent_frames_batch_size if decode else vae.num_sample_frames_batch_size
        return max(frames // batch, 1)

    def spatial_factor(self, vae) -> int:
        """2 ** (number of encoder downsamplers), 8 in the released models (one per block but the last), checked
        against the decoder's upsamplers. The config has no spatial ratio; diffusers' tiling uses the same
        2 ** (len(block_out_channels) - 1)."""
        down = _resamplers(vae.encoder, CogVideoXDownsample3D)
        up = _resamplers(vae.decoder, CogVideoXUpsample3D)
        if down != up:
            raise NotImplementedError(
                f"{type(vae).__name__}: {down} spatial downsamplers but {up} upsamplers; parallel_vae cannot derive "
                "its rows per latent row"
            )
        return 2**down

    def latent_channels(self, vae) -> int:
        return int(vae.config.latent_channels)

    def check_frames(self, vae, frames: int, latent: bool) -> Optional[str]:
        """diffusers' CogVideoX VAE takes any frame count >= 1 (its frame batching puts the remainder in the first
        batch, and each temporal resampler keeps an odd batch's first frame apart). Time is never split, so every
        count it accepts runs here; only an empty clip is refused."""
        if frames < 1:
            what = "latent" if latent else "pixel"
            return f"{'decode' if latent else 'encode'} needs at least one {what} frame (dim 2), got {frames}"
        return None



ADAPTER = CogVideoXAdapter()

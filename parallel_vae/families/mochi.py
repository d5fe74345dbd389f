"""The Mochi wiring: which module of a diffusers ``AutoencoderKLMochi`` gets which treatment, and why.

Mochi-1's VAE (``diffusers/models/autoencoders/autoencoder_kl_mochi.py``) runs the whole clip through every layer
at once (no frame caches by default): 8x spatial and 6x temporal compression, 12 latent channels. The encoder
starts from Fourier features of the pixels; every level is resnets of per-frame GroupNorms and replicate-padded
causal 3x3x3 convs; the encoder's deeper levels add attention blocks; resampling is a ``k = s`` strided conv down and
a Linear + depth-to-space rearrange up.

| module | treatment | why |
| --- | --- | --- |
| ``CogVideoXCausalConv3d`` 3x3x3, ``pad_mode="replicate"`` (resnet conv1/conv2) | ``HaloReplicateCausalConv`` | replicate pad (time causal, rows and columns symmetric), then an unpadded conv: one halo row each side; the global top/bottom rank replicates its own edge row, as the layer does |
| ``CogVideoXCausalConv3d`` with kernel = stride (te, 2, 2) (``MochiDownBlock3D.conv_in``) | local | no row padding, each output row reads the two rows of its own stride block; shards start on even rows at every level |
| their ``CogVideoXSafeConv3d`` | by the parent | called on rows that already carry the halo |
| ``MochiChunkedGroupNorm3D`` (every resnet norm, attention-block norm, encoder ``norm_out``) | ``ShardedFrameGroupNorm`` | GroupNorm of each frame on its own (diffusers folds frames into the batch and normalizes 8 frames per call): statistics per (sample, frame, group) merged over the ranks' rows (Chan), one collective per layer for all frames |
| its inner ``nn.GroupNorm`` | ``ShardedGroupNorm`` | the parent calls it once on all frames (called, not read for its affine, so hooks on it run) |
| ``Attention`` with ``MochiVaeAttnProcessor2_0`` in ``MochiMidBlock3D`` / ``MochiDownBlock3D`` | local | the blocks hand it one sequence per pixel, ``(B H W, T, C)``: causal attention over that pixel's frames, with L2 qk-norms per token; no pixel attends to another, so row shards change nothing |
| ``LpNorm`` (the attention's qk-norm), attention ``to_q/k/v/out`` Linear, ``Dropout`` | local | per token of a pixel's sequence |
| ``FourierFeatures``, ``proj_in`` / ``proj_out`` / up-block ``proj`` (Linear over channels), SiLU, decoder ``conv_in`` 1x1x1 | local | per pixel |
| ``MochiUpBlock3D`` (resnets, Linear, depth-to-space by (te, 2, 2)) | container | output row 2j + i comes from input row j of the same shard |
| encoder / decoder / mid / down / resnet blocks, ``nn.ModuleList`` | containers | their forwards only route tensors (down blocks also chunk the attention over pixels, which are independent) |

diffusers' own ``_encode`` / ``_decode`` run unchanged on each rank's rows (through the adapter), including
``drop_last_temporal_frames`` (time only) and ``use_slicing``. Spatial tiling and parallelism are exclusive (the API
refuses the pair). ``_enable_framewise_decoding`` / ``_enable_framewise_encoding`` are refused: they switch every
causal conv to constant padding while the convs were built without spatial padding, so the unmodified model fails
too (diffusers 0.42.1, "Kernel size can't be greater than actual input size"), and diffusers itself raises for
framewise encoding.

Pipelines (``MochiPipeline``) decode ``latents * latents_std / scaling_factor + latents_mean`` per channel.

``CogVideoXSafeConv3d`` splits an input of more than 1 G elements (2 GiB at 2 bytes) into time chunks that overlap by
k - 1 frames. For the stride-1 time kernels of every haloed conv that is the unsplit conv, wherever it splits. The
down blocks' ``conv_in`` have stride 2 and 3 in time, where a k - 1 overlap shifts the stride grid of the later
chunks; those convs run their own forward on this rank's rows, so they split when this rank's rows pass the limit,
while the unmodified model splits when the whole frame does. For example a 163-frame 848x480 encode: diffusers
splits ``down_blocks.1.conv_in``'s input (128 x 164 x 240 x 424) in two and a 2-rank shard does not, so the sharded
result is the unsplit convolution's and diffusers' pairs the frames of its second half one frame off.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from diffusers.models.attention_processor import Attention, MochiVaeAttnProcessor2_0
from diffusers.models.autoencoders import autoencoder_kl_mochi as mochi
from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d, CogVideoXSafeConv3d
from diffusers.models.normalization import LpNorm

from ..layers.replicate_causal_conv import HaloReplicateCausalConv, replicate_causal_conv_is_local
from ..core.norm import ShardedGroupNorm
from ..core.plan import SpatialState, Treatment, classify, original_class, sharded_class, unknown_module
from .base import FamilyAdapter, mean_std_normalization

__all__ = ["MochiAdapter", "ShardedFrameGroupNorm", "mochi_treatment", "ADAPTER"]


class ShardedFrameGroupNorm:
    """``MochiChunkedGroupNorm3D`` on row shards: each frame of each sample normalized on its own, with statistics
    over the whole frame (all ranks' rows).

    diffusers folds frames into the batch, (B, C, T, H, W) -> (B T, C, H, W), and runs its ``nn.GroupNorm`` on
    ``chunk_size`` frames at a time; GroupNorm normalizes each batch entry alone, so the chunks are a memory measure
    and do not change the result. Here all frames go through one call of its (sharded) GroupNorm: one small
    all-gather of (count, mean, M2) per (frame, group) for the whole layer instead of one per chunk."""

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor = None) -> torch.Tensor:
        b = x.size(0)
        # (B, C, T, h_r, W) -> (B T, C, h_r, W): one GroupNorm sample per frame, as diffusers folds them
        y = x.permute(0, 2, 1, 3, 4).flatten(0, 1)
        # a ShardedGroupNorm, called as diffusers calls it (not read for its affine), so hooks on it run
        y = self.norm_layer(y)
        # (B T, C, h_r, W) -> (B, C, T, h_r, W)
        return y.unflatten(0, (b, -1)).permute(0, 2, 1, 3, 4)


# Forwards that only route tensors to children (plus per-pixel reshapes: the up block's depth-to-space, the blocks'
# (B H W, T, C) attention layout).
_CONTAINERS = (
    nn.ModuleList,
    mochi.MochiEncoder3D,
    mochi.MochiDecoder3D,
    mochi.MochiMidBlock3D,
    mochi.MochiDownBlock3D,
    mochi.MochiUpBlock3D,
    mochi.MochiResnetBlock3D,
)
# Per pixel: no change. (get_activation("silu") is an nn.SiLU.)
_LOCAL = (mochi.FourierFeatures, nn.SiLU, nn.Dropout, nn.Linear)

# The blocks that feed their attention one sequence per pixel.
_ATTENTION_BLOCKS = (mochi.MochiMidBlock3D, mochi.MochiDownBlock3D)


def _grandparent(parents: dict, m: nn.Module) -> Optional[nn.Module]:
    parent = parents.get(id(m))
    if parent is None or original_class(parent) is not nn.ModuleList:
        return None
    return parents.get(id(parent))


def _causal_conv(name: str, m: nn.Module) -> Optional[Treatment]:
    conv = m.conv
    if type(conv) is not CogVideoXSafeConv3d or tuple(conv.padding) != (0, 0, 0) or conv.padding_mode != "zeros":
        raise unknown_module(name, m, "its conv is not the unpadded CogVideoXSafeConv3d of replicate mode")
    if m.pad_mode != "replicate":
        raise unknown_module(name, m, f"pad_mode {m.pad_mode!r} (only Mochi's default 'replicate' is sharded)")
    if replicate_causal_conv_is_local(m):
        return None  # kernel = stride rows, no row padding: reads its own aligned row block
    kh, sh = conv.kernel_size[1], conv.stride[1]
    why = f"{kh}-row causal conv (stride {sh}): halo rows, replicate padding at the global edges"
    return Treatment(name, sharded_class(HaloReplicateCausalConv, original_class(m)), why)


def mochi_treatment(name: str, m: nn.Module, parents: dict) -> Optional[Treatment]:
    """The classification of every non-container, non-local module of ``AutoencoderKLMochi``."""
    cls = original_class(m)
    parent = parents.get(id(m))
    if cls is CogVideoXCausalConv3d:
        return _causal_conv(name, m)
    if cls is CogVideoXSafeConv3d:
        if parent is not None and original_class(parent) is CogVideoXCausalConv3d:
            return None  # its parent's treatment (or local forward) calls it
        raise unknown_module(name, m)
    if cls is mochi.MochiChunkedGroupNorm3D:
        why = "per-frame GroupNorm: statistics per (sample, frame, group) merged over all rows"
        return Treatment(name, sharded_class(ShardedFrameGroupNorm, cls), why)
    if cls is nn.GroupNorm:
        if parent is not None and original_class(parent) is mochi.MochiChunkedGroupNorm3D:
            why = "the per-frame norm's GroupNorm, called by its parent on all frames at once: merged statistics"
            return Treatment(name, sharded_class(ShardedGroupNorm, cls), why)
        raise unknown_module(name, m)
    if cls is Attention:
        block = _grandparent(parents, m)
        if block is None or original_class(block) not in _ATTENTION_BLOCKS:
            raise unknown_module(name, m, "attention outside a Mochi mid/down block (which feeds it per-pixel frames)")
        if type(m.processor) is not MochiVaeAttnProcessor2_0:
            raise unknown_module(name, m, f"processor {type(m.processor).__name__} (only MochiVaeAttnProcessor2_0)")
        if m.is_cross_attention or m.added_kv_proj_dim is not None:
            raise unknown_module(name, m, "cross attention")
        return None  # attention over each pixel's frames: local
    if cls is LpNorm:
        if parent is not None and original_class(parent) is Attention:
            return None  # the qk-norm over each token's head dim
        raise unknown_module(name, m)
    if cls is nn.Conv3d:
        k, s = m.kernel_size, m.stride
        if k == (1, 1, 1) and s == (1, 1, 1) and not isinstance(m.padding, str) and tuple(m.padding) == (0, 0, 0):
            return None  # decoder conv_in: 1x1x1
        raise unknown_module(name, m)
    raise unknown_module(name, m)


def _row_strides(vae) -> tuple[list[int], list[int]]:
    """(row stride of each encoder down block's conv, row factor of each decoder up block) as built."""
    down = [int(b.conv_in.conv.stride[1]) for b in vae.encoder.down_blocks]
    up = [int(b.spatial_expansion) for b in vae.decoder.up_blocks]
    return down, up


class MochiAdapter(FamilyAdapter):
    name = "mochi"
    model_class = mochi.AutoencoderKLMochi
    video = True
    uses_latent_stats = True

    def plan(self, vae):
        self.spatial_factor(vae)  # refuses a model whose resampling disagrees with its compression ratio
        return classify(vae, _CONTAINERS, _LOCAL, mochi_treatment)

    def spatial_factor(self, vae) -> int:
        """``spatial_compression_ratio`` (8: the product of ``spatial_expansions``), checked against the strides
        and depth-to-space factors actually built, which the shards' alignment relies on."""
        ratio = int(vae.spatial_compression_ratio)
        down, up = _row_strides(vae)
        if any(s < 1 for s in down + up) or math.prod(down) != ratio or math.prod(up) != ratio:
            raise ValueError(
                f"spatial_compression_ratio {ratio} disagrees with the model's down-block row strides {down} and "
                f"up-block row factors {up}; parallel_vae needs the ratio the layers implement"
            )
        return ratio

    def temporal_factor(self, vae) -> int:
        """``temporal_compression_ratio`` (6: the product of ``temporal_expansions``): 1 + 6k frames round-trip."""
        return int(vae.temporal_compression_ratio)

    def latent_channels(self, vae) -> int:
        return int(vae.config.latent_channels)

    def pixel_channels(self, vae) -> int:
        """Channels of the pixel video: the config's ``in_channels`` (15) counts the encoder's Fourier features (each
        pixel channel, then its sines and cosines at ``num_freqs`` frequencies)."""
        ff = vae.encoder.fourier_features
        num_freqs = (ff.stop - ff.start) // ff.step
        return int(vae.config.in_channels) // (1 + 2 * num_freqs)

    def check_frames(self, vae, frames: int, latent: bool) -> Optional[str]:
        """diffusers' Mochi VAE takes any number of frames >= 1 (its causal convs replicate-pad time); 1 + 6k frames
        round-trip to the same count. Time is never split, so only an empty clip is refused."""
        if frames < 1:
            what = "latent" if latent else "pixel"
            return f"{'decode' if latent else 'encode'} needs at least one {what} frame (dim 2), got {frames}"
        return None

    def encode_local(self, vae, x):
        _refuse_framewise(vae)
        return super().encode_local(vae, x)

    def decode_local(self, vae, z):
        _refuse_framewise(vae)
        return super().decode_local(vae, z)

    def denormalize(self, vae, z):
        """``MochiPipeline`` decodes ``latents * latents_std / scaling_factor + latents_mean``."""
        mean, std = mean_std_normalization(vae, z)
        return z * std / float(vae.config.scaling_factor) + mean

    def normalize(self, vae, z):
        mean, std = mean_std_normalization(vae, z)
        return (z - mean) * float(vae.config.scaling_factor) / std


def _refuse_framewise(vae) -> None:
    """The same error on every rank (a model attribute, not data), before any collective of the encoder/decoder."""
    if vae.use_framewise_encoding or vae.use_framewise_decoding:
        raise NotImplementedError(
            "AutoencoderKLMochi's framewise encoding/decoding is not sharded: diffusers' own fails (its causal convs "
            "switch to constant padding but were built without spatial padding); run the model without "
            "_enable_framewise_encoding/_decoding (the default), which sharding makes affordable"
        )


ADAPTER = MochiAdapter()

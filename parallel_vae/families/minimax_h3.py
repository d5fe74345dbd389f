"""The MiniMax-H3 wiring: diffusers ``AutoencoderKLMiniMaxH3``.

A causal 3-D CNN encoder (reflect-padded convs, per-frame GroupNorm, pad-then-stride-2 downsamplers; 16x spatial,
4x temporal, 24 latent channels in the released config) and a non-causal ViT decoder: every latent voxel of a clip
is a token, full self-attention with 3-axis RoPE over them (36 blocks of 32 heads x 64), each token expanded into a
4 x 16 x 16 pixel block at the end.

| module | treatment |
| --- | --- |
| ``MiniMaxH3VideoCausalConv3d`` with ``spatial_padding`` p > 0 (conv_in/out, resnet conv1/conv2) | ``HaloSpatialPadConv``: p halo rows each side, the layer's reflect pad at the global edges |
| ``MiniMaxH3VideoDownsample3d`` (spatial stride 2) | ``HaloPadDownsample``: its bottom pad row from the rank below (the layer's reflect pad on the last rank) |
| its inner ``MiniMaxH3VideoCausalConv3d`` (``spatial_padding`` 0, stride 2) | called by the parent on rows that carry the halo |
| ``MiniMaxH3VideoCausalConv3d`` 1x1x1 (``conv_shortcut``), ``quant_conv`` / ``post_quant_conv`` | local |
| ``MiniMaxH3VideoGroupNorm`` (frames folded into the batch) | diffusers' own fold over ``ShardedGroupNorm``: statistics per (sample, frame, group) merged over the ranks (Chan) |
| ``MiniMaxH3VideoViTDecoder3d`` | ``ShardedViTDecoder``: my rows' tokens; the register and zero tokens on the last rank; the rotary table of the global grid |
| ``MiniMaxH3VideoAttention`` (default processor) | ``SequenceParallelRopeAttention``: my queries against every rank's keys/values, gathered or ring |
| ``MiniMaxH3VideoRotaryPosEmbed`` | called by the decoder on the global positions |
| ``nn.RMSNorm``, ``nn.LayerNorm``, ``nn.Linear``, ``FeedForward`` / ``SwiGLU``, ``Dropout`` in the decoder | local: per token |
| encoder, down blocks, resnets, transformer blocks, ``nn.ModuleList`` | containers |

Frames: diffusers' ``_encode`` runs ``clip_length`` (17) pixel frames at a time (one frame alone for an image) and
``_decode`` overlapping clips of ``tokens_chunk_size + token_overlap`` (7) latent frames, cross-faded in time; both run
unchanged on each rank's rows. A decode of too few latent frames (fewer than 3 in the released config, where
diffusers' chunking yields no clip and ``torch.cat`` fails) is refused before any layer runs.

Tiling: MiniMax-H3 ships with spatial tiling on (256-pixel tiles, 64-pixel overlaps). The parallel model is the
untiled model, full attention over the whole frame, without seams; enabling parallelism needs ``vae.disable_tiling()``
(the API's refusal names it). Where the frame fits one tile (at most 256 x 256 pixels) the default tiled model is
the same function; above, it is a different, seamed function that parallel_vae does not reproduce.
"""

from __future__ import annotations

import math
from typing import Optional

import torch.nn as nn
from diffusers.models.activations import SwiGLU
from diffusers.models.attention import FeedForward
from diffusers.models.autoencoders import autoencoder_kl_minimax_h3 as mm

from ..core.halo import conv_treatment
from ..core.norm import ShardedGroupNorm
from ..core.plan import Treatment, classify, original_class, sharded_class, unknown_module
from ..layers.spatial_pad_conv import PAD_MODES, HaloPadDownsample, HaloSpatialPadConv
from ..layers.vit_decoder import SequenceParallelRopeAttention, ShardedViTDecoder
from .base import FamilyAdapter, mean_std_normalization

__all__ = ["MiniMaxH3Adapter", "ADAPTER"]

_CONTAINERS = (
    nn.ModuleList,
    mm.MiniMaxH3VideoEncoder3d,
    mm.MiniMaxH3VideoDownBlock3d,
    mm.MiniMaxH3VideoResnetBlock3d,
    mm.MiniMaxH3VideoTransformerBlock,
    FeedForward,
)
# per token, and only inside the decoder (checked in _treat)
_DECODER_LOCAL = (
    nn.Linear, nn.RMSNorm, nn.LayerNorm, nn.Dropout, nn.SiLU, SwiGLU, mm.MiniMaxH3VideoRotaryPosEmbed,
)


def _causal_conv(name: str, m: nn.Module, parent: Optional[nn.Module]) -> Optional[Treatment]:
    kh, sh, dh = m.kernel_size[1], m.stride[1], m.dilation[1]
    p, mode = m.spatial_padding, m.spatial_padding_mode
    if tuple(m.padding) != (0, 0, 0) or m.padding_mode != "zeros":
        raise unknown_module(name, m, f"conv padding {m.padding!r} / {m.padding_mode!r}")
    if p > 0:
        if mode not in PAD_MODES:
            raise unknown_module(name, m, f"spatial_padding_mode {mode!r} ({mode} wraps rows around the frame)")
        if kh == 2 * p + 1 and sh == 1 and dh == 1:
            return Treatment(name, sharded_class(HaloSpatialPadConv, original_class(m)), f"{kh}-row conv: halo rows")
        raise unknown_module(name, m, f"row kernel {kh}, stride {sh}, dilation {dh}, spatial padding {p}")
    if kh == 1 and sh == 1:
        return None  # 1x1 in space (conv_shortcut): per pixel
    if parent is not None and original_class(parent) is mm.MiniMaxH3VideoDownsample3d:
        return None  # the downsampler's conv: its parent attaches the halo rows
    raise unknown_module(name, m, f"an unpadded {kh}-row conv outside a downsampler")


def _treat(name: str, m: nn.Module, parents: dict) -> Optional[Treatment]:
    cls = original_class(m)
    parent = parents.get(id(m))
    if cls is mm.MiniMaxH3VideoCausalConv3d:
        return _causal_conv(name, m, parent)
    if cls is mm.MiniMaxH3VideoDownsample3d:
        conv = m.conv
        if m.spatial_stride != 2 or conv.kernel_size[1] != 3 or conv.stride[1] != 2 or conv.spatial_padding != 0:
            raise unknown_module(name, m, f"spatial stride {m.spatial_stride}, conv {conv.kernel_size}/{conv.stride}")
        if m.spatial_padding_mode not in PAD_MODES:
            raise unknown_module(name, m, f"spatial_padding_mode {m.spatial_padding_mode!r}")
        why = "pad (0, 1) + stride-2 conv: the bottom pad row from the rank below"
        return Treatment(name, sharded_class(HaloPadDownsample, cls), why)
    if cls is mm.MiniMaxH3VideoGroupNorm:
        # diffusers' forward (frames folded into the batch) over ShardedGroupNorm's: statistics of the whole frame
        why = "per-frame GroupNorm: statistics per (sample, frame, group) merged over all rows"
        return Treatment(name, sharded_class(cls, ShardedGroupNorm), why)
    if cls is mm.MiniMaxH3VideoViTDecoder3d:
        why = "ViT decoder: my rows' tokens, the appended tokens on the last rank, rotary positions of the global grid"
        return Treatment(name, sharded_class(ShardedViTDecoder, cls), why)
    if cls is mm.MiniMaxH3VideoAttention:
        if type(m.processor) is not mm.MiniMaxH3VideoAttnProcessor:
            raise unknown_module(name, m, f"processor {type(m.processor).__name__}")
        why = "self-attention over all tokens: my queries against every rank's keys and values (gather or ring)"
        return Treatment(name, sharded_class(SequenceParallelRopeAttention, cls), why)
    if cls in _DECODER_LOCAL and name.startswith("decoder."):
        return None
    if cls is nn.Conv3d and name in ("quant_conv", "post_quant_conv"):
        t = conv_treatment(name, m)
        if t is None:
            return None
    raise unknown_module(name, m)


class MiniMaxH3Adapter(FamilyAdapter):
    name = "minimax_h3"
    model_class = mm.AutoencoderKLMiniMaxH3
    video = True
    uses_latent_stats = True
    decode_returns_output = False  # its _decode returns the tensor

    def plan(self, vae):
        self.spatial_factor(vae)
        return classify(vae, _CONTAINERS, (), _treat)

    def spatial_factor(self, vae) -> int:
        """``spatial_compression_ratio`` (16), the product of the encoder's downsample factors, which must be the
        decoder's patch size and a power of two (every level's shard then starts on an even row)."""
        ratio = int(vae.spatial_compression_ratio)
        factors = list(vae.config.spatial_downsample_factors)
        if any(f not in (1, 2) for f in factors) or ratio != math.prod(factors) or vae.decoder.patch_size != ratio:
            raise NotImplementedError(
                f"AutoencoderKLMiniMaxH3: spatial factors {factors} (only 1 and 2 are sharded) give {math.prod(factors)}"
                f" rows per latent row, the decoder's patch is {vae.decoder.patch_size}, the config's ratio {ratio}"
            )
        return ratio

    def temporal_factor(self, vae) -> int:
        return int(vae.temporal_compression_ratio)

    def latent_channels(self, vae) -> int:
        return int(vae.config.latent_channels)

    def usable_frames(self, vae, frames: int) -> int:
        """Every frame: diffusers pads a clip to whole ``clip_length`` chunks by repeating its last frame."""
        return frames

    def latent_frames(self, vae, frames: int) -> int:
        """1 for one frame; else whole ``clip_length`` chunks of ``tokens_chunk_size`` latent frames, less
        ``token_drop``: 17 n + 5 pixel frames give 5 n + 2."""
        if frames == 1:
            return 1
        clips = -(-frames // vae.config.clip_length)
        return clips * vae.tokens_chunk_size - vae.config.token_drop

    def _decode_clips(self, vae, frames: int) -> int:
        """How many clips diffusers' ``_decode`` runs for ``frames`` latent frames (its own arithmetic)."""
        drop, chunk = vae.config.token_drop, vae.tokens_chunk_size
        tokens = frames + drop
        return (tokens + (-tokens) % chunk) // chunk - int(drop > 0)

    def chunks(self, vae, frames: int, decode: bool) -> int:
        if decode:
            return max(self._decode_clips(vae, frames), 0)
        return 1 if frames == 1 else -(-frames // vae.config.clip_length)

    def check_frames(self, vae, frames: int, latent: bool) -> Optional[str]:
        if frames < 1:
            what = "latent" if latent else "pixel"
            return f"{'decode' if latent else 'encode'} needs at least one {what} frame (dim 2), got {frames}"
        if latent and self._decode_clips(vae, frames) < 1:
            least = next(f for f in range(1, 64) if self._decode_clips(vae, f) >= 1)
            return (
                f"AutoencoderKLMiniMaxH3 decodes at least {least} latent frames (dim 2), got {frames}: with "
                f"token_drop {vae.config.token_drop} and {vae.tokens_chunk_size}-frame chunks diffusers' _decode "
                f"runs no clip (and fails in torch.cat)"
            )
        return None

    def denormalize(self, vae, z):
        """MiniMax-H3 pipelines decode ``latent * latents_std + latents_mean``."""
        mean, std = mean_std_normalization(vae, z)
        return z * std + mean

    def normalize(self, vae, z):
        mean, std = mean_std_normalization(vae, z)
        return (z - mean) / std


ADAPTER = MiniMaxH3Adapter()

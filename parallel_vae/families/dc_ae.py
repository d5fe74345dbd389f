"""The DC-AE wiring: diffusers ``AutoencoderDC`` (Sana's deep-compression autoencoder, 32x to 128x spatial).

Images (B, C, H, W); a deterministic encoder (``encode`` returns latents, no distribution). Every level halves the
rows with a factor-2 block, so a shard of whole latent rows holds whole 2-row groups at every level and the
pixel (un)shuffles stay local.

| module | treatment |
| --- | --- |
| ``nn.Conv2d`` with more than one row of kernel (conv_in/out, ``ResBlock`` conv1/conv2, ``DCDownBlock2d`` / ``DCUpBlock2d`` convs, ``GLUMBConv.conv_depth`` (depthwise 3x3), the multi-scale q/k/v ``proj_in`` (depthwise 5x5)) | ``HaloConv``: halo rows from the conv's geometry (2 rows for the 5x5), zeros at the global edges; the stride-2 downsampling conv stays aligned (shards start on even rows) |
| ``DCDownBlock2d`` (conv, or conv + pixel unshuffle; shortcut: pixel unshuffle + channel-group mean) | local apart from its conv: a 2x2 unshuffle reads a row pair that a shard holds whole |
| ``DCUpBlock2d`` (nearest 2x + conv, or conv + pixel shuffle; shortcut: channel repeat + pixel shuffle) | local apart from its conv: nearest 2x and the shuffle write each input row's own output rows |
| ``SanaMultiscaleLinearAttention`` (EfficientViT's multi-scale ReLU linear attention) | ``ShardedMultiscaleLinearAttention``: the (d + 1) x d key-value summaries all-reduced over the group, the processor unchanged |
| ``RMSNorm`` (over channels, per pixel), the encoder's channel-mean out shortcut, the decoder's channel-repeat in shortcut, 1x1 convs, linear q/k/v/out, activations | local |
| ``nn.BatchNorm2d`` (``batch_norm`` decoder levels of the f32c32-in/mix, f64 and f128 releases) | local in eval mode (running statistics are per channel); training mode, which would need statistics over all rows, raises |

Every rank needs 2 latent rows (``min_latent_rows``): the 5x5 q/k/v convs at the latent level read 2 rows each
side, and a halo comes from the adjacent rank only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import AutoencoderDC
from diffusers.models.attention_processor import SanaMultiscaleAttentionProjection, SanaMultiscaleLinearAttention
from diffusers.models.autoencoders.autoencoder_dc import (
    DCDownBlock2d,
    DCUpBlock2d,
    Decoder,
    EfficientViTBlock,
    Encoder,
    ResBlock,
)
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.sana_transformer import GLUMBConv

from ..core.halo import conv_treatment
from ..layers.linear_attention import ShardedMultiscaleLinearAttention
from ..core.plan import Treatment, classify, original_class, sharded_class, unknown_module
from .base import FamilyAdapter, scaling_shift_normalization

__all__ = ["DCAEAdapter", "EvalBatchNorm"]

_CONTAINERS = (
    nn.ModuleList,
    nn.Sequential,
    Encoder,
    Decoder,
    EfficientViTBlock,
    GLUMBConv,
    SanaMultiscaleAttentionProjection,
)
# Per-pixel or per-channel modules; the activations are every class diffusers' get_activation can build.
_LOCAL = (RMSNorm, nn.Linear, nn.Identity, nn.SiLU, nn.ReLU, nn.ReLU6, nn.GELU, nn.Mish)


class EvalBatchNorm:
    """``nn.BatchNorm2d`` on row shards: with running statistics (eval mode) it is per channel and per pixel, so
    local; batch statistics (training mode) would span every rank's rows, which is not implemented: an error."""

    _pv_state = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.track_running_stats:
            raise NotImplementedError(
                "parallel_vae runs DC-AE's BatchNorm2d with its running statistics only (eval mode); in training "
                "mode its batch statistics would span every rank's rows. Call .eval() on the BatchNorm2d modules"
            )
        return super().forward(x)


def _treatment(name: str, m: nn.Module, parents: dict) -> Treatment | None:
    cls = original_class(m)
    if cls is ResBlock:
        if m.norm_type not in ("rms_norm", "batch_norm"):
            raise unknown_module(name, m, f"norm_type {m.norm_type!r}")
        return None  # a container: its convs, norm and activation are classified on their own
    if cls is DCDownBlock2d:
        if m.factor != 2:
            raise unknown_module(name, m, f"factor {m.factor}")
        return None  # pixel unshuffle and channel means are local; the conv gets HaloConv
    if cls is DCUpBlock2d:
        if m.factor != 2 or (m.interpolate and m.interpolation_mode != "nearest"):
            # A linear resize would read a neighbour row; AutoencoderDC only ever builds nearest.
            raise unknown_module(name, m, f"factor {m.factor}, interpolation {m.interpolation_mode!r}")
        return None  # nearest 2x, pixel shuffle and channel repeats are local; the conv gets HaloConv
    if cls is SanaMultiscaleLinearAttention:
        if m.norm_type not in ("rms_norm", "batch_norm"):
            raise unknown_module(name, m, f"norm_type {m.norm_type!r}")
        why = "linear attention: all-reduced key-value summaries"
        return Treatment(name, sharded_class(ShardedMultiscaleLinearAttention, cls), why)
    if cls is nn.BatchNorm2d:
        return Treatment(name, sharded_class(EvalBatchNorm, cls), "BatchNorm2d: running statistics only")
    if cls is nn.Conv2d:
        return conv_treatment(name, m)
    raise unknown_module(name, m)


class DCAEAdapter(FamilyAdapter):
    name = "dcae"
    model_class = AutoencoderDC
    video = False
    deterministic = True
    decode_returns_output = False  # AutoencoderDC._decode returns the tensor

    def plan(self, vae):
        return classify(vae, _CONTAINERS, _LOCAL, _treatment)

    def spatial_factor(self, vae) -> int:
        """2**(number of levels - 1): 32 for the f32 releases, 64 and 128 for the others."""
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)

    def latent_channels(self, vae) -> int:
        return int(vae.config.latent_channels)

    def min_latent_rows(self, vae) -> int:
        """2 for the released layouts: the multi-scale q/k/v convs are 5x5 (2 halo rows) at the latent level itself,
        where a latent row is one row, and halos come from the adjacent ranks only."""
        levels = len(vae.config.encoder_block_out_channels)
        need = 1
        for blocks in (vae.encoder.down_blocks, vae.decoder.up_blocks):
            for i, block in enumerate(blocks):
                for sub in block:
                    # rows per latent row where the conv runs; a pixel-shuffle up block convolves a level coarser
                    coarse = isinstance(sub, DCUpBlock2d) and not sub.interpolate
                    rows = 2 ** (levels - 1 - i - int(coarse))
                    for m in sub.modules():
                        if isinstance(m, nn.Conv2d):
                            k, d, p = m.kernel_size[0], m.dilation[0], m.padding[0]
                            reach = max(p, d * (k - 1) - p)
                            need = max(need, -(-reach // rows))
        return need

    def denormalize(self, vae, z):
        """Sana's pipelines scale latents by ``scaling_factor`` (no shift)."""
        scale, shift = scaling_shift_normalization(vae)
        return z / scale + shift

    def normalize(self, vae, z):
        scale, shift = scaling_shift_normalization(vae)
        return (z - shift) * scale


ADAPTER = DCAEAdapter()

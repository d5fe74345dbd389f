"""The Qwen-Image wiring: diffusers ``AutoencoderKLQwenImage``.

Qwen-Image's VAE is Wan2.1's architecture under other class names (a causal 3-D VAE with frame caches, channel RMS
norms, per-frame single-head mid-block attention, ZeroPad2d + stride-2 downsampling, nearest-exact upsampling; its
layer forwards are line-for-line Wan's). Images are 5-D with one frame, (B, 3, 1, H, W). So the table is Wan's:

| module | treatment |
| --- | --- |
| ``QwenImageCausalConv3d`` with a 3-row kernel | ``HaloCausalConv``: one halo row each side after the frame cache; zeros at the global edges |
| ``QwenImageCausalConv3d`` 1x1x1 / ``time_conv`` | local |
| ``QwenImageResample`` upsample conv ``Conv2d(3, padding=1)`` | ``HaloConv`` (the nearest-exact 2x before it is local) |
| ``QwenImageResample`` downsample ``ZeroPad2d((0, 1, 0, 1))`` | ``HaloZeroPad2d``; the stride-2 conv after it is then local |
| ``QwenImageAttentionBlock`` | ``ShardedFrameAttention``: own queries against all-gathered keys/values |
| ``QwenImageRMS_norm``, SiLU, dropout | local |
"""

from __future__ import annotations

import torch.nn as nn
from diffusers.models.autoencoders import autoencoder_kl_qwenimage as qwen

from ..core.plan import classify
from .base import FamilyAdapter, mean_std_normalization
from .wan import _MODES, causal_vae_treatment, check_resample_modes

__all__ = ["QwenImageAdapter"]

_LOCAL = (qwen.QwenImageRMS_norm, qwen.QwenImageUpsample, nn.SiLU, nn.Dropout, nn.Identity)
_CONTAINERS = (
    nn.Sequential,
    nn.ModuleList,
    qwen.QwenImageEncoder3d,
    qwen.QwenImageDecoder3d,
    qwen.QwenImageMidBlock,
    qwen.QwenImageResidualBlock,
    qwen.QwenImageResample,
    qwen.QwenImageUpBlock,
)


class QwenImageAdapter(FamilyAdapter):
    name = "qwenimage"
    model_class = qwen.AutoencoderKLQwenImage
    video = True
    uses_latent_stats = True

    def plan(self, vae):
        check_resample_modes(vae, qwen.QwenImageResample)

        def treat(name, m, parents):
            return causal_vae_treatment(
                name, m, parents, causal_conv=qwen.QwenImageCausalConv3d, attention=qwen.QwenImageAttentionBlock,
                resample=qwen.QwenImageResample, modes=_MODES,
            )

        return classify(vae, _CONTAINERS, _LOCAL, treat)

    def spatial_factor(self, vae) -> int:
        return 2 ** len(vae.temperal_downsample)

    def latent_channels(self, vae) -> int:
        return int(vae.config.z_dim)

    def pixel_channels(self, vae) -> int:
        return int(vae.config.input_channels)

    def temporal_factor(self, vae) -> int:
        return 2 ** sum(bool(t) for t in vae.temperal_downsample)

    def progress_total(self, vae, x, decode: bool) -> int:
        # the decoder runs once per latent frame, the encoder once per chunk of 1, 4, 4, ... frames
        return x.shape[2] if decode else 1 + (x.shape[2] - 1) // self.temporal_factor(vae)

    def checkpointed_blocks(self, vae):
        blocks = [(f"encoder.down_blocks.{i}", b) for i, b in enumerate(vae.encoder.down_blocks)]
        blocks.append(("encoder.mid_block", vae.encoder.mid_block))
        blocks.append(("decoder.mid_block", vae.decoder.mid_block))
        blocks += [(f"decoder.up_blocks.{i}", b) for i, b in enumerate(vae.decoder.up_blocks)]
        return blocks

    def enable_checkpointing(self, vae) -> None:
        from ..checkpointing import enable_cache_checkpointing

        enable_cache_checkpointing(self.checkpointed_blocks(vae))

    def disable_checkpointing(self, vae) -> None:
        from ..checkpointing import disable_cache_checkpointing

        disable_cache_checkpointing(self.checkpointed_blocks(vae))

    def denormalize(self, vae, z):
        mean, std = mean_std_normalization(vae, z)
        return z * std + mean

    def normalize(self, vae, z):
        mean, std = mean_std_normalization(vae, z)
        return (z - mean) / std


ADAPTER = QwenImageAdapter()

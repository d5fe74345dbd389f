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

from .wan import CausalCacheAdapter

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


class QwenImageAdapter(CausalCacheAdapter):
    name = "qwenimage"
    model_class = qwen.AutoencoderKLQwenImage
    causal_conv, attention, resample = qwen.QwenImageCausalConv3d, qwen.QwenImageAttentionBlock, qwen.QwenImageResample
    local, containers = _LOCAL, _CONTAINERS

    def spatial_factor(self, vae) -> int:
        return 2 ** len(vae.temperal_downsample)

    def pixel_channels(self, vae) -> int:
        return int(vae.config.input_channels)

    def temporal_factor(self, vae) -> int:
        return 2 ** sum(bool(t) for t in vae.temperal_downsample)


ADAPTER = QwenImageAdapter()

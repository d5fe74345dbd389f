"""The Kandinsky KVAE (2-D) wiring: diffusers ``AutoencoderKLKVAE`` (images, 8x spatial in the default config).

A LDM-style image VAE without attention whose decoder is conditioned on the latents: every decoder norm is a
``KVAEDecoderSpatialNorm2D`` (GroupNorm, then a scale and shift computed from the latents resized to the feature's
size with nearest interpolation). Convs pad with zeros (encoder conv_in/out), replicate (resnets, decoder) or
reflect (the resamplers' spatial convs).

| module | treatment |
| --- | --- |
| ``nn.Conv2d`` 3x3 (every conv but the 1x1 ones) | ``HaloConv``: one halo row each side; at the global edges the conv's own padding mode (zeros, replicate, reflect); the stride-2 reflect conv of ``KVAEPXSDownsample`` reads one row from above, none from below, because shards start on even rows |
| ``nn.Conv2d`` 1x1 (nin_shortcut, the resamplers' ``linear``, the spatial norms' ``conv_y`` / ``conv_b``) | local |
| ``nn.GroupNorm`` (resnet norms, ``norm_layer`` of the spatial norms, encoder norm_out) | ``ShardedGroupNorm`` |
| ``KVAEDecoderSpatialNorm2D`` | container: its ``F.interpolate(zq, size=f.shape[2:], mode="nearest")`` is row-local, because every decoder level holds 2**k rows per latent row on every shard (output row i reads latent row i // 2**k, the same on the shard as on the whole image); its GroupNorm and its 3x3 conv (``add_conv``) are treated above |
| ``KVAEPXSDownsample`` / ``KVAEPXSUpsample`` | local: pixel (un)shuffle by 2, channel mean / repeat, nearest 2x; their convs are treated above |
| ``nn.PixelShuffle`` / ``nn.PixelUnshuffle``, SiLU | local |
| encoder / decoder / resnet blocks, the plain ``nn.Module`` level holders | containers |
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn
from diffusers.models.autoencoders import autoencoder_kl_kvae as kv

from ..core.halo import conv_treatment
from ..core.norm import ShardedGroupNorm
from ..core.plan import Treatment, classify, original_class, sharded_class, unknown_module
from .base import FamilyAdapter, scaling_shift_normalization

__all__ = ["KVAEAdapter", "ADAPTER"]

_LOCAL = (kv.KVAEPXSDownsample, kv.KVAEPXSUpsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.SiLU)
_CONTAINERS = (
    nn.Module,  # the ``down[i]`` / ``up[i]`` / ``mid`` holders: plain nn.Module instances
    nn.ModuleList,
    kv.KVAEEncoder2D,
    kv.KVAEDecoder2D,
    kv.KVAEResnetBlock2D,
    kv.KVAEDecoderSpatialNorm2D,  # its nearest resize to the feature's size is row-local (module docstring)
)


def _treat(name: str, m: nn.Module, parents: dict) -> Optional[Treatment]:
    cls = original_class(m)
    if cls is nn.GroupNorm:
        return Treatment(name, sharded_class(ShardedGroupNorm, cls), "GroupNorm: statistics merged over all rows")
    if cls is nn.Conv2d:
        if m.stride[-2] not in (1, 2):
            raise unknown_module(name, m, f"row stride {m.stride[-2]}")
        return conv_treatment(name, m)
    raise unknown_module(name, m)


class KVAEAdapter(FamilyAdapter):
    name = "kvae"
    model_class = kv.AutoencoderKLKVAE
    video = False

    def plan(self, vae):
        for m in vae.modules():
            if original_class(m) is kv.KVAEResnetBlock2D and hasattr(m, "temb_proj"):
                raise NotImplementedError("parallel_vae: a KVAE resnet with a time embedding is not in the table")
        return classify(vae, _CONTAINERS, _LOCAL, _treat)

    def spatial_factor(self, vae) -> int:
        """2 ** (number of levels - 1): 8 for the default ``ch_mult`` (1, 2, 4, 8)."""
        return 2 ** (len(vae.config.ch_mult) - 1)

    def latent_channels(self, vae) -> int:
        return int(vae.config.z_channels)

    def denormalize(self, vae, z):
        scale, shift = scaling_shift_normalization(vae)  # the config has neither: identity
        return z / scale + shift

    def normalize(self, vae, z):
        scale, shift = scaling_shift_normalization(vae)
        return (z - shift) * scale


ADAPTER = KVAEAdapter()

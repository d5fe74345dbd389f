"""The image VAE wiring: diffusers ``AutoencoderKL`` (SD 1.x/2.x, SDXL, SD3, Flux.1) and ``AutoencoderKLFlux2``.

Both classes wrap the same ``Encoder`` / ``Decoder`` of ``diffusers/models/autoencoders/vae.py`` (4-D images, rows =
dim 2); Flux.2 adds a patchify + BatchNorm latent normalization that pipelines apply outside ``encode``/``decode``.

| module | treatment |
| --- | --- |
| ``nn.Conv2d`` with more than one row of kernel (conv_in/out, resnet conv1/conv2, upsampler conv) | ``HaloConv``: halo rows from the conv's own geometry, the conv's own padding at the global edges |
| ``Downsample2D`` (``F.pad(x, (0, 1, 0, 1))`` + 3x3 stride-2 conv) | ``HaloDownsample2D``: the bottom pad row is the first row of the rank below; zeros on the global last rank |
| ``Upsample2D`` (nearest 2x, then its conv) | the resize is local (output row j reads input row j // 2); its conv gets ``HaloConv`` |
| ``nn.GroupNorm`` (every resnet norm, conv_norm_out, attention group norm) | ``ShardedGroupNorm``: count/mean/M2 merged over the group (Chan), its own backward collective |
| ``Attention`` (mid blocks; single head over all pixels) | ``ShardedAttention``: own queries against all-gathered keys/values |
| 1x1 convs (quant/post-quant, conv_shortcut), linear q/k/v/out, SiLU, dropout | local |
| ``AutoencoderKLFlux2.bn`` (latent BatchNorm) | not called by ``encode``/``decode`` (pipelines apply it to patchified latents); untouched |
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from diffusers.models.activations import GELU
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D

from ..core.attention import ShardedAttention, check_pixel_attention
from ..core.halo import conv_treatment
from ..layers.pad_downsample import HaloDownsample2D
from ..core.norm import ShardedGroupNorm
from ..core.plan import Treatment, classify, original_class, sharded_class, unknown_module
from .base import FamilyAdapter, scaling_shift_normalization

__all__ = ["AutoencoderKLAdapter", "Flux2Adapter"]

_CONTAINERS = (nn.ModuleList, nn.Sequential, Encoder, Decoder, DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D)
_LOCAL = (nn.SiLU, nn.Dropout, nn.Identity, nn.Linear, GELU)


def image_vae_treatment(name: str, m: nn.Module, parents: dict) -> Treatment | None:
    """The shared classification of the 2-D ``Encoder``/``Decoder`` stacks."""
    cls = original_class(m)
    parent = parents.get(id(m))
    if cls is nn.GroupNorm:
        return Treatment(name, sharded_class(ShardedGroupNorm, cls), "GroupNorm: statistics merged over all rows")
    if cls is ResnetBlock2D:
        if m.upsample is not None or m.downsample is not None or m.time_emb_proj is not None:
            raise unknown_module(name, m, "resnet with built-in resampling or a time embedding")
        if m.time_embedding_norm not in ("default", "group"):  # both plain norm2 when there is no time embedding
            raise unknown_module(name, m, f"time_embedding_norm {m.time_embedding_norm!r}")
        return None  # a container: norms, convs and the activation are classified on their own
    if cls is Attention:
        check_pixel_attention(m, name)
        return Treatment(name, sharded_class(ShardedAttention, cls), "attention: own queries, gathered keys/values")
    if cls is Downsample2D:
        if not m.use_conv or m.norm is not None:
            raise unknown_module(name, m, "Downsample2D without a conv, or with a norm")
        if m.padding == 0:
            return Treatment(name, sharded_class(HaloDownsample2D, cls), "pad (0,1,0,1) + stride-2 conv: one row from below")
        return None  # padded conv: the conv itself gets HaloConv
    if cls is Upsample2D:
        if m.use_conv_transpose or not m.interpolate or m.norm is not None or not m.use_conv:
            raise unknown_module(name, m, "only nearest 2x + conv upsampling is supported")
        return None  # nearest 2x is local; the conv gets HaloConv
    if cls is nn.Conv2d:
        if isinstance(parent, Downsample2D) and parent.padding == 0:
            return None  # its input carries the halo row (HaloDownsample2D)
        return conv_treatment(name, m)
    raise unknown_module(name, m)


class AutoencoderKLAdapter(FamilyAdapter):
    name = "autoencoder_kl"
    model_class = AutoencoderKL
    video = False

    def plan(self, vae):
        # A SpatialNorm decoder (norm_type="spatial") is not in the table, so classify() refuses it.
        return classify(vae, _CONTAINERS, _LOCAL, image_vae_treatment)

    def spatial_factor(self, vae) -> int:
        """2**(number of down blocks - 1): 8 for SD/SDXL/SD3/Flux.1."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def latent_channels(self, vae) -> int:
        return int(vae.config.latent_channels)

    def denormalize(self, vae, z):
        scale, shift = scaling_shift_normalization(vae)
        return z / scale + shift

    def normalize(self, vae, z):
        scale, shift = scaling_shift_normalization(vae)
        return (z - shift) * scale


class Flux2Adapter(AutoencoderKLAdapter):
    """Flux.2: the same stacks; pipelines normalize patchified (2x2) latents with the VAE's BatchNorm statistics."""

    name = "flux2"
    model_class = AutoencoderKLFlux2

    def plan(self, vae):
        # bn (BatchNorm2d over patchified latents) is never called by encode/decode: skip it, classify the rest.
        bn = vae.bn
        return [t for t in classify(vae, _CONTAINERS, _LOCAL, lambda n, m, p: None if m is bn else image_vae_treatment(n, m, p))]

    def _bn_stats(self, vae, z):
        p = vae.config.patch_size
        ph, pw = (p, p) if isinstance(p, int) else tuple(p)
        bn = vae.bn
        mean = bn.running_mean.to(z).reshape(1, -1, 1, 1)
        std = torch.sqrt(bn.running_var.to(z).reshape(1, -1, 1, 1) + bn.eps)
        return ph, pw, mean, std

    @staticmethod
    def _patchify(z, ph, pw):
        # (B, C, H, W) -> (B, C * ph * pw, H / ph, W / pw), channel order (C, ph, pw) as the Flux.2 pipeline packs
        b, c, h, w = z.shape
        z = z.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(b, c * ph * pw, h // ph, w // pw)

    @staticmethod
    def _unpatchify(z, ph, pw):
        b, c, h, w = z.shape
        z = z.reshape(b, c // (ph * pw), ph, pw, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(b, c // (ph * pw), h * ph, w * pw)

    def denormalize(self, vae, z):
        """Patchified, BatchNorm-normalized latents (B, 4C, H/2, W/2) -> (B, C, H, W) for ``decode``."""
        ph, pw, mean, std = self._bn_stats(vae, z)
        return self._unpatchify(z * std + mean, ph, pw)

    def normalize(self, vae, z):
        ph, pw, mean, std = self._bn_stats(vae, z)
        return (self._patchify(z, ph, pw) - mean) / std


AUTOENCODER_KL = AutoencoderKLAdapter()
FLUX2 = Flux2Adapter()

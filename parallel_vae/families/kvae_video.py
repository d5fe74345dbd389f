"""The Kandinsky KVAE-Video wiring: diffusers ``AutoencoderKLKVAEVideo`` (Kandinsky 5; 8x spatial, 4x temporal).

A causal video VAE without attention that encodes in chunks of 17, 16, 16, ... pixel frames and decodes the
matching latent chunks, each cached causal conv carrying the last frames of the previous chunk in a cache dict. Its
decoder norms are conditioned on the latents (``KVAECachedSpatialNorm3D``: GroupNorm, then a scale and shift from
the latents resized to the feature's size with nearest interpolation). Spatial convs replicate-pad (the causal
convs) or reflect-pad (the resamplers').

| module | treatment |
| --- | --- |
| ``KVAECachedCausalConv3d`` (conv_in/out, resnet conv1/conv2, the spatial norms' ``add_conv``, the resamplers' temporal convs) | container: diffusers' own forward (replicate pad, frame cache, one or two conv calls) runs on this rank's rows |
| its inner ``KVAESafeConv3d`` with a 3x3 spatial kernel | ``HaloPaddedInnerConv`` (``layers/kvae_cached_conv.py``): the replicate rows the parent padded at inner shard boundaries are replaced by the neighbours' rows (cached frames included); each rank caches its own padded rows |
| its inner ``KVAESafeConv3d`` (3, 1, 1) (temporal convs) | local: no row reach |
| ``KVAESafeConv3d`` (1, 3, 3) reflect (the resamplers' ``spatial_conv``, stride 2 down, 1 up) | ``HaloConv``: one halo row from above (and below, stride 1); reflect at the global edges |
| 1x1x1 ``KVAESafeConv3d`` / ``nn.Conv3d`` (``linear``, ``nin_shortcut``, ``conv_y`` / ``conv_b``) | local |
| ``nn.GroupNorm`` inside ``KVAECachedGroupNorm`` | ``ShardedGroupNorm``: statistics of the chunk merged over the group, as diffusers normalizes each chunk |
| ``KVAECachedSpatialNorm3D`` | container: its nearest resizes of the latents to the feature's (frames, rows, columns) are row-local, because every decoder level holds 2**k rows per latent row on every shard (row i reads latent row i // 2**k on a shard as on the whole frame); the frame resize is the same on every rank |
| ``KVAECachedPXSDownsample`` / ``KVAECachedPXSUpsample`` | local: pixel (un)shuffle by 2, channel mean, frame average / repeat, nearest 2x (shards start on even rows); their convs are treated above |
| ``nn.PixelShuffle`` / ``nn.PixelUnshuffle`` / ``nn.AvgPool3d`` (1, 2, 2) | local |
| encoder / decoder / resnet blocks, ``KVAECachedGroupNorm``, the plain ``nn.Module`` level holders | containers |

Activation checkpointing is refused: diffusers' own (``enable_gradient_checkpointing``) recomputes each resnet block
in backward with the frame caches its forward already advanced, so the recomputed activations are those of another
function: on the unmodified float64 model (5 frames) the input gradient is 0.98 (relative) off the plain one, and a
1-frame clip raises in the recompute ("Kernel size can't be greater than actual input size").

The encoder returns the latents' mean only; ``encode`` pairs it with a zero log-variance (a unit variance), and
so does :meth:`KVAEVideoAdapter.posterior` (:class:`UnitPosterior`) for the sharded paths.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from diffusers.models.autoencoders import autoencoder_kl_kvae_video as kvv
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..core.halo import conv_treatment
from ..core.norm import ShardedGroupNorm
from ..core.plan import Treatment, classify, original_class, sharded_class, unknown_module
from ..layers.kvae_cached_conv import HaloPaddedInnerConv
from .base import FamilyAdapter, scaling_shift_normalization

__all__ = ["KVAEVideoAdapter", "UnitPosterior", "ADAPTER"]

_LOCAL = (
    kvv.KVAECachedPXSDownsample,
    kvv.KVAECachedPXSUpsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.SiLU,
)
_CONTAINERS = (
    nn.Module,  # the ``down[i]`` / ``up[i]`` / ``mid`` holders: plain nn.Module instances
    nn.ModuleList,
    kvv.KVAECachedEncoder3D,
    kvv.KVAECachedDecoder3D,
    kvv.KVAECachedResnetBlock3D,
    kvv.KVAECachedGroupNorm,  # a GroupNorm (treated) and a cache flag
    kvv.KVAECachedSpatialNorm3D,  # its nearest resizes are row-local (module docstring)
    kvv.KVAECachedCausalConv3d,  # its own forward on my rows; its inner conv is treated (checked in _inner_conv)
)
_SEG_LEN = 16  # diffusers' default chunk length (``_encode`` / ``_decode``'s ``seg_len``)


def _inner_conv(name: str, conv: nn.Module, m: nn.Module) -> Optional[Treatment]:
    """The ``KVAESafeConv3d`` at ``name`` inside the ``KVAECachedCausalConv3d`` ``m``."""
    kt, kh, kw = conv.kernel_size
    if tuple(conv.padding) != (0, 0, 0) or conv.padding_mode != "zeros" or conv.stride[1] != 1:
        raise unknown_module(name, m, f"inner conv padding {conv.padding!r} / {conv.padding_mode!r}, stride {conv.stride}")
    if kh != kw or m.height_pad != m.width_pad or m.width_pad != kh // 2 or conv.dilation[1] != 1:
        # diffusers pads rows by width_pad and columns by height_pad: only a square kernel pads as it reads
        raise unknown_module(name, m, f"spatial kernel {kh}x{kw}, pads {m.height_pad}/{m.width_pad}")
    if kh == 1:
        return None  # a temporal conv: no row reach
    why = f"{kh}-row conv of a cached causal conv: the replicate rows at inner boundaries become the neighbours' rows"
    return Treatment(name, sharded_class(HaloPaddedInnerConv, original_class(conv)), why)


def _treat(name: str, m: nn.Module, parents: dict) -> Optional[Treatment]:
    cls = original_class(m)
    parent = parents.get(id(m))
    if cls is nn.GroupNorm:
        return Treatment(name, sharded_class(ShardedGroupNorm, cls), "GroupNorm: statistics merged over all rows")
    if cls is nn.AvgPool3d:
        if tuple(m.kernel_size) != (1, 2, 2) or tuple(m.stride) != (1, 2, 2) or m.padding not in (0, (0, 0, 0)):
            raise unknown_module(name, m)
        return None  # 2x2 blocks: local on even-aligned shards (diffusers' forward does not call it)
    if cls in (kvv.KVAESafeConv3d, nn.Conv3d):
        if parent is not None and original_class(parent) is kvv.KVAECachedCausalConv3d:
            return _inner_conv(name, m, parent)
        if m.kernel_size[0] != 1:
            raise unknown_module(name, m, "a conv with a temporal kernel outside a cached causal conv")
        return conv_treatment(name, m)
    raise unknown_module(name, m)


class UnitPosterior(DiagonalGaussianDistribution):
    """What ``AutoencoderKLKVAEVideo.encode`` returns, ``DiagonalGaussianDistribution(cat([mean, zeros]))`` (a zero
    log-variance: std and variance 1), with ``parameters`` the mean alone, so that the shared paths which gather a
    posterior's ``parameters`` and rebuild it with :meth:`KVAEVideoAdapter.posterior` get it back unchanged."""

    def __init__(self, mean: torch.Tensor):
        self.parameters = self.mean = mean
        self.deterministic = False
        self.logvar = torch.zeros_like(mean)
        self.std = self.var = torch.ones_like(mean)


def _chunks(frames: int, first: int) -> int:
    """Chunks of diffusers' split: ``first`` frames, then ``_SEG_LEN`` each, the last one shorter."""
    return 1 + max(0, -(-(frames - first) // _SEG_LEN))


class KVAEVideoAdapter(FamilyAdapter):
    name = "kvae_video"
    model_class = kvv.AutoencoderKLKVAEVideo
    video = True
    decode_returns_output = False  # its _decode(z) returns the tensor

    def plan(self, vae):
        for m in vae.modules():
            if original_class(m) is kvv.KVAECachedResnetBlock3D and hasattr(m, "temb_proj"):
                raise NotImplementedError("parallel_vae: a KVAE-Video resnet with a time embedding is not in the table")
        return classify(vae, _CONTAINERS, _LOCAL, _treat)

    def spatial_factor(self, vae) -> int:
        """2 ** (number of levels - 1): 8 for the default ``ch_mult`` (1, 2, 4, 8)."""
        return 2 ** (len(vae.config.ch_mult) - 1)

    def latent_channels(self, vae) -> int:
        return int(vae.config.z_channels)

    def temporal_factor(self, vae) -> int:
        return int(vae.config.temporal_compress_times)

    def check_frames(self, vae, frames: int, latent: bool):
        if latent:
            return None if frames >= 1 else f"decode needs at least 1 latent frame, got {frames}"
        k = self.temporal_factor(vae)
        if frames < 1 or (frames - 1) % k:
            return (
                f"KVAE-Video encodes 1 + {k}n pixel frames (1, {1 + k}, {1 + 2 * k}, ...), got {frames} (its temporal "
                f"downsamplers keep the first frame and average the rest in pairs)"
            )
        return None

    def chunks(self, vae, frames: int, decode: bool) -> int:
        """diffusers' ``_encode`` runs chunks of 17, 16, 16, ... pixel frames; ``_decode`` the latent chunks of the
        same pixel spans."""
        if decode:
            return _chunks(self.temporal_factor(vae) * (frames - 1) + 1, _SEG_LEN + 1)
        return _chunks(frames, _SEG_LEN + 1)

    def enable_checkpointing(self, vae, offload: bool = False) -> None:
        raise NotImplementedError(
            "AutoencoderKLKVAEVideo: diffusers' gradient checkpointing recomputes its resnet blocks with the frame "
            "caches already advanced by the forward, so its gradients are those of another function (the unmodified "
            "model's input gradient is 98% off); parallel_vae does not checkpoint this class"
        )

    def posterior(self, moments: torch.Tensor) -> DiagonalGaussianDistribution:
        """``_encode`` gives the mean; ``encode`` pairs it with a zero log-variance: :class:`UnitPosterior`."""
        return UnitPosterior(moments)

    def posterior_of(self, encoded) -> DiagonalGaussianDistribution:
        """The same posterior from what the class's own ``encode`` returns (its mean)."""
        return UnitPosterior(encoded.latent_dist.mean)

    def denormalize(self, vae, z):
        scale, shift = scaling_shift_normalization(vae)  # the config has neither: identity
        return z / scale + shift

    def normalize(self, vae, z):
        scale, shift = scaling_shift_normalization(vae)
        return (z - shift) * scale


ADAPTER = KVAEVideoAdapter()

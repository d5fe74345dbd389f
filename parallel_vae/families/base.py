"""What a family adapter tells the family-agnostic API about one diffusers VAE class.

An adapter is a small object: the module table (``plan``), the geometry (rows per latent row, channels, tensor
rank), and how to call the class's own encoder and decoder on this rank's rows (``encode_local`` /
``decode_local``, which run the class's own ``_encode`` / ``_decode``, so its own frame batching, caches and
temporal tiling run unchanged). The public API in :mod:`parallel_vae.api` does everything else the same way for
every family.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn as nn
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution

from ..core.plan import Treatment

__all__ = ["FamilyAdapter", "PointPosterior"]


class PointPosterior(DiagonalGaussianDistribution):
    """The latents of a deterministic encoder (DC-AE's ``encode`` returns latents, not a distribution) behind the
    posterior's interface, so the shared encode paths, validation and the fine-tuning loop serve it unchanged:
    ``parameters`` are the latents themselves (C channels, not 2C moments), ``mean``, ``mode()`` and ``sample()``
    return them, the variance is zero and ``kl()`` is 0 (diffusers' ``deterministic`` flag)."""

    def __init__(self, latents: torch.Tensor):
        self.parameters = latents
        self.mean = latents
        self.deterministic = True
        self.var = self.std = torch.zeros_like(latents)
        self.logvar = torch.full_like(latents, float("-inf"))


class FamilyAdapter:
    """Base class: one instance per family, registered in :mod:`parallel_vae.families`."""

    #: short name used by recipes (``--seeded NAME:...``) and benchmarks (``--family NAME``)
    name: str = ""
    #: the diffusers class (exact type; subclasses may override forward with spatial reach we have not read)
    model_class: type = nn.Module
    #: 5-D (B, C, T, H, W) videos or 4-D (B, C, H, W) images
    video: bool = True
    #: whether pipelines normalize latents with the config's per-channel ``latents_mean`` / ``latents_std``
    uses_latent_stats: bool = False
    #: whether the class's ``_decode`` returns ``DecoderOutput`` / tuple (``return_dict``) or a bare tensor
    decode_returns_output: bool = True
    #: the method the class's ``decode`` runs the decoder through, which replicated mode replaces on the instance:
    #: ``_decode``, or ``decode`` itself for a class without one (LTX-2.5's diffusion decoder)
    decode_method: str = "_decode"
    #: whether the class encodes (a decoder-only class, LTX-2.5's diffusion decoder, raises on every encode path)
    has_encoder: bool = True

    # --- the module table -----------------------------------------------------------------------------------
    def plan(self, vae: nn.Module) -> list[Treatment]:
        """The treatment of every module of ``vae`` that needs one; raises for a module it does not know."""
        raise NotImplementedError

    # --- geometry -------------------------------------------------------------------------------------------
    def spatial_factor(self, vae: nn.Module) -> int:
        """Pixel rows per latent row."""
        raise NotImplementedError

    def latent_channels(self, vae: nn.Module) -> int:
        raise NotImplementedError

    def pixel_channels(self, vae: nn.Module) -> int:
        return int(vae.config.in_channels)

    def min_latent_rows(self, vae: nn.Module) -> int:
        """Latent rows every rank's shard needs: 1 unless a layer's halo is deeper than one latent row of its level
        (halos come from the adjacent ranks only)."""
        return 1

    @property
    def ndim(self) -> int:
        return 5 if self.video else 4

    def temporal_factor(self, vae: nn.Module) -> Optional[int]:
        """Pixel frames per latent frame (None for image families). Default: the config's
        ``temporal_compression_ratio`` (HunyuanVideo, HunyuanVideo-1.5)."""
        if not self.video:
            return None
        return int(vae.config.temporal_compression_ratio)

    def usable_frames(self, vae: nn.Module, frames: int) -> int:
        """How many leading frames of a clip the causal encoder turns into whole latent frames (1 + k x factor)."""
        tf = self.temporal_factor(vae) or 1
        return 1 + (frames - 1) // tf * tf

    def latent_frames(self, vae: nn.Module, frames: int) -> int:
        tf = self.temporal_factor(vae) or 1
        return 1 + (frames - 1) // tf

    def progress_total(self, vae: nn.Module, x: torch.Tensor, decode: bool) -> int:
        """How many times the decoder (``decode``) or encoder runs for ``x``: the progress bar's total. Once per
        sample with diffusers' ``enable_slicing`` (a batch of more than one), times :meth:`chunks` per sample."""
        slices = x.shape[0] if getattr(vae, "use_slicing", False) and x.shape[0] > 1 else 1
        return slices * self.chunks(vae, x.shape[2] if self.video else 1, decode)

    def chunks(self, vae: nn.Module, frames: int, decode: bool) -> int:
        """How many times the class's own ``_decode`` (``decode``; ``frames``: latent frames) or ``_encode``
        (pixel frames) runs the decoder / encoder on one sample: once, unless the family splits time."""
        return 1

    def check_frames(self, vae: nn.Module, frames: int, latent: bool) -> Optional[str]:
        """A message if ``frames`` cannot be encoded/decoded by this family (None if fine). Video families only."""
        return None

    # --- the class's own encoder/decoder on local rows ----------------------------------------------------------
    def encode_local(self, vae: nn.Module, x: torch.Tensor, **extra) -> torch.Tensor:
        """The class's own ``_encode`` (posterior moments) on this rank's rows; ``extra``: the class's own further
        ``_encode`` arguments (LTX-2's ``causal``), as :meth:`call_args` found them."""
        return type(vae)._encode(vae, x, **extra)

    def decode_local(self, vae: nn.Module, z: torch.Tensor, **extra) -> torch.Tensor:
        """The class's own ``_decode`` on this rank's latent rows, as a tensor; ``extra``: the class's own further
        ``_decode`` arguments (LTX's ``temb``, LTX-2's ``causal``), as :meth:`call_args` found them."""
        if self.decode_returns_output:
            return type(vae)._decode(vae, z, return_dict=False, **extra)[0]
        return type(vae)._decode(vae, z, **extra)

    def call_args(self, vae: nn.Module, method: str, args: tuple, kwargs: dict) -> tuple[dict, bool]:
        """(further keyword arguments, return_dict) of a call ``vae.<method>(x, *args, **kwargs)`` of the class's own
        ``_encode`` / ``_decode``, bound to that method's signature, so an argument the class's ``encode``/``decode``
        passes positionally (LTX: ``self._decode(z, temb)``) is not mistaken for ``return_dict``."""
        bound = inspect.signature(getattr(type(vae), method)).bind(vae, None, *args, **kwargs)
        names = list(bound.signature.parameters)[2:]
        extra = {name: bound.arguments[name] for name in names if name in bound.arguments}
        return_dict = extra.pop("return_dict", True)
        return extra, return_dict

    def default_decode_kwargs(self, vae: nn.Module, z: torch.Tensor) -> dict:
        """Further ``decode`` arguments the recipes and :func:`parallel_vae.decode_video` pass: what the family's
        pipelines pass by default (none for most families)."""
        return {}

    def wrap_decoded(self, sample: torch.Tensor, return_dict: bool = True):
        """The value the class's own ``_decode`` returns for ``sample``."""
        if not self.decode_returns_output:
            return sample
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    # --- what the encoder gives ------------------------------------------------------------------------------
    #: whether ``encode`` returns latents (no distribution, nothing to sample, no KL term): DC-AE
    deterministic: bool = False

    def posterior(self, moments: torch.Tensor) -> DiagonalGaussianDistribution:
        """The posterior over latents from what :meth:`encode_local` returns (rows may be any shard)."""
        return PointPosterior(moments) if self.deterministic else DiagonalGaussianDistribution(moments)

    def posterior_of(self, encoded) -> DiagonalGaussianDistribution:
        """The posterior in what the class's own ``encode`` returns (``AutoencoderKLOutput`` or ``EncoderOutput``)."""
        return PointPosterior(encoded.latent) if self.deterministic else encoded.latent_dist

    # --- tiling and activation checkpointing ----------------------------------------------------------------
    def tiling_enabled(self, vae: nn.Module) -> bool:
        return bool(getattr(vae, "use_tiling", False))

    def checkpointed_blocks(self, vae: nn.Module) -> list[tuple[str, nn.Module]]:
        """Blocks whose activations :func:`parallel_vae.enable_gradient_checkpointing` recomputes in backward."""
        return []

    def enable_checkpointing(self, vae: nn.Module, offload: bool = False) -> None:
        """Default: diffusers' own gradient checkpointing, where the class supports it (halo exchanges inside a
        recomputed block run again in backward on every rank in the same order, so they pair up). ``offload``:
        the checkpoints' saved inputs go to host memory (``checkpointing.offload_saved_tensors``)."""
        if not getattr(vae, "_supports_gradient_checkpointing", False):
            raise NotImplementedError(f"{type(vae).__name__} has no activation checkpointing in parallel_vae")
        vae.enable_gradient_checkpointing(_offloaded_checkpoint if offload else None)

    def disable_checkpointing(self, vae: nn.Module) -> None:
        if getattr(vae, "_supports_gradient_checkpointing", False):
            vae.disable_gradient_checkpointing()

    # --- latent normalization (what pipelines apply; recipes' --latents_normalized undoes it) ---------------------
    def denormalize(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """Pipeline-normalized latents -> the latents ``vae.decode`` takes."""
        raise NotImplementedError

    def normalize(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`denormalize`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} for {self.model_class.__name__}>"


def temporal_tiles(frames: int, min_frames: int, stride: int) -> int:
    """Tiles of diffusers' ``_temporal_tiled_encode`` / ``_temporal_tiled_decode`` (HunyuanVideo, LTX): one per
    ``range(0, frames, stride)`` once ``frames`` exceeds ``min_frames``, else one plain call."""
    return -(-frames // stride) if frames > min_frames else 1


class ScalingFactorLatents:
    """Latent normalization by the config's ``scaling_factor`` alone, no shift: the pipelines decode
    ``latents / scaling_factor`` (CogVideoX, HunyuanVideo-1.5, HunyuanImage-2.1 and its refiner). Put it before
    :class:`FamilyAdapter` in an adapter's bases."""

    def denormalize(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
        scale, _ = scaling_shift_normalization(vae)
        return z / scale

    def normalize(self, vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
        scale, _ = scaling_shift_normalization(vae)
        return z * scale


def scaling_shift_normalization(vae: nn.Module) -> tuple[float, float]:
    """(scaling_factor, shift_factor) from the config: pipelines use ``(z - shift) * scale``."""
    cfg = vae.config
    scale = getattr(cfg, "scaling_factor", None)
    shift = getattr(cfg, "shift_factor", None)
    return (1.0 if scale is None else float(scale)), (0.0 if shift is None else float(shift))


def mean_std_normalization(vae: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) broadcastable over (B, C, T, H, W) from the config's ``latents_mean`` / ``latents_std``."""
    cfg = vae.config
    c = z.shape[1]
    shape = (1, c) + (1,) * (z.dim() - 2)
    mean = torch.tensor(cfg.latents_mean, dtype=z.dtype, device=z.device).reshape(shape)
    std = torch.tensor(cfg.latents_std, dtype=z.dtype, device=z.device).reshape(shape)
    return mean, std


def _offloaded_checkpoint(module, *args):
    """diffusers' default checkpointing function (non-reentrant), with the saved inputs in host memory."""
    from torch.utils.checkpoint import checkpoint

    from ..checkpointing import offload_saved_tensors

    with offload_saved_tensors():
        return checkpoint(module.__call__, *args, use_reentrant=False)

"""One adapter per VAE family: which module of the family's diffusers class gets which treatment, and why.

``adapter_for(vae)`` finds the adapter of a model by its exact class; the module-level helpers (``spatial_factor``,
``latent_channels``, ``pixel_channels``, ``plan_for``) dispatch to it. Adding a family is one file with a module
table and an entry in ``_ADAPTERS``.
"""

from __future__ import annotations

import torch.nn as nn

from ..core.plan import Treatment
from .autoencoder_kl import AUTOENCODER_KL, FLUX2
from .base import FamilyAdapter
from .cogvideox import ADAPTER as COGVIDEOX
from .dc_ae import ADAPTER as DCAE
from .hunyuan_video import ADAPTER as HUNYUANVIDEO
from .hunyuan_video15 import ADAPTER as HUNYUANVIDEO15
from .hunyuanimage import ADAPTER as HUNYUANIMAGE
from .hunyuanimage_refiner import ADAPTER as HUNYUANIMAGE_REFINER
from .kvae import ADAPTER as KVAE
from .kvae_video import ADAPTER as KVAE_VIDEO
from .ltx import LTX2, LTXVIDEO
from .ltx2_diffusion import ADAPTER as LTX2DIFFUSION
from .cosmos import ADAPTER as COSMOS
from .mochi import ADAPTER as MOCHI
from .qwenimage import ADAPTER as QWENIMAGE
from .qwenimage21 import ADAPTER as QWENIMAGE21
from .wan import ADAPTER as WAN
from .minimax_h3 import ADAPTER as MINIMAX_H3

__all__ = [
    "FAMILIES",
    "FamilyAdapter",
    "adapter_for",
    "adapter_named",
    "plan_for",
    "spatial_factor",
    "latent_channels",
    "pixel_channels",
    "is_video",
]

_ADAPTERS: tuple[FamilyAdapter, ...] = (
    WAN, QWENIMAGE, AUTOENCODER_KL, FLUX2, HUNYUANVIDEO, HUNYUANVIDEO15, COGVIDEOX, DCAE, LTXVIDEO, LTX2, MOCHI,
    QWENIMAGE21,
    HUNYUANIMAGE,
    HUNYUANIMAGE_REFINER,
    KVAE,
    KVAE_VIDEO,
    MINIMAX_H3,
    LTX2DIFFUSION,
    COSMOS,
)  # fmt: skip

#: name -> adapter (recipes' ``--seeded NAME:...``, benchmarks' ``--family NAME``)
FAMILIES: dict[str, FamilyAdapter] = {a.name: a for a in _ADAPTERS}
_BY_CLASS: dict[type, FamilyAdapter] = {a.model_class: a for a in _ADAPTERS}


def adapter_for(vae: nn.Module) -> FamilyAdapter:
    """The adapter of ``vae``'s exact class; a TypeError naming the supported classes otherwise."""
    adapter = _BY_CLASS.get(type(vae))
    if adapter is None:
        names = ", ".join(sorted(c.__name__ for c in _BY_CLASS))
        raise TypeError(f"parallel_vae supports the diffusers classes {names}; got {type(vae).__name__}")
    return adapter


def adapter_named(name: str) -> FamilyAdapter:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown VAE family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def plan_for(vae: nn.Module) -> list[Treatment]:
    """The treatment of every module of ``vae`` that needs one; raises for a module its adapter does not know."""
    return adapter_for(vae).plan(vae)


def spatial_factor(vae: nn.Module) -> int:
    """Pixel rows per latent row (8 for Wan2.1 and AutoencoderKL, 16 for Wan2.2 and HunyuanVideo-1.5...)."""
    return adapter_for(vae).spatial_factor(vae)


def latent_channels(vae: nn.Module) -> int:
    return adapter_for(vae).latent_channels(vae)


def pixel_channels(vae: nn.Module) -> int:
    return adapter_for(vae).pixel_channels(vae)


def is_video(vae: nn.Module) -> bool:
    """Whether the family takes 5-D videos (True) or 4-D images (False)."""
    return adapter_for(vae).video

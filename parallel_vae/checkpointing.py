"""Activation (gradient) checkpointing that is correct with halo exchanges, and with causal frame caches.

``enable_gradient_checkpointing(vae)`` asks the family's adapter. Families whose diffusers class supports
checkpointing (``AutoencoderKL``, ``AutoencoderKLFlux2``, HunyuanVideo) use diffusers' own; Wan-style models
(Wan, Qwen-Image), which diffusers marks as unsupported, use the cache-aware checkpoint that lives with their
causal-cache conv, in :mod:`parallel_vae.layers.causal_cache_conv`.

Halo exchanges inside a recomputed block run again during backward, on every rank of the spatial group, in the
same order (the autograd graph has the same structure on every rank), so they pair up like the forward's.
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["enable_gradient_checkpointing", "disable_gradient_checkpointing"]


def enable_gradient_checkpointing(vae: nn.Module) -> nn.Module:
    """Checkpoint the encoder/decoder blocks of a supported VAE (parallel or not), in place; returns ``vae``.

    Activations inside each block are recomputed during backward instead of stored; only block inputs (and causal
    caches) are kept. Has no effect under ``torch.no_grad()``."""
    from .families import adapter_for

    adapter_for(vae).enable_checkpointing(vae)
    return vae


def disable_gradient_checkpointing(vae: nn.Module) -> nn.Module:
    """Undo :func:`enable_gradient_checkpointing`. Returns ``vae``."""
    from .families import adapter_for

    adapter_for(vae).disable_checkpointing(vae)
    return vae

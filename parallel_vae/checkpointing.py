"""Activation (gradient) checkpointing that is correct with halo exchanges, and with causal frame caches.

``enable_gradient_checkpointing(vae)`` asks the family's adapter. Families whose diffusers class supports
checkpointing (``AutoencoderKL``, ``AutoencoderKLFlux2``, HunyuanVideo) use diffusers' own; Wan-style models
(Wan, Qwen-Image), which diffusers marks as unsupported, use the cache-aware wrapper below.

diffusers marks ``AutoencoderKLWan`` as not supporting gradient checkpointing, and a naive ``checkpoint(block, x,
feat_cache, feat_idx)`` is wrong: the block mutates the shared ``feat_cache`` list and ``feat_idx`` counter in place,
so the recomputation during backward would read the caches of a *later* chunk. Here each checkpointed block runs
on a private copy of the cache list taken at the call (a snapshot of references, no tensor copies), and returns the
updated cache entries as outputs of the checkpointed region; the caller's list and counter are updated from them.
The recomputation therefore sees exactly the inputs of the original call.

Halo exchanges inside a recomputed block run again during backward, on every rank of the spatial group, in the
same order (the autograd graph has the same structure on every rank), so they pair up like the forward's.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "enable_gradient_checkpointing",
    "disable_gradient_checkpointing",
    "enable_cache_checkpointing",
    "disable_cache_checkpointing",
]

_FLAG = "_pv_checkpointed"


def _checkpointed_forward(block: nn.Module, x, feat_cache=None, feat_idx=None, *args, **kwargs):
    # Wan passes the cache by keyword, Qwen-Image positionally (x, feat_cache, feat_idx): both bind here.
    forward = type(block).forward  # the class's own forward; this function is the instance's override
    if not torch.is_grad_enabled():
        if feat_cache is None:
            return forward(block, x, *args, **kwargs)
        return forward(block, x, *args, feat_cache=feat_cache, feat_idx=feat_idx, **kwargs)
    if feat_cache is None:
        return checkpoint(forward, block, x, *args, use_reentrant=False, **kwargs)
    snapshot = list(feat_cache)  # references only: the recomputation must see this call's caches
    start = feat_idx[0]

    def run(x):
        cache, idx = list(snapshot), [start]
        out = forward(block, x, *args, feat_cache=cache, feat_idx=idx, **kwargs)
        return out, cache, idx[0]

    out, cache, end = checkpoint(run, x, use_reentrant=False)
    feat_cache[:] = cache
    feat_idx[0] = end
    return out


def enable_cache_checkpointing(blocks: list[tuple[str, nn.Module]]) -> None:
    """Checkpoint each block, whose forward takes ``feat_cache``/``feat_idx`` (Wan-style), with the cache snapshot."""
    for _, block in blocks:
        if not block.__dict__.get(_FLAG):
            # An instance attribute shadows the class's forward; partial (not a bound method) deep-copies cleanly.
            block.forward = functools.partial(_checkpointed_forward, block)
            block.__dict__[_FLAG] = True


def disable_cache_checkpointing(blocks: list[tuple[str, nn.Module]]) -> None:
    for _, block in blocks:
        if block.__dict__.pop(_FLAG, False):
            block.__dict__.pop("forward", None)


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

"""Activation (gradient) checkpointing of the Wan encoder/decoder blocks that is correct with causal caches and
halo exchanges.

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

__all__ = ["enable_gradient_checkpointing", "disable_gradient_checkpointing", "checkpointed_blocks"]

_FLAG = "_pv_checkpointed"


def checkpointed_blocks(vae: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks that are checkpointed: every encoder down block and mid block, every decoder up block and mid
    block (the stem and head convolutions are single layers and stay as they are)."""
    blocks = [(f"encoder.down_blocks.{i}", b) for i, b in enumerate(vae.encoder.down_blocks)]
    blocks.append(("encoder.mid_block", vae.encoder.mid_block))
    blocks.append(("decoder.mid_block", vae.decoder.mid_block))
    blocks += [(f"decoder.up_blocks.{i}", b) for i, b in enumerate(vae.decoder.up_blocks)]
    return blocks


def _checkpointed_forward(block: nn.Module, x, *args, feat_cache=None, feat_idx=None, **kwargs):
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


def enable_gradient_checkpointing(vae: nn.Module) -> nn.Module:
    """Checkpoint the encoder/decoder blocks of an ``AutoencoderKLWan`` (parallel or not), in place.

    Activations inside each block are recomputed during backward instead of stored; only block inputs and causal
    caches are kept. Has no effect under ``torch.no_grad()``. Returns ``vae``.
    """
    for _, block in checkpointed_blocks(vae):
        if not block.__dict__.get(_FLAG):
            # An instance attribute shadows the class's forward; partial (not a bound method) deep-copies cleanly.
            block.forward = functools.partial(_checkpointed_forward, block)
            block.__dict__[_FLAG] = True
    return vae


def disable_gradient_checkpointing(vae: nn.Module) -> nn.Module:
    """Undo :func:`enable_gradient_checkpointing`. Returns ``vae``."""
    for _, block in checkpointed_blocks(vae):
        if block.__dict__.pop(_FLAG, False):
            block.__dict__.pop("forward", None)
    return vae

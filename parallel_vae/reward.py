"""Reward gradients through a frozen parallel VAE: decode latents into pixels with the gradient flowing to the
latents only, for fine-tuning a diffusion model on a pixel-space reward (docs/training.md).

The decode is the ordinary sharded or replicated one; what this adds is the contract a reward loop relies on,
checked before anything runs: the VAE is frozen (no parameter collects a gradient, so backward computes no weight
gradients and holds none), and the latents require grad (else the reward's backward would reach nothing).
"""

from __future__ import annotations

import torch

from .api import is_spatially_parallel, sharded_decode

__all__ = ["decode_for_reward"]


def decode_for_reward(vae, z: torch.Tensor, *, sharded: bool = True, **kwargs) -> torch.Tensor:
    """Decode ``z`` with a frozen ``vae``; the result's gradient flows to ``z`` only.

    ``sharded=True``: ``z`` is this rank's latent rows (``pv.shard_latents``) and the result this rank's pixel rows;
    a reward over the rows is then summed over the group (``pv.sharded_loss`` scales it for DDP), and ``z.grad`` is
    this rank's rows of the single-process gradient. ``sharded=False``: ``z`` is the full latents, the same on every
    rank, and the result the full decoded tensor on every rank. ``kwargs``: the class's further ``decode`` arguments.

    Raises ``ValueError`` if a parameter of ``vae`` requires grad (freeze it: ``vae.requires_grad_(False)``) or if
    ``z`` does not require grad. Memory: combine with ``pv.enable_gradient_checkpointing(vae)``."""
    trainable = [n for n, p in vae.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"decode_for_reward needs a frozen VAE, but {len(trainable)} parameters require grad (first: "
            f"{trainable[0]}): call vae.requires_grad_(False) once before the loop"
        )
    if not z.requires_grad:
        raise ValueError("decode_for_reward: the latents do not require grad, so no reward gradient would reach them")
    if sharded and is_spatially_parallel(vae):
        return sharded_decode(vae, z, **kwargs)
    return vae.decode(z, **kwargs).sample

"""Activation (gradient) checkpointing that is correct with halo exchanges, and with causal frame caches.

``enable_gradient_checkpointing(vae)`` asks the family's adapter. Families whose diffusers class supports
checkpointing (``AutoencoderKL``, ``AutoencoderKLFlux2``, HunyuanVideo) use diffusers' own; Wan-style models
(Wan, Qwen-Image), which diffusers marks as unsupported, use the cache-aware checkpoint that lives with their
causal-cache conv, in :mod:`parallel_vae.layers.causal_cache_conv`.

Halo exchanges inside a recomputed block run again during backward, on every rank of the spatial group, in the
same order (the autograd graph has the same structure on every rank), so they pair up like the forward's.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn as nn

__all__ = ["enable_gradient_checkpointing", "disable_gradient_checkpointing", "offload_saved_tensors"]

_HOST = threading.local()


def host_allocation() -> bool:
    """Whether the current allocation is an offloaded copy in host memory (``fake_run.LiveBytes`` skips those, so
    the table counts device bytes only, as on a GPU)."""
    return getattr(_HOST, "active", False)


@contextlib.contextmanager
def _on_host():
    previous = host_allocation()
    _HOST.active = True
    try:
        yield
    finally:
        _HOST.active = previous


def _pack(t: torch.Tensor):
    # step 1: a host buffer (pinned for a CUDA tensor, so the copy is asynchronous on the current stream and
    # overlaps the forward's next kernels; stream order keeps it safe when the device memory is reused).
    with _on_host():
        # empty_like keeps the strides: a contiguous copy of a transposed or channels-last tensor would send
        # backward's kernels down another path (float64 gradients 7e-15 off the stored ones, measured).
        host = torch.empty_like(t, device="cpu", pin_memory=t.is_cuda)
        host.copy_(t, non_blocking=t.is_cuda)
    return t.device, host


def _unpack(packed) -> torch.Tensor:
    # step 2, in backward: a fresh device copy (a copy on CPU too, so CPU measurements see what a GPU allocates).
    device, host = packed
    return host.to(device, non_blocking=device.type == "cuda", copy=True)


def offload_saved_tensors():
    """Context: tensors saved for backward inside it are kept in host memory and copied back when backward needs
    them (``torch.autograd.graph.save_on_cpu(pin_memory=True)``, which this is, plus the host-allocation flag)."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


def enable_gradient_checkpointing(vae: nn.Module, *, offload: bool = False) -> nn.Module:
    """Checkpoint the encoder/decoder blocks of a supported VAE (parallel or not), in place; returns ``vae``.

    Activations inside each block are recomputed during backward instead of stored; only block inputs (and causal
    caches) are kept, and are freed as backward passes them. Has no effect under ``torch.no_grad()``.

    ``offload``: what the checkpoints keep (block inputs; for Wan-style models also the caches each chunk starts
    from) lives in host memory, pinned, from the forward until backward needs it; the copies to the host overlap
    the forward. Device memory then holds one block's recomputation and what runs outside the blocks. Costs a
    device-to-host and a host-to-device copy of each kept tensor (measured in docs/training.md)."""
    from .families import adapter_for

    adapter_for(vae).enable_checkpointing(vae, offload=offload)
    return vae


def disable_gradient_checkpointing(vae: nn.Module) -> nn.Module:
    """Undo :func:`enable_gradient_checkpointing`. Returns ``vae``."""
    from .families import adapter_for

    adapter_for(vae).disable_checkpointing(vae)
    return vae

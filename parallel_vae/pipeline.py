"""The video encode/decode path shared by ``recipes/decode.py``, the fine-tuning validation and users' own loops.

One function each way, working on replicated (full) or sharded (this rank's rows) inputs, with or without
spatial parallelism enabled, with an optional progress bar over the model's temporal chunks on the main rank.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ._deps import import_optional
from .api import (
    agreed_sizes,
    gather_shards,
    is_spatially_parallel,
    shard_latents,
    shard_video,
    sharded_decode,
    sharded_encode,
    spatial_size,
)
from .core.comm import group_rank
from .families import adapter_for

__all__ = ["decode_video", "encode_video"]


@contextlib.contextmanager
def _chunk_progress(module: torch.nn.Module, total: int, desc: str, enabled: bool):
    """Advance a tqdm bar each time ``module`` runs (e.g. the Wan decoder runs once per latent frame, the encoder once
    per 1 + 4k frame chunk); ``total``: the adapter's ``progress_total``, so every bar has one."""
    if not enabled:
        yield
        return
    tqdm = import_optional("tqdm.auto", "recipes", "progress=True").tqdm

    bar = tqdm(total=total, desc=desc, unit="chunk", leave=False)

    def advance(*_):
        # A forward hook's return value replaces the module's output, and tqdm.update returns True whenever it
        # redraws: return None explicitly, or the encoder/decoder output becomes a bool.
        if bar.n >= bar.total:  # diffusers tiling (without spatial parallelism) runs it once more per tile
            bar.total = bar.n + 1
        bar.update(1)
        return None

    handle = module.register_forward_hook(advance)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


def decode_video(
    vae,
    latents: torch.Tensor,
    *,
    sharded: bool = False,
    gather: bool = True,
    progress: bool = False,
    grad: bool = False,
) -> torch.Tensor:
    """Decode latents to a video (or images) in [-1, 1] through the spatially parallel path.

    Arguments:
        vae: a VAE of a supported family, parallelized with :func:`enable_spatial_parallelism` or not.
        latents: (B, C, T, h, w) (videos) or (B, C, h, w) (images) un-normalized latents: the whole latent on every
            rank of the spatial group
            (``sharded=False``), or this rank's latent rows (``sharded=True``, e.g. from ``sharded_encode``).
        sharded: whether ``latents`` holds only this rank's rows.
        gather: return the whole video on every rank (``True``) or only this rank's pixel rows (``False``).
        progress: show a progress bar over latent frames on the global main rank.
        grad: keep the autograd graph (default off: decoding for inference or validation).

    Returns:
        (B, C, [frames,] h * factor, w * factor) (Wan: 1 + 4 (T - 1) frames), or this rank's rows of it when
        ``gather=False``.
    """
    parallel = is_spatially_parallel(vae) and spatial_size(vae) > 1
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    total = adapter_for(vae).progress_total(vae, latents, decode=True)
    kwargs = adapter_for(vae).default_decode_kwargs(vae, latents)  # e.g. LTX's decode timestep
    with torch.set_grad_enabled(grad), _chunk_progress(vae.decoder, total, "decode", progress and group_rank(None) == 0):
        if not parallel:
            return vae.decode(latents, **kwargs).sample
        local = latents if sharded else shard_latents(vae, latents)
        out = sharded_decode(vae, local, **kwargs)
        # the rows of the decode just agreed on: no second all-gather of sizes (a host read on GPUs)
        return gather_shards(vae, out, sizes=agreed_sizes(vae, out)) if gather else out


def encode_video(
    vae,
    video: torch.Tensor,
    *,
    sharded: bool = False,
    gather: bool = True,
    progress: bool = False,
    grad: bool = False,
) -> DiagonalGaussianDistribution:
    """Encode a video (B, C, T, H, W) or images (B, C, H, W) in [-1, 1] into the posterior over latents.

    ``video`` is the whole video (``sharded=False``) or this rank's pixel rows (``sharded=True``); the posterior
    covers all latent rows (``gather=True``) or this rank's (``gather=False``). Other arguments as in
    :func:`decode_video`.
    """
    parallel = is_spatially_parallel(vae) and spatial_size(vae) > 1
    video = video.to(device=vae.device, dtype=vae.dtype)
    chunks = adapter_for(vae).progress_total(vae, video, decode=False)
    with torch.set_grad_enabled(grad), _chunk_progress(vae.encoder, chunks, "encode", progress and group_rank(None) == 0):
        adapter = adapter_for(vae)
        if not parallel:
            return adapter.posterior_of(vae.encode(video))
        local = video if sharded else shard_video(vae, video)
        posterior = sharded_encode(vae, local)
        if not gather:
            return posterior
        params = posterior.parameters
        return adapter.posterior(gather_shards(vae, params, sizes=agreed_sizes(vae, params)))

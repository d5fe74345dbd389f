"""Training on the sharded path: hybrid data x spatial layouts, the module that DDP/DeepSpeed wrap, and the loss.

A world of D x S ranks forms D spatial groups of S consecutive ranks; the data-parallel replicas are the ranks with
the same position in each spatial group (docs/how-it-works.md, "Process groups and devices"). Every rank of a spatial
group holds the same clip and keeps only its rows; DDP / DeepSpeed average gradients over all D x S ranks, and
:func:`sharded_loss` scales each rank's part of the loss so that the average is the single-process gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..api import local_rows, sharded_decode, sharded_encode
from ..families import adapter_for
from ..loss import sharded_loss

__all__ = [
    "HybridLayout",
    "hybrid_layout",
    "ShardedAutoencoder",
    "vae_loss",
    "posterior_noise",
    "batch_indices",
    "sample_seeds",
    "latent_statistics",
]


@dataclass(frozen=True)
class HybridLayout:
    """This rank's place in a D (data-parallel) x S (spatial) layout."""

    world: int
    sp_degree: int
    dp_degree: int
    rank: int
    sp_rank: int
    dp_rank: int
    spatial_group: Optional[dist.ProcessGroup]

    def describe(self) -> dict:
        return {
            "world_size": self.world,
            "sp_degree": self.sp_degree,
            "dp_degree": self.dp_degree,
            "spatial_groups": [list(range(d * self.sp_degree, (d + 1) * self.sp_degree)) for d in range(self.dp_degree)],
        }


def hybrid_layout(sp_degree: int) -> HybridLayout:
    """Create the D x S process groups (every rank creates every group: ``new_group`` is collective).

    Raises ``ValueError`` (the same on every rank, no collective involved) if ``sp_degree`` does not divide the
    world size.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if sp_degree < 1 or world % sp_degree:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(f"--sp_degree {sp_degree} does not divide the world size {world}; use one of {divisors}")
    dp = world // sp_degree
    # No data-parallel groups: DDP and DeepSpeed reduce gradients over the whole world (see sharded_loss).
    spatial = None
    if dist.is_initialized():
        for d in range(dp):
            g = dist.new_group(list(range(d * sp_degree, (d + 1) * sp_degree)))
            if rank // sp_degree == d:
                spatial = g
    return HybridLayout(world, sp_degree, dp, rank, rank % sp_degree, rank // sp_degree, spatial)


class ShardedAutoencoder(nn.Module):
    """What DDP / DeepSpeed wrap: encode this rank's rows, sample or take the mode, decode this rank's rows.

    Wrapping this module (not calling the VAE directly) is what lets DDP prepare its gradient reduction in
    ``forward``. The VAE must have spatial parallelism enabled over the spatial group (a group of one is fine).
    """

    def __init__(self, vae: nn.Module, train_encoder: bool = True):
        super().__init__()
        self.vae = vae
        self.train_encoder = train_encoder

    def forward(self, x_local: torch.Tensor, noise_local: Optional[torch.Tensor] = None):
        """Returns ``(reconstruction rows, posterior moments rows)``: (B, C, T, H_r, W) and (B, 2 z, t, h_r, w) (a
        deterministic encoder's latents, (B, z, h_r, w), for DC-AE)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
            moments = sharded_encode(self.vae, x_local).parameters
        posterior = adapter_for(self.vae).posterior(moments)
        z = posterior.mean if noise_local is None else posterior.mean + posterior.std * noise_local.to(moments.dtype)
        kwargs = adapter_for(self.vae).default_decode_kwargs(self.vae, z)  # e.g. LTX's decode timestep
        return sharded_decode(self.vae, z, **kwargs), moments


def posterior_noise(
    vae: nn.Module, latent_shape: tuple, seeds: list[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Posterior sampling noise for this rank's latent rows, identical to the rows of the full-size noise a single
    process would draw: sample b of the batch uses ``torch.Generator().manual_seed(seeds[b])`` over the full
    latent (C, [T,] h, w), and this rank keeps its rows. So the layout (D, S) does not change the samples."""
    h = latent_shape[-2]
    start, count = local_rows(vae, h)
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        full = torch.randn(tuple(latent_shape), generator=g, dtype=torch.float64)
        out.append(full.narrow(-2, start, count))
    return torch.stack(out).to(device=device, dtype=dtype)


def vae_loss(
    recon_local: torch.Tensor,
    target_local: torch.Tensor,
    moments_local: torch.Tensor,
    *,
    numel: int,
    group,
    l1: float = 1.0,
    mse: float = 0.0,
    kl: float = 1e-6,
    averaged: bool = True,
    deterministic: bool = False,
) -> tuple[torch.Tensor, dict]:
    """The per-rank training loss and its local parts.

    Single-process meaning: ``(l1 * sum|x - x_hat| + mse * sum (x - x_hat)^2 + kl * KL) / numel``, where the sums
    run over the whole batch of this replica (``numel`` pixel elements) and KL is the posterior's KL to N(0, I)
    summed over the batch's latent elements. Every term has the same normalization, so the weights mean what they
    mean in latent-diffusion VAE training, whose loss sums per sample (``kl=1e-6`` there is ``kl=1e-6`` here). The
    reconstruction terms are the usual means. Normalizing the KL per *sample* instead would make ``kl=1e-6``
    about 3*T*H*W times stronger. With a video's millions of latent elements it would outweigh the reconstruction
    and pull a pretrained Wan VAE's latents toward zero; from scratch it collapses the latents (measured: a
    constant encoder output after 2000 steps on the synthetic data).

    Each rank computes its rows' sums and :func:`~parallel_vae.loss.sharded_loss` scales them (``averaged`` as
    there). Returns ``(loss for backward, parts)``, where ``parts`` holds this rank's unscaled sums (``l1_sum``,
    ``mse_sum``, ``kl_sum``) for logging. Summed over the spatial group and divided by ``numel`` (or by the batch
    size, for a per-sample KL), they give the replica's values.

    ``deterministic``: ``moments_local`` are a deterministic encoder's latents (DC-AE); there is no posterior to
    regularize, so the KL term is 0 whatever ``kl`` says.
    """
    diff = recon_local - target_local
    if deterministic:
        kl_sum = moments_local.new_zeros(())
    else:
        posterior = DiagonalGaussianDistribution(moments_local)
        # KL(N(mean, var) || N(0, 1)) per latent element; diffusers' .kl() sums only dims 1-3 of 5-D latents.
        kl_sum = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).sum()
    parts = {"l1_sum": diff.abs().sum(), "mse_sum": diff.pow(2).sum(), "kl_sum": kl_sum}
    total = 0
    for weight, name in ((l1, "l1_sum"), (mse, "mse_sum"), (kl, "kl_sum")):
        if weight:
            total = total + weight * parts[name]
    loss = sharded_loss(total, numel=numel, group=group, averaged=averaged)
    return loss, {k: v.detach() for k, v in parts.items()}


def batch_indices(step: int, replica: int, replicas: int, batch: int, length: int, seed: int) -> list[int]:
    """Dataset indices of ``replica``'s batch at optimizer step ``step``: a pure function of its arguments, so a
    resumed run reads exactly the clips the uninterrupted run would have, and every spatial rank of a replica reads
    the same clips. Global batch = ``replicas * batch`` consecutive entries of a per-epoch seeded permutation;
    replica d takes slice d."""
    per_step = replicas * batch
    if per_step > length:
        raise ValueError(f"a global batch of {per_step} clips needs at least that many clips; the dataset has {length}")
    steps_per_epoch = length // per_step  # drop the incomplete tail so every step has a full global batch
    epoch, within = divmod(step, steps_per_epoch)
    perm = torch.randperm(length, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    start = within * per_step + replica * batch
    return perm[start : start + batch]


def sample_seeds(step: int, global_indices: list[int], seed: int) -> list[int]:
    """Posterior-noise seeds for the samples of a step, keyed on (seed, step, position in the global batch)."""
    return [((seed * 1_000_003 + step) * 1009 + i) % (2**63 - 1) for i in global_indices]


@torch.no_grad()
def latent_statistics(vae, clips) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of ``vae``'s latents (posterior means) over ``clips``, an iterable of
    (3, T, H, W) or (B, 3, T, H, W) tensors: what a Wan VAE's ``latents_mean`` / ``latents_std`` config entries
    hold, and what pipelines use to normalize latents, ``(z - mean) / std``. Accumulated in float64.

    Wan2.1's entries describe Wan2.1's released weights only. A VAE trained from scratch, or fine-tuned far enough,
    needs its own: ``recipes/latent_stats.py`` measures them and writes them into a saved model's config.json."""
    total, total_sq, count = None, None, 0
    param = next(vae.parameters())
    for clip in clips:
        x = clip[None] if clip.dim() == 4 else clip
        z = adapter_for(vae).posterior_of(vae.encode(x.to(device=param.device, dtype=param.dtype))).mean.double()
        per_channel = z.transpose(0, 1).reshape(z.shape[1], -1)
        s, sq = per_channel.sum(1), per_channel.pow(2).sum(1)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += per_channel.shape[1]
    if not count:
        raise ValueError("latent_statistics needs at least one clip")
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()

"""The perceptual and adversarial terms of the fine-tuning step (recipes/finetune.py, flags of
:func:`parallel_vae.jobs.cli.add_loss_args`), as latent-diffusion / taming train VAEs, on row shards.

Per step, after the VAE's forward (:func:`add_loss_terms`, one call before the VAE's backward):

1. from ``--disc_start`` on, one discriminator update: hinge loss on the real clip's frames and the detached
   reconstruction's, backward, ``--disc_optimizer`` step. The discriminator (a DDP module of its own) runs on the
   rows of this rank, BatchNorm statistics over the spatial group;
2. the VAE's extra loss: ``--perceptual_weight`` x LPIPS (mean over frames) and, from ``--disc_start`` on,
   ``d_weight x g_loss`` with ``g_loss = -mean(D(reconstruction))`` through the updated discriminator (its
   parameters frozen for this term), ``d_weight`` taming's adaptive weight
   ``clamp(||grad nll|| / (||grad g_loss|| + 1e-4), 0, 1e4) x --disc_weight`` at ``decoder.conv_out.weight``, where
   nll is the reconstruction part of the loss (L1, MSE, perceptual; not the KL).

Differences from taming's Lightning loop, on purpose: the discriminator update comes first and reuses this step's
reconstruction (taming runs the autoencoder a second time for it), so the generator term sees the updated
discriminator; before ``--disc_start`` the discriminator is not run at all (taming runs it with a zero factor,
which only moves BatchNorm's running averages and Adam's step count).

Every term follows the one loss rule (:func:`~parallel_vae.loss.sharded_loss`): each rank's part of a mean over
the replica's batch, scaled for DDP's averaging, so the parameter gradients are the single-process ones. The
adaptive weight's gradient norms are taken of the world's averaged last-layer gradients, i.e. of the global
batch's, so any D x S layout computes the same weight as one process with the whole batch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..discriminator import (
    NLayerDiscriminator,
    check_discriminator_rows,
    discriminator_rows,
    generator_loss_rows,
    hinge_d_loss_rows,
    load_discriminator,
    seeded_discriminator,
)
from ..families import adapter_for, spatial_factor
from ..core.comm import group_size
from ..core.sharding import row_split, scale_sizes
from ..loss import sharded_loss
from ..perceptual import LPIPS, check_lpips_rows, load_lpips, lpips_rows
from .runtime import Runtime, UsageError

__all__ = ["LOSS_TRAJECTORY", "LossNetworks", "build_loss_networks", "add_loss_terms"]

# The flags of add_loss_args that change the training trajectory (a resume with other values is refused).
LOSS_TRAJECTORY = (
    "perceptual_weight", "disc_weight", "disc_start", "disc_ndf", "disc_layers", "adaptive_weight",
    "disc_optimizer", "disc_lr",
)  # fmt: skip
# A fresh discriminator's seed is --seed + this (not the model's own seed, so they differ).
DISC_SEED_OFFSET = 4099


class DiscriminatorStep(nn.Module):
    """What DDP wraps for the discriminator update: both calls (real, fake) in one forward, returning this rank's
    scaled hinge loss, so DDP sees one forward per backward."""

    def __init__(self, disc: NLayerDiscriminator, group):
        super().__init__()
        self.disc = disc
        self.group = group

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_real, split_real = discriminator_rows(self.disc, real, self.group)
        logits_fake, split_fake = discriminator_rows(self.disc, fake, self.group)
        part = hinge_d_loss_rows(logits_real, split_real, logits_fake, split_fake)
        return sharded_loss(part, numel=1, group=self.group), part.detach()


@dataclass
class LossNetworks:
    args: argparse.Namespace
    group: Optional[dist.ProcessGroup]
    lpips: Optional[LPIPS]
    disc: Optional[nn.Module]  # DiscriminatorStep, as prepared by accelerate (DDP)
    disc_raw: Optional[NLayerDiscriminator]
    disc_optimizer: Optional[torch.optim.Optimizer]
    last_layer: Optional[torch.Tensor]


def _frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) clips -> (B*T, C, H, W) frames (images stay as they are): both networks are 2-D."""
    if x.dim() == 4:
        return x
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _check_flags(args, rt: Runtime) -> None:
    if args.perceptual_weight < 0 or args.disc_weight < 0:
        raise UsageError("--perceptual_weight and --disc_weight must be >= 0")
    if args.perceptual_weight and not args.perceptual_weights_file:
        raise UsageError(
            "--perceptual_weight needs --perceptual_weights_file (LPIPS weights from a file; nothing is downloaded)"
        )
    if args.perceptual_weights_file and not args.perceptual_weight:
        raise UsageError("--perceptual_weights_file is given but --perceptual_weight is 0")
    if args.disc_weights_file and not args.disc_weight:
        raise UsageError("--disc_weights_file is given but --disc_weight is 0")
    if args.disc_start < 0:
        raise UsageError("--disc_start must be >= 0")
    if args.disc_weight and rt.accelerator.state.deepspeed_plugin is not None:
        raise UsageError(
            "--disc_weight trains a second model, which accelerate's DeepSpeed integration does not prepare here: "
            "launch with DDP (e.g. accelerate_configs/cpu_2proc.yaml) or leave the discriminator off"
        )


def _last_layer(vae: nn.Module) -> torch.Tensor:
    conv = getattr(getattr(vae, "decoder", None), "conv_out", None)
    weight = getattr(conv, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.requires_grad:
        raise UsageError(
            f"--adaptive_weight needs the decoder's last layer (decoder.conv_out) trainable; {type(vae).__name__} "
            "has none here: use --no-adaptive_weight"
        )
    return weight


def build_loss_networks(rt: Runtime, args, vae: nn.Module, layout, dtype: torch.dtype) -> Optional[LossNetworks]:
    """Load LPIPS and the discriminator, check that the clips' row shards are tall enough for them, prepare the
    discriminator and its optimizer with accelerate (so checkpoints save and resume them). ``None`` when both
    losses are off. Every rank calls it; bad input is one clear error on every rank."""
    with rt.agreed():
        _check_flags(args, rt)
    if not args.perceptual_weight and not args.disc_weight:
        return None
    with rt.agreed():
        adapter = adapter_for(vae)
        if adapter.pixel_channels(vae) != 3:
            raise UsageError(
                f"the perceptual and adversarial losses take RGB frames; this VAE has {adapter.pixel_channels(vae)} "
                "pixel channels"
            )
        factor = spatial_factor(vae)
        sizes = scale_sizes(row_split(args.height // factor, args.sp_degree), factor)
        lpips = None
        if args.perceptual_weight:
            lpips = load_lpips(args.perceptual_weights_file.split(","), dtype=dtype, device=rt.device)
            check_lpips_rows(lpips, sizes)
        disc_raw = None
        if args.disc_weight:
            if args.disc_weights_file:
                disc_raw = load_discriminator(args.disc_weights_file, dtype=dtype)
            else:
                disc_raw = seeded_discriminator(3, args.disc_ndf, args.disc_layers, args.seed + DISC_SEED_OFFSET, dtype)
            check_discriminator_rows(disc_raw, sizes)
        last = _last_layer(vae) if args.disc_weight and args.adaptive_weight else None
    disc = opt = None
    if disc_raw is not None:
        disc_raw = disc_raw.to(rt.device).train()
        disc = DiscriminatorStep(disc_raw, layout.spatial_group)
        lr = args.lr if args.disc_lr is None else args.disc_lr
        if args.disc_optimizer == "sgd":
            opt = torch.optim.SGD(disc.parameters(), lr=lr)
        else:
            opt = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9))
        disc, opt = rt.accelerator.prepare(disc, opt)
    return LossNetworks(args, layout.spatial_group, lpips, disc, disc_raw, opt, last)


def _world_mean_norm(grad: torch.Tensor, world: int) -> torch.Tensor:
    """||mean over the world of this rank's gradient||: the global batch's gradient (the loss rule scales each
    rank's loss for DDP's averaging)."""
    g = grad.detach().double()
    if world > 1:
        g = g.clone()
        dist.all_reduce(g, group=dist.group.WORLD)
    return (g / world).norm()


def add_loss_terms(
    nets: Optional[LossNetworks],
    step: int,
    loss: torch.Tensor,
    recon_local: torch.Tensor,
    target_local: torch.Tensor,
    *,
    numel: int,
    acc,
) -> tuple[torch.Tensor, dict]:
    """``loss`` plus the perceptual and adversarial terms of this step (after one discriminator update once
    ``step >= --disc_start``), and their logged values (replica means averaged over replicas). Call it on every
    rank, before the VAE's backward; ``loss`` is this rank's scaled VAE loss, ``numel`` the replica's pixel
    element count (as for :func:`~parallel_vae.jobs.training.vae_loss`)."""
    if nets is None:
        return loss, {}
    args, group = nets.args, nets.group
    fake, real = _frames(recon_local), _frames(target_local.to(recon_local.dtype))
    n_frames = fake.shape[0]
    world = dist.get_world_size() if dist.is_initialized() else 1
    logs = {}
    sums = []  # (name, this rank's part, divisor) for logging
    nll = None
    if nets.lpips is not None:
        p_local = lpips_rows(nets.lpips, fake, real, group)  # (B*T,), sums over the group to LPIPS per frame
        p_term = args.perceptual_weight * sharded_loss(p_local.sum(), numel=n_frames, group=group)
        loss = loss + p_term
        nll = p_term
        sums.append(("perceptual", p_local.detach().sum(), n_frames))
    if nets.disc is not None and step >= args.disc_start:
        # 1. the discriminator's update, on this step's reconstruction (detached)
        d_loss, d_part = nets.disc(real.detach(), fake.detach())
        acc.backward(d_loss)
        nets.disc_optimizer.step()
        nets.disc_optimizer.zero_grad(set_to_none=True)
        sums.append(("d_loss", d_part, 1))
        # 2. the generator's term through the updated discriminator, its parameters frozen for it
        params = [p for p in nets.disc_raw.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            logits, split = discriminator_rows(nets.disc_raw, fake, group)
        finally:
            for p in params:
                p.requires_grad_(True)
        g_part = generator_loss_rows(logits, split)
        g_loss = sharded_loss(g_part, numel=1, group=group)
        sums.append(("g_loss", g_part.detach(), 1))
        if nets.last_layer is not None:
            diff = recon_local - target_local.to(recon_local.dtype)
            rec = args.l1 * diff.abs().sum() + args.mse * diff.pow(2).sum()
            rec = sharded_loss(rec, numel=numel, group=group)
            nll = rec if nll is None else rec + nll
            g_nll = torch.autograd.grad(nll, nets.last_layer, retain_graph=True)[0]
            g_adv = torch.autograd.grad(g_loss, nets.last_layer, retain_graph=True)[0]
            d_weight = _world_mean_norm(g_nll, world) / (_world_mean_norm(g_adv, world) + 1e-4)
            d_weight = d_weight.clamp(0.0, 1e4).to(loss.dtype) * args.disc_weight
        else:
            d_weight = torch.tensor(args.disc_weight, dtype=loss.dtype, device=loss.device)
        loss = loss + d_weight * g_loss
        logs["d_weight"] = float(d_weight)
    if sums:
        # summed over the world: every replica's whole value, once per replica
        packed = torch.stack([v.double() for _, v, _ in sums])
        if world > 1:
            dist.all_reduce(packed, group=dist.group.WORLD)
        replicas = world // group_size(group)
        for (name, _, div), v in zip(sums, packed.tolist()):
            logs[name] = v / (div * replicas)
    return loss, logs

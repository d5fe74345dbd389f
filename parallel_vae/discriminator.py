"""The PatchGAN discriminator (taming's ``NLayerDiscriminator``) and its hinge losses, whole-frame and on row shards.

Why at package level, beside :mod:`.loss` and :mod:`.perceptual`: a training network built from core machinery
(:mod:`.core.rowwise`), not machinery itself, not a diffusers layer, not a family, not a job.

:class:`NLayerDiscriminator` is ``taming/modules/discriminator/model.py``'s (pix2pix's PatchGAN), key layout
``main.N.*``: 4x4 convs with padding 1, stride 2 for the first ``n_layers``, then two stride-1 convs (each gives
H - 1 rows), BatchNorm2d after every conv but the first and the last, LeakyReLU(0.2). Its plain ``forward`` is the
whole-frame reference.

On shards (:func:`discriminator_rows`): the convs take halos (a 4x4/2 conv needs 1 row above and 1 below, a 4x4/1
conv 1 above and 2 below, and its lost row comes off the last rank), a level whose shard boundary is not a
multiple of the next stride is realigned (more than 3 layers stride more than the VAE's 8x row unit), and the
BatchNorms are *distributed* BatchNorms: batch statistics over every rank's rows, exact forward and backward, the
running averages updated identically on every rank (:func:`~parallel_vae.core.norm.distributed_batch_norm`).

Why a distributed BatchNorm rather than ActNorm: taming and latent-diffusion train their discriminators with
BatchNorm (``use_actnorm=False`` is the default of both), so the weights users bring (``main.3.running_mean`` ...)
are BatchNorm weights, and the exact whole-frame computation is BatchNorm's batch statistics over the whole image.
A per-shard BatchNorm would normalize each shard by its own statistics, which is a different network. The
distributed one costs one small all-gather (3 numbers per channel) forward and one all-reduce (2 per channel)
backward per BatchNorm. ActNorm (taming's ``use_actnorm=True``) is local after its data-dependent initialization;
it is not provided here, and a file in its layout is refused.

The loss means (hinge, generator) are sums over this rank's logits divided by the whole logit map's element count:
:func:`hinge_d_loss_rows` and :func:`generator_loss_rows` return those per-rank parts, which sum over the group to
taming's ``hinge_d_loss`` and ``-mean(logits_fake)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .core.rowwise import RowSplit, check_layers, row_split_of, run_layers
from .errors import InputError
from .perceptual import read_state_dict, _strip

__all__ = [
    "NLayerDiscriminator",
    "weights_init",
    "seeded_discriminator",
    "load_discriminator",
    "discriminator_rows",
    "check_discriminator_rows",
    "hinge_d_loss",
    "hinge_d_loss_rows",
    "generator_loss_rows",
]


class NLayerDiscriminator(nn.Module):
    """A PatchGAN discriminator as in pix2pix and taming (BatchNorm variant)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        kw, padw = 4, 1
        sequence = [nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        nf_mult = 1
        for n in range(1, n_layers):
            nf_mult_prev, nf_mult = nf_mult, min(2**n, 8)
            sequence += [
                nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw, bias=False),
                nn.BatchNorm2d(ndf * nf_mult),
                nn.LeakyReLU(0.2, True),
            ]
        nf_mult_prev, nf_mult = nf_mult, min(2**n_layers, 8)
        sequence += [
            nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw, bias=False),
            nn.BatchNorm2d(ndf * nf_mult),
            nn.LeakyReLU(0.2, True),
        ]
        sequence += [nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw)]
        self.main = nn.Sequential(*sequence)
        self.input_nc, self.ndf, self.n_layers = input_nc, ndf, n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def weights_init(m: nn.Module, generator: Optional[torch.Generator] = None) -> None:
    """taming's initialization: conv weights N(0, 0.02); BatchNorm weights N(1, 0.02), biases 0 (seeded by
    ``generator``). taming leaves the conv biases at PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) from the
    global RNG; here they are drawn from that distribution with ``generator`` too, so one seed gives one network in
    every process (and every layout)."""
    with torch.no_grad():
        if isinstance(m, nn.Conv2d):
            m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * 0.02)
            if m.bias is not None:
                bound = 1.0 / m.weight[0].numel() ** 0.5
                m.bias.copy_((torch.rand(m.bias.shape, generator=generator) * 2 - 1) * bound)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(1.0 + 0.02 * torch.randn(m.weight.shape, generator=generator))
            m.bias.zero_()


def seeded_discriminator(input_nc: int = 3, ndf: int = 64, n_layers: int = 3, seed: int = 0, dtype=torch.float32):
    """A freshly initialized discriminator (taming's init), the same on every rank for one seed."""
    d = NLayerDiscriminator(input_nc, ndf, n_layers)
    g = torch.Generator().manual_seed(seed)
    for m in d.modules():
        weights_init(m, g)
    return d.to(dtype)


def load_discriminator(path: str, dtype: torch.dtype = torch.float32, device=None) -> NLayerDiscriminator:
    """A :class:`NLayerDiscriminator` from a safetensors or torch file in taming's layout (``main.N.*``; a whole
    taming / latent-diffusion checkpoint's ``loss.discriminator.main.N.*`` is found too). Its input channels, width
    and depth are read from the weights."""
    sd = _strip(read_state_dict(path), "discriminator.")
    if any(k.endswith((".loc", ".logdet")) for k in sd):
        raise InputError(f"{path}: an ActNorm discriminator (use_actnorm=True); only the BatchNorm one is supported")
    convs = sorted(int(k.split(".")[1]) for k, v in sd.items() if k.startswith("main.") and k.endswith(".weight") and v.dim() == 4)
    if len(convs) < 3 or convs[0] != 0:
        raise InputError(f"{path}: no PatchGAN discriminator weights (main.0.weight ...)")
    first = sd["main.0.weight"]
    model = NLayerDiscriminator(first.shape[1], first.shape[0], len(convs) - 2)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected or any(own[k].shape != sd[k].shape for k in own if k in sd):
        raise InputError(
            f"{path}: not a taming NLayerDiscriminator (missing {missing[:6]}, unexpected {unexpected[:6]})"
        )
    model.load_state_dict(sd)
    return model.to(device=device, dtype=dtype)


def discriminator_rows(disc: NLayerDiscriminator, x_local: torch.Tensor, group=None) -> tuple[torch.Tensor, RowSplit]:
    """forward: this rank's rows of ``disc(x)`` for images (B, C, H, W) whose rows are split over ``group``, and the
    logits' split; backward: the exact input and parameter gradients (parameter gradients summed over the group are
    the whole-frame ones). In training mode the BatchNorms use (and update) statistics over every rank's rows."""
    if x_local.dim() != 4:
        raise ValueError(f"discriminator_rows needs (B, C, H, W) images, got {tuple(x_local.shape)}")
    split = row_split_of(x_local, group)
    return run_layers([(f"discriminator main.{n}", m) for n, m in disc.main.named_children()], x_local, split, group)


def check_discriminator_rows(disc: NLayerDiscriminator, sizes) -> None:
    """Raise the :class:`~parallel_vae.core.sharding.ShardingError` :func:`discriminator_rows` would raise for
    images split in ``sizes`` rows per rank, without running anything."""
    split = RowSplit(tuple(sum(sizes[:r]) for r in range(len(sizes) + 1)))
    check_layers([(f"discriminator main.{n}", m) for n, m in disc.main.named_children()], split)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """taming's ``hinge_d_loss``: ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))`` (whole-frame)."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())


def _count(logits: torch.Tensor, split: RowSplit) -> int:
    return logits.shape[0] * logits.shape[1] * split.total * logits.shape[-1]


def hinge_d_loss_rows(real_local, real_split: RowSplit, fake_local, fake_split: RowSplit) -> torch.Tensor:
    """This rank's part of :func:`hinge_d_loss` (its logits' sums over the whole maps' element counts); summed over
    the group it is the whole-frame hinge loss."""
    return 0.5 * (
        torch.relu(1.0 - real_local).sum() / _count(real_local, real_split)
        + torch.relu(1.0 + fake_local).sum() / _count(fake_local, fake_split)
    )


def generator_loss_rows(fake_local: torch.Tensor, fake_split: RowSplit) -> torch.Tensor:
    """This rank's part of the generator's adversarial loss ``-mean(logits_fake)``."""
    return -fake_local.sum() / _count(fake_local, fake_split)

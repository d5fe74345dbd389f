"""Perceptual (LPIPS, VGG16 trunk) and adversarial (PatchGAN, hinge) losses on row shards, float64, against the
whole-frame networks on every rank: the losses, the logits, the input gradients, the discriminator's parameter
gradients (summed over the group) and its BatchNorm running statistics, at 2 and 3 ranks with uneven splits whose
boundaries fall on odd rows of VGG's pooled levels (so the realignment runs). Bad input: a shard too small for the
networks' halos gives one clear error on every rank. Loading: the accepted key layouts.

The networks are seeded and narrow (LPIPS widths 4/8/8/16/16, discriminator ndf 4): no real weights are used or
downloaded; the code paths are the ones real widths take.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from tests.dist_harness import run_ranks, values

WIDTHS = (4, 8, 8, 16, 16)
BAR = 1e-10


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _parity(rank, world, sizes, width):
    from parallel_vae.discriminator import (
        discriminator_rows, generator_loss_rows, hinge_d_loss, hinge_d_loss_rows, seeded_discriminator,
    )  # fmt: skip
    from parallel_vae.perceptual import lpips_rows, seeded_lpips

    torch.manual_seed(0)
    group = dist.new_group(list(range(world)))
    dt = torch.float64
    h = sum(sizes)
    start = sum(sizes[:rank])
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, h, width, generator=g, dtype=dt) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=dt)).clamp(-1, 1)
    rows = lambda t: t.narrow(-2, start, sizes[rank]).detach().clone()  # noqa: E731
    errs = {}

    # LPIPS: values per sample and the input gradient of a weighted sum.
    lp = seeded_lpips(WIDTHS, seed=3, dtype=dt)
    w = torch.tensor([0.7, -1.3], dtype=dt)
    xr = x.clone().requires_grad_(True)
    ref = lp(xr, y).flatten()
    (ref * w).sum().backward()
    xl = rows(x).requires_grad_(True)
    part = lpips_rows(lp, xl, rows(y), group)
    (part * w).sum().backward()
    total = part.detach().clone()
    dist.all_reduce(total, group=group)
    errs["lpips"] = _rel(total, ref.detach())
    errs["lpips_dx"] = _rel(xl.grad, rows(xr.grad))

    # PatchGAN in training mode: hinge loss (real, fake) + generator loss on a third call, as one step would.
    d_ref = seeded_discriminator(ndf=4, n_layers=3, seed=5, dtype=dt).train()
    d = copy.deepcopy(d_ref)
    xr = x.clone().requires_grad_(True)
    real_ref = d_ref(y)  # the order the sharded calls below take: BatchNorm's running averages depend on it
    fake_ref = d_ref(xr)
    loss_ref = hinge_d_loss(real_ref, fake_ref) + 0.7 * (-d_ref(xr).mean())
    loss_ref.backward()
    xl = rows(x).requires_grad_(True)
    real, real_split = discriminator_rows(d, rows(y), group)
    fake, fake_split = discriminator_rows(d, xl, group)
    fake2, split2 = discriminator_rows(d, xl, group)
    loss = hinge_d_loss_rows(real, real_split, fake, fake_split) + 0.7 * generator_loss_rows(fake2, split2)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    errs["disc_loss"] = _rel(total, loss_ref.detach())
    lo, n = fake_split.start(rank), fake_split.sizes[rank]
    errs["logits"] = _rel(fake.detach(), fake_ref.detach().narrow(-2, lo, n))
    errs["disc_dx"] = _rel(xl.grad, rows(xr.grad))
    worst = 0.0
    for (name, p), p_ref in zip(d.named_parameters(), d_ref.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)
        worst = max(worst, _rel(grad, p_ref.grad))
    errs["disc_dparams"] = worst
    errs["running_stats"] = max(_rel(b, b_ref) for b, b_ref in zip(d.buffers(), d_ref.buffers()) if b.is_floating_point())
    assert all(torch.equal(b, b_ref) for b, b_ref in zip(d.buffers(), d_ref.buffers()) if not b.is_floating_point())
    errs["finite"] = float(all(torch.isfinite(v).all() for v in (ref, xl.grad, fake)))
    return errs


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "world,sizes",
    # pixel rows per rank, in 8-row latent units: 5/3 and 5/4/4 latent rows; both put a boundary on an odd row
    # after VGG's third pool (5 and 5, 9), so the fourth pool realigns.
    [(2, (40, 24)), (3, (40, 32, 32))],
    ids=["2ranks-40/24", "3ranks-40/32/32"],
)
def test_sharded_losses_and_gradients_equal_whole_frame(world, sizes):
    for errs in values(run_ranks(_parity, world, sizes, 24)):
        assert errs.pop("finite") == 1.0
        assert max(errs.values()) <= BAR, errs


def _too_small(rank, world, sizes):
    """Both networks on shards too small for them; each rank returns what it raised (caught here, so the worker
    pool stays healthy and the next test does not pay for a new one)."""
    from parallel_vae.discriminator import discriminator_rows, seeded_discriminator
    from parallel_vae.perceptual import lpips_rows, seeded_lpips

    group = dist.new_group(list(range(world)))
    start = sum(sizes[:rank])
    x = torch.zeros(1, 3, sum(sizes), 24).narrow(-2, start, sizes[rank])
    out = []
    for run in (lambda: lpips_rows(seeded_lpips(WIDTHS), x, x, group),
                lambda: discriminator_rows(seeded_discriminator(ndf=4), x, group)):  # fmt: skip
        try:
            run()
            out.append(None)
        except Exception as e:
            out.append((type(e).__name__, str(e)))
    dist.barrier(group)  # every rank got here: the errors came before any exchange that could hang
    return out


@pytest.mark.timeout(120)
def test_shard_too_small_is_one_clear_error_on_every_rank():
    """16/8/8 rows: VGG's third pooled level has rows 2/1/1, whose realignment for the fourth pool would leave rank 1
    none; the PatchGAN's 4x4 stride-1 conv needs 2 halo rows from ranks that hold 1."""
    lpips_msg = "LPIPS net.slice5.23: a shard too small to realign to stride 2: rows per rank [2, 1, 1]"
    disc_msg = "discriminator main.8: a shard too small for the 2-row halo of this layer: rows per rank [2, 1, 1] at this level"
    for lpips_err, disc_err in values(run_ranks(_too_small, 3, (16, 8, 8))):
        assert lpips_err[0] == "ShardingError" and lpips_msg in lpips_err[1], lpips_err
        assert disc_err[0] == "ShardingError" and disc_msg in disc_err[1], disc_err
    # the same errors from the row arithmetic alone (what the recipe checks before training)
    from parallel_vae.core.sharding import ShardingError
    from parallel_vae.discriminator import check_discriminator_rows, seeded_discriminator
    from parallel_vae.perceptual import check_lpips_rows, seeded_lpips

    with pytest.raises(ShardingError, match=lpips_msg.replace("[", r"\[").replace("]", r"\]")):
        check_lpips_rows(seeded_lpips(WIDTHS), (16, 8, 8))
    with pytest.raises(ShardingError, match=disc_msg.replace("[", r"\[").replace("]", r"\]")):
        check_discriminator_rows(seeded_discriminator(ndf=4), (16, 8, 8))
    check_lpips_rows(seeded_lpips(WIDTHS), (40, 32, 32))  # the split the parity test runs passes
    check_discriminator_rows(seeded_discriminator(ndf=4), (40, 32, 32))


def test_weights_load_from_the_released_layouts(tmp_path):
    """LPIPS from torchvision's vgg16 keys + LPIPS's lin-only vgg.pth keys (two files), or one safetensors of the
    module's own keys, or a whole latent-diffusion checkpoint; the discriminator from taming's keys. Widths are read
    from the weights."""
    from safetensors.torch import save_file

    from parallel_vae.discriminator import load_discriminator, seeded_discriminator
    from parallel_vae.errors import InputError
    from parallel_vae.perceptual import load_lpips, seeded_lpips

    lp = seeded_lpips(WIDTHS, seed=2)
    sd = lp.state_dict()
    cut = {f"net.slice{k + 1}.": None for k in range(5)}
    vgg = {"features." + k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith(tuple(cut))}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)
    lins = {k: v for k, v in sd.items() if k.startswith("lin")}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lins, tmp_path / "vgg.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "lpips.safetensors"))
    torch.save({"state_dict": {"loss.perceptual_loss." + k: v for k, v in sd.items()}}, tmp_path / "ldm.ckpt")
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    want = lp(x, y)
    for files in ([tmp_path / "vgg16.pth", tmp_path / "vgg.pth"], [tmp_path / "lpips.safetensors"], [tmp_path / "ldm.ckpt"]):
        got = load_lpips([str(f) for f in files])
        assert got.channels == WIDTHS and torch.equal(got(x, y), want)
    with pytest.raises(InputError, match="missing"):
        load_lpips(str(tmp_path / "vgg16.pth"))  # no lin layers

    d = seeded_discriminator(ndf=4, n_layers=2, seed=1)
    torch.save(d.state_dict(), tmp_path / "disc.pth")
    got = load_discriminator(str(tmp_path / "disc.pth"))
    assert (got.ndf, got.n_layers) == (4, 2)
    d.eval(), got.eval()
    assert torch.equal(got(x), d(x))
    with pytest.raises(InputError, match="no PatchGAN"):
        load_discriminator(str(tmp_path / "vgg.pth"))

"""Shared parity cases: the same seeded model, inputs and loss run unmodified (reference) and parallel (workers)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import parallel_vae as pv
from parallel_vae.models import build_wan_vae

WIDTH = {"wan2.1": dict(base_dim=8, z_dim=4), "wan2.2": dict(base_dim=8, z_dim=4)}


def make_model(layout: str, dtype: torch.dtype):
    return build_wan_vae(layout, seed=1234, dtype=dtype, perturb=0.05, **WIDTH[layout])


def make_inputs(layout: str, dtype, batch: int, frames: int, latent_h: int, latent_w: int, seed: int = 7):
    """A pixel video (B, C, frames, H, W) and the per-pixel loss weights for its reconstruction."""
    vae = make_model(layout, torch.float32)  # only for shapes
    factor = pv.spatial_factor(vae)
    c = vae.config.in_channels if vae.config.patch_size is None else vae.config.in_channels // vae.config.patch_size**2
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, c, frames, latent_h * factor, latent_w * factor, generator=g, dtype=torch.float64) * 2 - 1
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x.to(dtype), w.to(dtype)


def reference(layout, dtype, batch, frames, latent_h, latent_w):
    """Unmodified diffusers: latents, reconstruction, input gradient and parameter gradients of sum(w * recon)."""
    vae = make_model(layout, dtype)
    x, w = make_inputs(layout, dtype, batch, frames, latent_h, latent_w)
    x.requires_grad_(True)
    z = vae.encode(x).latent_dist.mode()
    out = vae.decode(z).sample
    (out * w).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in vae.named_parameters()}
    return dict(z=z.detach(), out=out.detach(), x_grad=x.grad.detach(), grads=grads)


def _group_for(rank, world, ranks):
    """Create every group the test uses on every rank (new_group is collective), return this rank's group."""
    if ranks is None:
        return dist.group.WORLD, True
    groups = [dist.new_group(rs) for rs in ranks]
    for rs, g in zip(ranks, groups):
        if rank in rs:
            return g, True
    return None, False


def parity_worker(rank, world, layout, dtype, batch, frames, latent_h, latent_w, mode, ranks=None):
    """Run the reference computation through the parallel model; return (on each group's rank 0) the results with
    parameter gradients summed over the spatial group."""
    group, member = _group_for(rank, world, ranks)
    if not member:
        return None
    vae = make_model(layout, dtype)
    pv.enable_spatial_parallelism(vae, group)
    x, w = make_inputs(layout, dtype, batch, frames, latent_h, latent_w)
    x.requires_grad_(True)
    if mode == "replicated":
        z = vae.encode(x).latent_dist.mode()
        out = vae.decode(z).sample
        (out * w).sum().backward()
        z_full, out_full, x_grad = z.detach(), out.detach(), x.grad
    else:
        x_local = pv.shard_video(vae, x)
        z_local = pv.sharded_encode(vae, x_local).mode()
        out_local = pv.sharded_decode(vae, z_local)
        w_local = pv.shard_video(vae, w)
        (out_local * w_local).sum().backward()
        z_full = pv.gather_shards(vae, z_local.detach())
        out_full = pv.gather_shards(vae, out_local.detach())
        x_grad = x.grad
    grads = {}
    for n, p in vae.named_parameters():
        g = p.grad.detach().clone()
        dist.all_reduce(g, group=group)
        grads[n] = g
    if dist.get_rank(group) != 0:
        return "ok"
    return dict(z=z_full, out=out_full, x_grad=x_grad.detach(), grads=grads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (DESIGN.md's exactness measure)."""
    denom = b.abs().max().item()
    return (a - b).abs().max().item() / (denom if denom > 0 else 1.0)

"""sharded_loss: DDP averaging over D data-parallel x S spatial ranks yields the single-process gradient."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import parallel_vae as pv
from tests.cases import Case, make_inputs, make_model, rel_err
from tests.dist_harness import run_ranks, values

CASE = Case("wan2.1", "float64", latent_h=3, latent_w=2)


def _sample(d: int) -> torch.Tensor:
    return make_inputs(CASE, torch.float64, seed=100 + d)[0]


class _Reconstruct(torch.nn.Module):
    """What a training step runs through DDP: sharded encode -> decode of this rank's rows."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x_local):
        posterior = pv.sharded_encode(self.vae, x_local)
        return pv.sharded_decode(self.vae, posterior.mode()), posterior


def _ddp_worker(rank, world, spatial, averaged):
    groups = [dist.new_group(list(range(s, s + spatial))) for s in range(0, world, spatial)]
    group = groups[rank // spatial]
    d = rank // spatial  # data-parallel replica index
    vae = pv.enable_spatial_parallelism(make_model(CASE.layout, torch.float64), group)
    x = _sample(d)
    model = DDP(_Reconstruct(vae), process_group=dist.group.WORLD) if averaged else _Reconstruct(vae)
    x_local = pv.shard_video(vae, x)
    out_local, posterior = model(x_local)
    rec = ((out_local - x_local) ** 2).sum()
    kl = posterior.kl().sum()  # per-element KL summed over this rank's latent rows
    loss = pv.sharded_loss(rec, numel=x.numel(), group=group, averaged=averaged)
    loss = loss + 1e-3 * pv.sharded_loss(kl, numel=x.shape[0], group=group, averaged=averaged)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in vae.named_parameters()}
    if not averaged:  # summed over the spatial group instead of averaged by DDP
        for g in grads.values():
            dist.all_reduce(g, group=group)
    return grads


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,spatial,averaged", [(4, 2, True), (2, 2, True), (3, 3, False)])
def test_sharded_loss_gives_single_process_gradient(world, spatial, averaged):
    replicas = world // spatial
    # Single process: mean over the global batch of the per-sample mean reconstruction error + 1e-3 KL per sample.
    vae = make_model(CASE.layout, torch.float64)
    total = 0
    for d in range(replicas):
        x = _sample(d)
        posterior = vae.encode(x).latent_dist
        out = vae.decode(posterior.mode()).sample
        total = total + ((out - x) ** 2).mean() + 1e-3 * posterior.kl().sum() / x.shape[0]
    (total / replicas).backward()
    ref = {n: p.grad for n, p in vae.named_parameters()}
    results = values(run_ranks(_ddp_worker, world, spatial, averaged, timeout=280))
    for grads in results:  # every rank ends with the same, single-process gradient
        worst = max(rel_err(grads[n], ref[n]) for n in ref)
        assert worst <= 1e-10, worst

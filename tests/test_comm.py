"""The communication primitives: exact values on integer data, gradients by gradcheck across ranks, subgroups."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel_vae.core import comm
from parallel_vae.core.sharding import row_offsets
from tests.dist_harness import run_ranks, values


def _global_rows(n_rows: int, shape_tail=(2, 3)) -> torch.Tensor:
    # Integer-valued float64: any misrouted row shows up as an exact mismatch.
    return torch.arange(n_rows * shape_tail[0] * shape_tail[1], dtype=torch.float64).reshape(
        shape_tail[0], n_rows, shape_tail[1]
    )


def _subgroup(rank, ranks_list):
    """Create all groups on every rank (new_group is collective); return (group, members) for this rank."""
    groups = [dist.new_group(rs) for rs in ranks_list]
    for rs, g in zip(ranks_list, groups):
        if rank in rs:
            return g, rs
    return None, None


def _collectives_worker(rank, world, ranks_list, sizes, top, bottom):
    group, members = _subgroup(rank, ranks_list)
    if group is None or len(members) != len(sizes):
        return None  # a bystander group (e.g. the group of one beside the group under test)
    r = dist.get_rank(group)
    full = _global_rows(sum(sizes))
    off = row_offsets(sizes)
    local = full.narrow(1, off[r], sizes[r]).clone().requires_grad_(True)
    out = {}
    # halo exchange forward and backward
    h = comm.halo_exchange(local, group, dim=1, top=top, bottom=bottom)
    out["halo"] = h.detach().clone()
    g = torch.arange(h.numel(), dtype=torch.float64).reshape(h.shape) + 1000 * r
    h.backward(g)
    out["halo_grad"] = local.grad.clone()
    out["halo_gout"] = g
    # scatter / gather / reduce-scatter
    out["scatter"] = comm.scatter_rows(full, group, dim=1, sizes=sizes)
    out["gather"] = comm.gather_rows(local.detach(), group, dim=1)
    full_r = full + 100 * r  # a different full tensor on every rank
    out["reduce_scatter"] = comm._reduce_scatter(full_r, group, 1, sizes)
    out["sizes"] = comm.all_gather_sizes(sizes[r], group, torch.device("cpu"))
    return r, out


def _expected_halo(full, sizes, r, top, bottom):
    off = row_offsets(sizes)
    lo, hi = off[r] - top, off[r] + sizes[r] + bottom
    padded = F.pad(full, (0, 0, top, bottom))  # rows are dim 1; padded row i = full row i - top
    return padded[:, lo + top : hi + top]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "world,ranks_list,sizes,top,bottom",
    [
        (2, [[0, 1]], [3, 2], 1, 1),
        (3, [[0, 1, 2]], [3, 2, 2], 1, 1),
        (3, [[0, 1, 2]], [2, 2, 2], 0, 1),  # the downsample's bottom-only halo
        (4, [[2, 3]], [1, 4], 1, 1),  # offset subgroup: group rank 0 is global rank 2
        (4, [[0], [1, 2, 3]], [2, 2, 3], 2, 1),  # offset group of 3 beside a group of one, halo of 2 rows
    ],
    ids=["w2", "w3", "w3-bottom-only", "subgroup-2,3-of-4", "subgroup-1,2,3-of-4"],
)
def test_collectives_exact(world, ranks_list, sizes, top, bottom):
    results = values(run_ranks(_collectives_worker, world, ranks_list, sizes, top, bottom))
    full = _global_rows(sum(sizes))
    off = row_offsets(sizes)
    group_members = next(rs for rs in ranks_list if len(rs) == len(sizes))
    outs = {results[g][0]: results[g][1] for g in group_members}
    assert sorted(outs) == list(range(len(sizes)))
    for r, o in outs.items():
        torch.testing.assert_close(o["halo"], _expected_halo(full, sizes, r, top, bottom), rtol=0, atol=0)
        torch.testing.assert_close(o["scatter"], full.narrow(1, off[r], sizes[r]), rtol=0, atol=0)
        torch.testing.assert_close(o["gather"], full, rtol=0, atol=0)
        assert o["sizes"] == list(sizes)
        expected_rs = sum(full + 100 * q for q in range(len(sizes))).narrow(1, off[r], sizes[r])
        torch.testing.assert_close(o["reduce_scatter"], expected_rs, rtol=0, atol=0)
    # Halo backward: the gradient of every global row is the sum of the output gradients that copies of it got.
    n = sum(sizes)
    expected = torch.zeros_like(full)
    for r, o in outs.items():
        g = o["halo_gout"]
        for i in range(g.shape[1]):
            row = off[r] - top + i
            if 0 <= row < n:
                expected[:, row] += g[:, i]
    for r, o in outs.items():
        torch.testing.assert_close(o["halo_grad"], expected.narrow(1, off[r], sizes[r]), rtol=0, atol=0)


class _SumGradsOverGroup(torch.autograd.Function):
    """Test helper. forward: identity on a replicated tensor; backward: all-reduce (sum) the gradient, so a
    replicated weight's analytical gradient on each rank is the whole gradient gradcheck expects."""

    @staticmethod
    def forward(ctx, w, group):
        ctx.group = group
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _gradcheck_worker(rank, world, sizes, what):
    group = dist.group.WORLD
    torch.manual_seed(0)  # the same X and weights on every rank
    n = sum(sizes)
    if what == "halo":
        x = torch.randn(2, 3, n, 4, dtype=torch.float64, requires_grad=True)

        def f(x):
            local = comm.scatter_rows(x, group, dim=2, sizes=sizes)
            h = comm.halo_exchange(local, group, dim=2, top=1, bottom=2)
            # a non-linear, row-dependent use of the halo so every halo row's gradient matters
            h = h * torch.arange(1, h.shape[2] + 1, dtype=h.dtype).view(1, 1, -1, 1)
            return comm.gather_rows(h.sin()[:, :, 1:-2], group, dim=2, sizes=sizes) + comm.gather_rows(
                h[:, :, :-3] * h[:, :, 3:], group, dim=2, sizes=sizes
            )

        return torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
    if what == "conv":
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        from parallel_vae.layers.causal_cache_conv import HaloCausalConv
        from parallel_vae.core.plan import SpatialState, sharded_class

        conv = WanCausalConv3d(2, 3, 3, padding=1).double()
        conv.__class__ = sharded_class(HaloCausalConv, WanCausalConv3d)
        conv._pv_state = SpatialState(group, dist.get_world_size(), 1)
        x = torch.randn(1, 2, 2, n, 3, dtype=torch.float64, requires_grad=True)
        cache = torch.randn(1, 2, 1, n, 3, dtype=torch.float64, requires_grad=True)
        w0 = conv.weight.detach().clone().requires_grad_(True)

        def g(x, cache, w):
            w = _SumGradsOverGroup.apply(w, group)
            xl = comm.scatter_rows(x, group, dim=3, sizes=sizes)
            cl = comm.scatter_rows(cache, group, dim=3, sizes=sizes)
            y = torch.func.functional_call(conv, {"weight": w, "bias": conv.bias}, (xl, cl))
            return comm.gather_rows(y, group, dim=3, sizes=sizes)

        return torch.autograd.gradcheck(g, (x, cache, w0), eps=1e-6, atol=1e-8, rtol=1e-6)
    if what == "attention_kv":
        x = torch.randn(2, 1, n, 3, dtype=torch.float64, requires_grad=True)

        def f(x):
            local = comm.scatter_rows(x, group, dim=2, sizes=sizes)
            q = local * 2
            kv = comm.gather_rows(local, group, dim=2, sizes=sizes, sum_grads=True)
            y = torch.nn.functional.scaled_dot_product_attention(q, kv, kv.cos())
            return comm.gather_rows(y, group, dim=2, sizes=sizes)

        return torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
    raise ValueError(what)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "world,sizes,what",
    [(2, [3, 2], "halo"), (3, [2, 3, 3], "halo"), (2, [2, 3], "conv"), (3, [3, 2, 2], "conv"), (3, [1, 3, 2], "attention_kv")],
)
def test_gradcheck_across_ranks(world, sizes, what):
    """float64 gradcheck of f(X) = gather(op(scatter(X))): every rank sees the whole Jacobian, so gradients that a
    backward fails to send to (or receive from) a neighbour show up as a mismatch."""
    assert all(values(run_ranks(_gradcheck_worker, world, sizes, what)))

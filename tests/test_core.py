"""The family-agnostic machinery on its own, float64, across ranks: distributed GroupNorm (forward, gradcheck,
uneven shards, large means), halo convolutions of any geometry and padding mode, composite padding (HunyuanVideo's
replicate pad + the conv's zero pad; HaloPadConv from layers/), and frame-causal sharded attention.

Each check computes f(X) = gather(op(scatter(X))) on every rank and compares it with op(X) unsharded; the gradchecks
see the whole Jacobian on every rank (at 3 ranks a random two-sided projection of it, torch's fast mode), so a
gradient that a backward fails to send to or receive from a neighbour shows up as a mismatch.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tests.dist_harness import run_ranks, values
from tests.test_comm import _SumGradsOverGroup  # forward: identity; backward: sum over the group


def _state(group):
    from parallel_vae.core.plan import SpatialState

    return SpatialState(group, dist.get_world_size(group), 1)


def _swap(module, mixin, group):
    from parallel_vae.core.plan import sharded_class

    module.__class__ = sharded_class(mixin, type(module))
    module._pv_state = _state(group)
    return module


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _out_sizes(sizes, stride, total):
    """Output rows per rank of a stride-``stride`` layer: rows / stride, the last rank also any extra rows the
    layer's bottom padding adds (e.g. 2 pad rows at stride 2)."""
    out = [s // stride for s in sizes]
    out[-1] += total - sum(out)
    return out


def _sharded(fn, sizes, group, dim=-2, out_sizes=None):
    """x -> gather(fn(scatter(x))): the sharded computation seen as a function of the whole input."""
    from parallel_vae.core import comm

    def run(x, *rest):
        local = comm.scatter_rows(x, group, dim=dim, sizes=sizes)
        y = fn(local, *rest)
        return comm.gather_rows(y, group, dim=dim, sizes=out_sizes or sizes)

    return run


def _gradcheck(world, f, inputs, **kw) -> bool:
    """gradcheck: the whole Jacobian at 2 ranks; at 3, torch's fast mode, which compares u^T J v for random u and v
    between the analytical and the numerical Jacobian. A gradient a rank fails to send or receive changes that
    product for almost every u, v, so it still fails, at a few forward passes instead of two per input element (the
    3-rank cases took 30 to 80 s each with the full Jacobian)."""
    return torch.autograd.gradcheck(f, inputs, fast_mode=world > 2, **kw)


def _core_worker(rank, world, sizes, what):
    """Returns {check name: (max rel error forward, gradcheck ok)} for this world's checks."""
    from parallel_vae.core import attention, halo, norm

    torch.manual_seed(0)  # the same tensors and weights on every rank
    group = dist.group.WORLD
    n = sum(sizes)
    out = {}
    if what == "groupnorm":
        for shape, mean in (((2, 6, n, 3), 0.0), ((2, 6, 2, n, 3), 0.0), ((1, 4, n, 5), 1e4)):
            x = (torch.randn(shape, dtype=torch.float64) + mean).requires_grad_(True)
            gn = nn.GroupNorm(3 if shape[1] == 6 else 2, shape[1], eps=1e-6).double()
            with torch.no_grad():
                gn.weight.copy_(torch.randn_like(gn.weight))
                gn.bias.copy_(torch.randn_like(gn.bias))
            ref = gn(x)
            w0, b0 = gn.weight.detach().clone().requires_grad_(True), gn.bias.detach().clone().requires_grad_(True)

            def f(x, w, b):
                w, b = _SumGradsOverGroup.apply(w, group), _SumGradsOverGroup.apply(b, group)
                return _sharded(lambda l: norm.distributed_group_norm(l, gn.num_groups, w, b, gn.eps, group), sizes, group)(x)

            err = _rel(f(x, w0, b0), ref)
            ok = _gradcheck(world, f, (x, w0, b0), eps=1e-6, atol=1e-7, rtol=1e-6) if mean == 0 else True
            # gradient parity against torch's own GroupNorm backward (also at mean 1e4)
            gout = torch.randn_like(ref)
            gx_ref, gw_ref, gb_ref = torch.autograd.grad(ref, (x, gn.weight, gn.bias), gout)
            gx, gw, gb = torch.autograd.grad(f(x, w0, b0), (x, w0, b0), gout)
            gerr = max(_rel(gx, gx_ref), _rel(gw, gw_ref), _rel(gb, gb_ref))
            out[f"groupnorm{tuple(shape)}-mean{mean:g}"] = (err, gerr, ok)
        # float32 at mean 1e4, std 1: E[x^2] - E[x]^2 gives a variance of 8 or 16 instead of 1 here (no digits
        # left); the merged centred sums must be as good as torch's own float32 GroupNorm, whose mean itself can
        # only be held to float32's spacing at 1e4 (~1e-4 of the std).
        x = (torch.randn(1, 4, n, 64, dtype=torch.float64) + 1e4).float()
        ref = F.group_norm(x.double(), 2, eps=1e-5)  # the exact normalization of the same float32 values
        own = _rel(F.group_norm(x, 2, eps=1e-5).double(), ref)
        y = _sharded(lambda l: norm.distributed_group_norm(l, 2, None, None, 1e-5, group), sizes, group)(x)
        xg = x.reshape(1, 2, -1)
        naive_var = ((xg * xg).mean(-1) - xg.mean(-1) ** 2).double()
        out["groupnorm-float32-mean1e4"] = (_rel(y.double(), ref) / (2 * own), 0.0, (naive_var - 1).abs().max() > 0.5)
        return out
    if what == "conv":
        cases = {
            # name: (module, input shape)
            "conv2d-k3-p1": (nn.Conv2d(2, 3, 3, padding=1), (2, 2, n, 5)),
            "conv2d-k5-p2-replicate": (nn.Conv2d(2, 3, 5, padding=2, padding_mode="replicate"), (1, 2, n, 5)),
            "conv2d-k3-p1-reflect": (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (1, 2, n, 5)),
            "conv2d-k3-d2-p2": (nn.Conv2d(2, 3, 3, padding=2, dilation=2), (1, 2, n, 4)),
            "conv2d-k3-s2-p1": (nn.Conv2d(2, 3, 3, stride=2, padding=1), (1, 2, n, 6)),
            "conv3d-k3-p1": (nn.Conv3d(2, 3, 3, padding=1), (1, 2, 3, n, 4)),
            "conv3d-k3-s2-p1-replicate": (nn.Conv3d(2, 2, 3, stride=(1, 2, 2), padding=1, padding_mode="replicate"), (1, 2, 2, n, 4)),
        }
        for name, (conv, shape) in cases.items():
            conv = conv.double()
            stride = conv.stride[-2]
            if any(s % stride for s in sizes[:-1]) or n % stride:
                continue
            x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
            ref = conv(x)
            w0 = conv.weight.detach().clone().requires_grad_(True)
            _swap(conv, halo.HaloConv, group)

            def f(x, w, conv=conv):
                w = _SumGradsOverGroup.apply(w, group)
                fn = lambda l: torch.func.functional_call(conv, {"weight": w, "bias": conv.bias}, (l,))
                return _sharded(fn, sizes, group, out_sizes=_out_sizes(sizes, stride, ref.shape[-2]))(x)

            out[name] = (_rel(f(x, w0), ref), 0.0, _gradcheck(world, f, (x, w0), eps=1e-6, atol=1e-7, rtol=1e-6))
        return out
    if what == "padconv":
        from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import HunyuanVideoCausalConv3d

        from parallel_vae.layers.pad_conv import HaloedInnerConv, HaloPadConv

        for name, kw in {"hv-k3": dict(), "hv-k3-s2-p1": dict(stride=(1, 2, 2), padding=1)}.items():
            conv = HunyuanVideoCausalConv3d(2, 3, 3, **kw).double()
            stride = conv.conv.stride[1]
            if any(s % stride for s in sizes[:-1]) or n % stride:
                continue
            x = torch.randn(1, 2, 3, n, 4, dtype=torch.float64, requires_grad=True)
            ref = conv(x)
            _swap(conv, HaloPadConv, group)
            _swap(conv.conv, HaloedInnerConv, group)  # the family plan's pair: the inner conv gets rows haloed
            f = _sharded(conv, sizes, group, out_sizes=_out_sizes(sizes, stride, ref.shape[-2]))
            out[name] = (_rel(f(x), ref), 0.0, _gradcheck(world, f, (x,), eps=1e-6, atol=1e-7, rtol=1e-6))
        return out
    if what == "attention":
        frames, w, heads, d = 3, 2, 2, 4
        q = torch.randn(1, heads, frames, n, w, d, dtype=torch.float64, requires_grad=True)
        k = torch.randn_like(q, requires_grad=True)
        v = torch.randn_like(q, requires_grad=True)
        # reference: the masked original (HunyuanVideo's prepare_causal_attention_mask) over (frames, rows, width)
        from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import prepare_causal_attention_mask

        mask = prepare_causal_attention_mask(frames, n * w, torch.float64, q.device)
        flat = lambda t: t.reshape(1, heads, frames * n * w, d)
        ref = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=mask).reshape(q.shape)

        def f(q, k, v):
            from parallel_vae.core import comm

            ql, kl, vl = (comm.scatter_rows(t, group, dim=3, sizes=sizes) for t in (q, k, v))
            rows = ql.shape[3]
            o = attention.frame_causal_sdpa(*(t.reshape(1, heads, frames * rows * w, d) for t in (ql, kl, vl)), frames, group)
            return comm.gather_rows(o.reshape(1, heads, frames, rows, w, d), group, dim=3, sizes=sizes)

        ok = _gradcheck(world, f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-6)
        out["frame-causal-attention"] = (_rel(f(q, k, v), ref), 0.0, ok)
        return out
    raise ValueError(what)


WORLDS = {2: [3, 2], 3: [2, 2, 4]}  # uneven splits; every shard even where a stride-2 layer needs it (3: 2/2/4)


@functools.lru_cache(maxsize=None)
def _results(world: int, what: str) -> dict:
    sizes = WORLDS[world] if what not in ("conv", "padconv") or world == 2 else [2, 2, 4]
    if what in ("conv", "padconv") and world == 2:
        sizes = [4, 2]
    per_rank = values(run_ranks(_core_worker, world, sizes, what))
    return per_rank[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("what", ["groupnorm", "conv", "padconv", "attention"])
def test_core_machinery(world, what):
    res = _results(world, what)
    assert res, "no check ran"
    for name, (err, gerr, ok) in res.items():
        # float32 at mean 1e4: err is the ratio to twice torch's own float32 GroupNorm error (<= 1 passes)
        bar = 1.0 if name == "groupnorm-float32-mean1e4" else 1e-10
        assert err <= bar, f"{name}: forward rel err {err:.3e} > {bar:g}"
        assert gerr <= 1e-10, f"{name}: gradient rel err {gerr:.3e}"
        assert ok, f"{name}: gradcheck failed"

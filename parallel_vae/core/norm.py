"""Normalization over rows that are split across ranks: GroupNorm with exact whole-tensor statistics.

A GroupNorm normalizes each (sample, group) over its channels and *all* positions, so a rank holding some of the
rows sees only part of each group. Statistics per shard are wrong; averaging per-rank means is right only for equal
shards; gathering the whole tensor saves no memory. Here each rank reduces its own rows to three numbers per
(sample, group): the count, the mean and the centred sum of squares, and the ranks' triples are merged with Chan's
formula (two of them: ``M2 = M2_a + M2_b + delta^2 * n_a * n_b / n``). That never forms E[x^2] - E[x]^2, which
loses every digit once the mean is large against the spread (mean 1e4, std 1 in float32).

The backward is its own collective: the input gradient of a normalization is

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),   g = dy * weight (per channel)

where both means run over the whole group, so each rank all-reduces its partial sums of g and g * xhat. The weight
and bias gradients are sums over this rank's rows only; the gradient contract (DESIGN.md) sums them over the group.

Every rank merges the same gathered table in the same order, so all ranks hold bit-identical statistics.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .comm import _all_gather_single, _all_reduce_sum, group_size

__all__ = ["distributed_group_norm", "distributed_batch_norm", "ShardedGroupNorm", "group_stats", "merge_stats"]


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs keep float32 statistics, as torch's own GroupNorm kernels accumulate in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_stats(xg: torch.Tensor) -> torch.Tensor:
    """(B, G, n) local elements -> (B, G, 3): count, mean, centred sum of squares (two passes, so no cancellation)."""
    xs = xg.to(_stat_dtype(xg.dtype))
    mean = xs.mean(-1)
    # (B, G, n) - (B, G, 1): the centred second pass, squared in place (one temporary of the input's size, not two:
    # it was the peak of the whole decode for Mochi, whose per-frame norms see every frame at once)
    m2 = (xs - mean.unsqueeze(-1)).square_().sum(-1)
    count = torch.full_like(mean, float(xg.shape[-1]))
    return torch.stack([count, mean, m2], -1)


def merge_stats(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, B, G, 3) per-rank (count, mean, M2) -> whole-group (count, mean, M2), merged pairwise left to right in
    float64 (Chan et al.); the same table gives the same bits on every rank."""
    t = table.double()
    n, mean, m2 = t[0, ..., 0], t[0, ..., 1], t[0, ..., 2]
    for r in range(1, t.shape[0]):
        nb, mb, m2b = t[r, ..., 0], t[r, ..., 1], t[r, ..., 2]
        tot = n + nb
        delta = mb - mean
        # A rank with no rows of this tensor (count 0) leaves the running values as they are.
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta.square() * (n * nb / tot)
        n = tot
    return n, mean, m2


def _forward_stats(xg: torch.Tensor, group, counts: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-group (mean, variance) per (sample, group), in the statistics dtype; ``counts``, when given, receives
    the whole-group element count per (sample, group) (float64)."""
    local = group_stats(xg)
    size = group_size(group)
    if size == 1:
        n, mean, m2 = local[..., 0], local[..., 1], local[..., 2]
    else:
        # (B, G, 3) -> (R, B, G, 3): every rank's triple; the gather runs in float64 so counts stay exact.
        table = local.new_empty((size,) + tuple(local.shape), dtype=torch.float64)
        _all_gather_single(table, local.double().unsqueeze(0).contiguous(), group)
        n, mean, m2 = merge_stats(table)
    if counts is not None:
        counts.append(n.double())
    dt = _stat_dtype(xg.dtype)
    return mean.to(dt), (m2 / n).to(dt)


class _DistributedGroupNorm(torch.autograd.Function):
    """forward: normalize with statistics merged over the group; backward: all-reduce the two gradient sums per
    (sample, group), then the local input, weight and bias gradients.

    Arithmetic runs in the statistics dtype (float32 for half inputs, as torch's own kernels do) and the result is
    cast back, so a bfloat16 model loses no more than the unsharded one."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, group, stats_out=None):
        b, c = x.shape[:2]
        dt = _stat_dtype(x.dtype)
        # (B, C, *positions) -> (B, G, C/G * positions): one row of statistics per (sample, group)
        xg = x.reshape(b, num_groups, -1)
        counts = [] if stats_out is not None else None
        mean, var = _forward_stats(xg, group, counts)
        if stats_out is not None:  # (mean, biased variance, count) for a caller's running averages (BatchNorm)
            stats_out.append((mean.detach(), var.detach(), counts[0]))
        rstd = (var + eps).rsqrt()
        # In place after the first op (no autograd inside a Function): the peak is input + output, as for torch's
        # own fused kernel, not input + three temporaries.
        y = xg.to(dt) - mean.unsqueeze(-1)
        y.mul_(rstd.unsqueeze(-1))
        y = y.reshape(x.shape)
        # (C,) -> (1, C, 1, ...): per-channel affine over every position
        shape = (1, c) + (1,) * (x.dim() - 2)
        if weight is not None:
            y.mul_(weight.to(dt).reshape(shape))
        if bias is not None:
            y.add_(bias.to(dt).reshape(shape))
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.num_groups, ctx.group, ctx.has_bias = num_groups, group, bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        b, c = x.shape[:2]
        groups, dt = ctx.num_groups, mean.dtype
        shape = (1, c) + (1,) * (x.dim() - 2)
        reduce_dims = [0] + list(range(2, x.dim()))
        xhat = x.reshape(b, groups, -1).to(dt) - mean.unsqueeze(-1)
        xhat.mul_(rstd.unsqueeze(-1))
        dy = dy.to(dt)
        dw = db = None
        if weight is not None and ctx.needs_input_grad[1]:
            dw = (dy * xhat.reshape(x.shape)).sum(reduce_dims).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(reduce_dims).to(weight.dtype if weight is not None else x.dtype)
        if not ctx.needs_input_grad[0]:
            return None, dw, db, None, None, None, None
        g = dy * weight.to(dt).reshape(shape) if weight is not None else dy.clone()
        g = g.reshape(b, groups, -1)
        # (B, G, 2): this rank's sums of g and g * xhat; the group's after the all-reduce (float64, so the element
        # counts stay exact at any size).
        sums = torch.stack([g.sum(-1), (g * xhat).sum(-1)], -1)
        count = torch.tensor([float(g.shape[-1])], dtype=dt, device=x.device)
        if group_size(ctx.group) > 1:
            packed = torch.cat([sums.reshape(-1), count]).double()
            _all_reduce_sum(packed, ctx.group)
            sums, count = packed[:-1].reshape(sums.shape).to(dt), packed[-1:].to(dt)
        mean_g = (sums[..., 0] / count).unsqueeze(-1)
        mean_gx = (sums[..., 1] / count).unsqueeze(-1)
        # dx = rstd * (g - mean(g) - xhat * mean(g xhat)), in place on g and xhat
        g.sub_(mean_g).sub_(xhat.mul_(mean_gx)).mul_(rstd.unsqueeze(-1))
        return g.reshape(x.shape).to(x.dtype), dw, db, None, None, None, None


def distributed_group_norm(
    x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5, group=None
) -> torch.Tensor:
    """forward: ``F.group_norm`` of the whole tensor whose rows are split over ``group``; backward: the exact input
    gradient (two all-reduced sums per sample and group) and this rank's weight/bias gradient contributions.

    ``x`` is (B, C, ...) with any trailing dims (rows may be any of them: statistics run over all of them). Shards may
    have any sizes, including different sizes on different ranks."""
    if x.shape[1] % num_groups:
        raise ValueError(f"{x.shape[1]} channels are not divisible into {num_groups} groups")
    return _DistributedGroupNorm.apply(x, weight, bias, num_groups, eps, group)


def distributed_batch_norm(
    x: torch.Tensor,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    group=None,
) -> torch.Tensor:
    """forward: ``F.batch_norm`` of the whole batch whose rows are split over ``group`` (in training: statistics
    over every rank's rows, and the running averages updated with them, identically on every rank); backward: the
    exact input gradient and this rank's weight/bias contributions.

    A training-mode BatchNorm is a GroupNorm with one group per channel over the whole batch: (B, C, *positions) is
    read as (1, C, B * positions) and normalized by :func:`distributed_group_norm`'s Function, so the statistics are
    Chan-merged (count, mean, M2) and the backward all-reduces the same two sums. In eval mode it is local."""
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    b, c = x.shape[:2]
    # (B, C, *positions) -> (1, C, B * positions): per-channel statistics over the batch and every position
    xc = x.transpose(0, 1).reshape(1, c, -1)
    stats = []
    y = _DistributedGroupNorm.apply(xc, weight, bias, c, eps, group, stats)
    # back to (B, C, *positions); a copy, not a view: later layers (LeakyReLU) may work in place
    y = y.reshape((c, b) + tuple(x.shape[2:])).transpose(0, 1).clone(memory_format=torch.contiguous_format)
    if running_mean is not None:
        mean, var, n = stats[0]
        with torch.no_grad():
            # nn.BatchNorm's update: the running variance takes the unbiased batch variance
            unbiased = var.double().reshape(c) * (n.reshape(c) / (n.reshape(c) - 1))
            running_mean.mul_(1 - momentum).add_(mean.reshape(c).to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return y


class ShardedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` over row shards: statistics merged over the spatial group (installed by class swap)."""

    _pv_state = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return distributed_group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self._pv_state.group)

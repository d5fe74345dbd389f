"""Normalization over rows that are split across ranks: GroupNorm with exact whole-tensor statistics.

A GroupNorm normalizes each (sample, group) over its channels and *all* positions, so a rank holding some of the
rows sees only part of each group. Statistics per shard are wrong; averaging per-rank means is right only for equal
shards; gathering the whole tensor saves no memory. Here each rank reduces its own rows to three numbers per
(sample, group): the count, the mean and the centred sum of squares, and the ranks' triples are merged with Chan's
formula (two of them: ``M2 = M2_a + M2_b + delta^2 * n_a * n_b / n``). That never forms E[x^2] - E[x]^2, which
loses every digit once the mean is large against the spread (mean 1e4, std 1 in float32).

The backward is its own collective: the input gradient of a normalization is

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),   g = dy * weight (per channel)

where both means run over the whole group, so each rank all-reduces its partial sums of g and g * xhat.

Kernels. Three passes over the data do all the work: the statistics (mean, then the centred sum of squares), the
normalize-and-affine, and in backward one reduction (per (sample, channel) sums of dy and dy * (x - mean)) and one
elementwise pass for dx. Each is a small function written once (``_stats_kernel``, ``_normalize_kernel``,
``_grad_sums_kernel``, ``_grad_input_kernel``) and run in one of two ways:

* compiled (``torch.compile``, inductor: C++ on CPU, Triton on CUDA) for tensors of ``COMPILE_MIN_NUMEL`` elements
  or more: each kernel reads half-precision values and accumulates in float32 in registers, so nothing the size of
  the shard is allocated but the output (and dx in backward). Measured in ``benchmarks/bench_groupnorm.py``.
* eager, chunk by chunk along the positions (``_CHUNK_NUMEL`` elements a chunk, at most ``_MAX_CHUNKS`` chunks):
  for small tensors, fake and meta tensors (``benchmarks/scale_table.py``), inside an outer ``torch.compile`` (which
  then fuses the kernels itself, unchunked), with ``PARALLEL_VAE_GROUPNORM=eager``, and when compiling failed (one
  warning, then eager for the rest of the process). A chunk's float32 temporaries are a bounded slice of the shard,
  never a float32 copy of all of it; chunk statistics are merged with the same Chan formula.

Autograd saves only the input (alive anyway), the weight, and (mean, rstd, count) per (sample, group).

Parameter gradients: every rank adds its float64 partial sums of dweight and dbias to the backward's one all-reduce;
group rank 0 returns the group's total, rounded once to the parameter's dtype, the other ranks zeros. Their sum over
the group (the gradient contract, docs/how-it-works.md) is then the single-process gradient with one rounding, as torch's own, and
not a sum of per-rank bfloat16 roundings. Every rank merges the same gathered table in the same order, so all ranks
hold bit-identical statistics; no value is read on the host.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .comm import _all_gather_single, _all_reduce_sum, group_rank, group_size
from .fake import is_fake

__all__ = ["distributed_group_norm", "distributed_batch_norm", "ShardedGroupNorm", "group_stats", "merge_stats", "kernel_mode"]

# Below this many elements per call the compiled kernels' dispatch overhead is not worth it (and every new shape
# would be one more compile): the eager path, one chunk, is as fast there.
COMPILE_MIN_NUMEL = 65536
# Eager chunks: positions per chunk so that one chunk holds about this many elements of the shard (4 MiB of float32
# temporaries), and never more than _MAX_CHUNKS chunks (the fake-tensor scale runs pay per op, not per byte).
_CHUNK_NUMEL = 1 << 20
_MAX_CHUNKS = 64
_ENV = "PARALLEL_VAE_GROUPNORM"  # "eager" forces the eager kernels; anything else (default "auto") may compile
_compiled: dict = {}
_compile_failed = False


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs keep float32 statistics, as torch's own GroupNorm kernels accumulate in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# The kernels: plain functions on (B, G, Cg, P) views, mean/rstd (B, G), per-channel vectors as (G, Cg)
# ---------------------------------------------------------------------------------------------------------------


def _stats_kernel(x4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, G, Cg, P) -> mean, centred sum of squares (B, G), two passes in the statistics dtype."""
    dt = _stat_dtype(x4.dtype)
    mean = x4.mean((2, 3), dtype=dt)
    m2 = (x4.to(dt) - mean[..., None, None]).square().sum((2, 3))
    return mean, m2


def _shifted_stats_kernel(x4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, G, Cg, P) -> mean, M2 (B, G) in one pass: sums of d = x - K and d^2 about a shift K per (sample, group),
    the mean of the group's first positions (all its channels). M2 = S2 - S1^2 / n loses only what (mean - K)^2
    adds to the variance (relative), not the mean's magnitude: a mean 1e4 with std 1 keeps its float32 digits.
    Used by the compiled path, where one read of the shard instead of two is most of the forward's time."""
    dt = _stat_dtype(x4.dtype)
    n = x4.shape[2] * x4.shape[3]
    k = x4[..., : min(x4.shape[3], 64)].mean((2, 3), dtype=dt)  # (B, G) shift
    d = x4.to(dt) - k[..., None, None]
    s1, s2 = d.sum((2, 3)), d.square().sum((2, 3))
    mean_d = s1 / n
    return k + mean_d, (s2 - s1 * mean_d).clamp_min(0)


def _normalize_kernel(x4, mean, rstd, weight, bias):
    """y = (x - mean) * rstd * weight + bias, computed in the statistics dtype, returned in x's dtype."""
    dt = mean.dtype
    scale = rstd[..., None] if weight is None else rstd[..., None] * weight.to(dt)  # (B, G, Cg)
    y = (x4.to(dt) - mean[..., None, None]) * scale[..., None]
    if bias is not None:
        y = y + bias.to(dt)[..., None]
    return y.to(x4.dtype)


def _grad_sums_kernel(x4, dy4, mean):
    """Per (sample, channel): sum of dy and sum of dy * (x - mean), each (B, G, Cg), in the statistics dtype."""
    dt = mean.dtype
    dy = dy4.to(dt)
    return dy.sum(-1), (dy * (x4.to(dt) - mean[..., None, None])).sum(-1)


def _grad_input_kernel(x4, dy4, mean, rstd, weight, mean_g, mean_gx):
    """dx = rstd * (w * dy - mean(g) - xhat * mean(g * xhat)), returned in x's dtype."""
    dt = mean.dtype
    g = dy4.to(dt) if weight is None else dy4.to(dt) * weight.to(dt)[..., None]
    xhat = (x4.to(dt) - mean[..., None, None]) * rstd[..., None, None]
    dx = (g - mean_g[..., None, None] - xhat * mean_gx[..., None, None]) * rstd[..., None, None]
    return dx.to(x4.dtype)


def kernel_mode(x: torch.Tensor) -> str:
    """"compiled" or "eager": which way the kernels run for ``x`` (see the module docstring)."""
    if (
        _compile_failed
        or os.environ.get(_ENV, "auto") == "eager"
        or x.numel() < COMPILE_MIN_NUMEL
        or x.device.type not in ("cpu", "cuda")
        or is_fake(x)
        or torch.compiler.is_compiling()
    ):
        return "eager"
    return "compiled"


def _run(name: str, fn, *args):
    """Call ``fn`` compiled; on a compile failure warn once and run eager from then on."""
    global _compile_failed
    if not _compile_failed:
        try:
            if name not in _compiled:
                _compiled[name] = torch.compile(fn, dynamic=None)
            return _compiled[name](*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager kernels give the same values
            _compile_failed = True
            warnings.warn(f"parallel_vae GroupNorm: torch.compile failed ({type(e).__name__}: {e}); using eager kernels")
    return fn(*args)


def _chunks(x4: torch.Tensor):
    """Position slices (start, length) of the eager path; one slice inside an outer torch.compile."""
    p = x4.shape[-1]
    if torch.compiler.is_compiling():
        return [(0, p)]
    per_pos = max(1, x4.numel() // max(p, 1))
    step = max(-(-_CHUNK_NUMEL // per_pos), -(-p // _MAX_CHUNKS), 1)
    return [(s, min(step, p - s)) for s in range(0, p, step)] or [(0, p)]


def group_stats(x4: torch.Tensor, mode: str = "eager") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, G, Cg, P) local elements -> (mean, M2) per (sample, group) in the statistics dtype; eager chunks are merged
    with Chan's formula (each chunk's statistics are themselves two-pass)."""
    if mode == "compiled":
        return _run("stats", _shifted_stats_kernel, x4)
    mean = m2 = None
    n = 0
    per = x4.shape[2]
    chunks = list(_chunks(x4))
    for start, length in chunks:
        mb, m2b = _stats_kernel(x4.narrow(-1, start, length))
        nb = per * length
        if mean is None:
            mean, m2, n = mb, m2b, nb
            if len(chunks) > 1:  # the merge runs in float64 ((B, G) numbers): a float32 running mean of 1e4
                mean, m2 = mean.double(), m2.double()  # would round at every chunk (3.2e-4 vs torch's 1.8e-4)
            continue
        delta = mb - mean
        tot = n + nb
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta.square() * (n * nb / tot)
        n = tot
    dt = _stat_dtype(x4.dtype)
    return mean.to(dt), m2.to(dt)


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


def _forward_stats(x4: torch.Tensor, group, mode: str):
    """Whole-group (mean, variance, count) per (sample, group); mean and variance in the statistics dtype, count a
    float64 tensor (B, G) on the merge path and a Python number on one rank (no host read either way)."""
    mean, m2 = group_stats(x4, mode)
    local_n = x4.shape[2] * x4.shape[3]
    size = group_size(group)
    if size == 1:
        return mean, m2 / max(local_n, 1), float(local_n)
    # (B, G, 3): this rank's (count, mean, M2); gathered to (R, B, G, 3) in float64 so counts stay exact.
    local = torch.stack([torch.full_like(mean, float(local_n), dtype=torch.float64), mean.double(), m2.double()], -1)
    table = local.new_empty((size,) + tuple(local.shape))
    _all_gather_single(table, local.unsqueeze(0).contiguous(), group)
    n, gmean, gm2 = merge_stats(table)
    dt = mean.dtype
    return gmean.to(dt), (gm2 / n).to(dt), n


class _DistributedGroupNorm(torch.autograd.Function):
    """forward: normalize with statistics merged over the group; backward: all-reduce the two gradient sums per
    (sample, group) and the parameter-gradient partials, then the local input gradient.

    Arithmetic runs in the statistics dtype (float32 for half inputs, as torch's own kernels do) and the result is
    cast back, so a bfloat16 model loses no more than the unsharded one."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, group, stats_out=None):
        b, c = x.shape[:2]
        mode = kernel_mode(x)
        # (B, C, *positions) -> (B, G, C/G, P): statistics per (sample, group), affine per (group, channel)
        x4 = x.reshape(b, num_groups, c // num_groups, -1)
        mean, var, count = _forward_stats(x4, group, mode)
        if stats_out is not None:  # (mean, biased variance, count) for a caller's running averages (BatchNorm)
            n = count if torch.is_tensor(count) else torch.full(mean.shape, count, dtype=torch.float64, device=x.device)
            stats_out.append((mean.detach(), var.detach(), n))
        rstd = (var + eps).rsqrt()
        w2 = None if weight is None else weight.reshape(num_groups, -1)
        b2 = None if bias is None else bias.reshape(num_groups, -1)
        if mode == "compiled":
            y = _run("normalize", _normalize_kernel, x4, mean, rstd, w2, b2)
        else:
            y = torch.empty_like(x4)
            for start, length in _chunks(x4):
                y.narrow(-1, start, length).copy_(_normalize_kernel(x4.narrow(-1, start, length), mean, rstd, w2, b2))
        ctx.save_for_backward(x, weight, mean, rstd, count if torch.is_tensor(count) else None)
        ctx.count, ctx.num_groups, ctx.group, ctx.has_bias = count, num_groups, group, bias is not None
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd, count_t = ctx.saved_tensors
        count = count_t if count_t is not None else ctx.count
        b, c = x.shape[:2]
        groups = ctx.num_groups
        mode = kernel_mode(x)
        x4 = x.reshape(b, groups, c // groups, -1)
        dy4 = dy.reshape(x4.shape)
        # per (sample, group, channel): sum of dy and of dy * (x - mean)
        if mode == "compiled":
            s_dy, s_dyc = _run("grad_sums", _grad_sums_kernel, x4, dy4, mean)
        else:
            s_dy = s_dyc = None
            for start, length in _chunks(x4):
                a, d = _grad_sums_kernel(x4.narrow(-1, start, length), dy4.narrow(-1, start, length), mean)
                s_dy, s_dyc = (a, d) if s_dy is None else (s_dy + a, s_dyc + d)
        w2 = None if weight is None else weight.reshape(groups, -1).to(mean.dtype)
        g_dy = s_dy if w2 is None else s_dy * w2  # (B, G, Cg): sums of g
        g_dyc = s_dyc if w2 is None else s_dyc * w2  # sums of g * (x - mean)
        # (B, G, 2): this rank's sums of g and g * xhat per (sample, group)
        sums = torch.stack([g_dy.sum(-1), g_dyc.sum(-1) * rstd], -1)
        want_w = weight is not None and ctx.needs_input_grad[1]
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        dw = (s_dyc * rstd[..., None]).sum(0).reshape(-1) if want_w else None  # (C,): sum of dy * xhat
        db = s_dy.sum(0).reshape(-1) if want_b else None  # (C,): sum of dy
        if group_size(ctx.group) > 1:
            # One all-reduce in float64: the group sums (exact counts at any size) and the parameter partials.
            parts = [sums.reshape(-1)] + [t for t in (dw, db) if t is not None]
            packed = torch.cat([p.double() for p in parts])
            _all_reduce_sum(packed, ctx.group)
            sums = packed[: sums.numel()].reshape(sums.shape).to(mean.dtype)
            # Group rank 0 returns the group's parameter gradient (one rounding); the others add exact zeros.
            keep = group_rank(ctx.group) == 0
            offset = sums.numel()
            if dw is not None:
                dw = packed[offset : offset + c] if keep else torch.zeros_like(dw)
                offset += c
            if db is not None:
                db = packed[offset : offset + c] if keep else torch.zeros_like(db)
        pdt = weight.dtype if weight is not None else x.dtype
        dw = None if dw is None else dw.to(pdt)
        db = None if db is None else db.to(pdt)
        if not ctx.needs_input_grad[0]:
            return None, dw, db, None, None, None, None
        # count: a Python number, or the merged float64 (B, G) counts (no host read)
        mean_g = (sums[..., 0].double() / count).to(mean.dtype)
        mean_gx = (sums[..., 1].double() / count).to(mean.dtype)
        w2k = None if weight is None else weight.reshape(groups, -1)
        if mode == "compiled":
            dx = _run("grad_input", _grad_input_kernel, x4, dy4, mean, rstd, w2k, mean_g, mean_gx)
        else:
            dx = torch.empty_like(x4)
            for start, length in _chunks(x4):
                sl = (x4.narrow(-1, start, length), dy4.narrow(-1, start, length))
                dx.narrow(-1, start, length).copy_(_grad_input_kernel(*sl, mean, rstd, w2k, mean_g, mean_gx))
        return dx.reshape(x.shape), dw, db, None, None, None, None


def distributed_group_norm(
    x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5, group=None
) -> torch.Tensor:
    """forward: ``F.group_norm`` of the whole tensor whose rows are split over ``group``; backward: the exact input
    gradient (two all-reduced sums per sample and group) and the group's weight/bias gradient on group rank 0
    (zeros on the others, so the sum over the group is the single-process gradient).

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

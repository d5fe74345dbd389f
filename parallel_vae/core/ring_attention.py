"""Ring attention: softmax attention of this rank's queries against every rank's keys and values, with the key/value
blocks passed around the group and merged by an online softmax, so that no rank ever holds the whole sequence's
keys and values.

The sequence (its tokens, dim -2 of (B, heads, L_r, d)) is split over the ranks of ``group`` in group-rank order,
with any sizes (``sizes[r]`` tokens on group rank r). Forward, on rank r of n:

* step s = 0 .. n-1: rank r holds the keys/values of rank (r - s) mod n; it posts their send to rank r + 1 and the
  receive of the next block from rank r - 1 (point-to-point, peers mapped to global ranks:
  :func:`parallel_vae.core.comm.ring_peers`), computes the block's attention for its own queries (the block's
  normalized output and its log-sum-exp), merges it into the running output with the log-sum-exp rule
  ``lse' = logaddexp(lse, lse_b)``, ``out' = out exp(lse - lse') + out_b exp(lse_b - lse')``, and waits;
* it keeps its queries, the output and the per-query log-sum-exp for the backward (no score matrix is kept).

Backward (its own ring pass, the shape of ring-flash-attention): with ``D = rowsum(dout * out)``, for each block
``P = exp(q k^T scale - lse)``, ``dV = P^T dout``, ``dS = P * (dout V^T - D)``, ``dQ += dS K scale``,
``dK = dS^T Q scale``. The key/value blocks travel as in the forward, and each block's dK/dV accumulator travels
with it, one hop behind: at step s rank r adds its contribution to the accumulator of the block it holds and sends
it on; after n hops every accumulator is back at its owner with every rank's contribution, summed in ring order.

Memory per rank: its queries, output and log-sum-exp, two key/value blocks (the one in use and the one arriving),
in the backward also two dK/dV accumulators, and the scores of a chunk of its queries against one block
(``Q_CHUNK_BYTES`` bounds them). Nothing grows with the other ranks' token counts beyond the largest block.

Each block is computed with plain matmuls in ``promote_types(dtype, float32)``: float64 stays float64 (the exactness
bar of this project is float64 parity), half types accumulate in float32.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .comm import _ring_shift_start, all_gather_sizes, group_rank, group_size

__all__ = ["ring_sdpa", "ring_forward", "ring_backward", "Q_CHUNK_BYTES"]

#: the largest score block (bytes) one chunk of queries against one key/value block may take
Q_CHUNK_BYTES = 64 << 20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _chunks(q: torch.Tensor, keys: int):
    """Slices of the query rows (dim -2) whose scores against ``keys`` keys fit in ``Q_CHUNK_BYTES``."""
    lead = math.prod(q.shape[:-2]) * max(keys, 1) * q.element_size()
    step = max(1, Q_CHUNK_BYTES // max(lead, 1))
    n = q.shape[-2]
    return [slice(a, min(a + step, n)) for a in range(0, n, step)]


def _block_forward(q, k, v, scale: float):
    """(normalized output, log-sum-exp) of ``q`` against one block of keys/values."""
    outs, lses = [], []
    for c in _chunks(q, k.shape[-2]):
        s = torch.matmul(q[..., c, :], k.transpose(-1, -2)) * scale
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)  # noqa: E741
        outs.append(torch.matmul(p, v) / l)
        lses.append(m + torch.log(l))
    return torch.cat(outs, -2), torch.cat(lses, -2)


def _merge(out, lse, out_b, lse_b):
    new = torch.logaddexp(lse, lse_b)
    return out * torch.exp(lse - new) + out_b * torch.exp(lse_b - new), new


def _block_backward(q, k, v, dout, lse, delta, scale: float):
    """(dQ, dK, dV) of one block: the softmax probabilities are recomputed from the saved log-sum-exp."""
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for c in _chunks(q, k.shape[-2]):
        qc = q[..., c, :]
        p = torch.exp(torch.matmul(qc, k.transpose(-1, -2)) * scale - lse[..., c, :])
        doc = dout[..., c, :]
        dv += torch.matmul(p.transpose(-1, -2), doc)
        ds = p * (torch.matmul(doc, v.transpose(-1, -2)) - delta[..., c, :])
        dq[..., c, :] = torch.matmul(ds, k) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
    return dq, dk, dv


def _rows(t: torch.Tensor, rows: int) -> list[int]:
    shape = list(t.shape)
    shape[-2] = rows
    return shape


def ring_forward(q, k, v, group, sizes: Sequence[int], scale: float):
    """The ring pass of the forward: (output, log-sum-exp) of this rank's queries, in the compute dtype."""
    rank, n = group_rank(group), group_size(group)
    ctype = _compute_dtype(q.dtype)
    qc = q.to(ctype)
    d_k = k.shape[-1]
    kv = torch.cat([k, v], -1)
    out = lse = None
    for step in range(n):
        pending = None
        if step < n - 1:  # the next block: rank (r - step - 1)'s, from the previous rank
            pending = _ring_shift_start(kv, _rows(kv, sizes[(rank - step - 1) % n]), group)
        kb, vb = kv.to(ctype).split([d_k, kv.shape[-1] - d_k], -1)
        out_b, lse_b = _block_forward(qc, kb, vb, scale)
        out, lse = (out_b, lse_b) if out is None else _merge(out, lse, out_b, lse_b)
        if pending is not None:
            kv = pending.wait()
    return out, lse


def ring_backward(dout, q, k, v, out, lse, group, sizes: Sequence[int], scale: float):
    """The ring pass of the backward: (dQ, dK, dV) for this rank's queries, keys and values."""
    rank, n = group_rank(group), group_size(group)
    ctype = _compute_dtype(q.dtype)
    qc, dout = q.to(ctype), dout.to(ctype)
    delta = (dout * out).sum(-1, keepdim=True)
    d_k = k.shape[-1]
    kv = torch.cat([k, v], -1)
    dkv = torch.zeros(kv.shape, dtype=ctype, device=kv.device)  # the accumulator of the block held now
    dq = torch.zeros_like(qc)
    for step in range(n):
        incoming = (rank - step - 1) % n  # the block held next (its accumulator is on the previous rank now)
        pending_kv = _ring_shift_start(kv, _rows(kv, sizes[incoming]), group) if step < n - 1 else None
        kb, vb = kv.to(ctype).split([d_k, kv.shape[-1] - d_k], -1)
        dq_b, dk_b, dv_b = _block_backward(qc, kb, vb, dout, lse, delta, scale)
        dq = dq + dq_b
        dkv = dkv + torch.cat([dk_b, dv_b], -1)
        # one hop behind the keys/values; after the last step this brings my own block's accumulator home
        dkv = _ring_shift_start(dkv, _rows(dkv, sizes[incoming]), group).wait()
        if pending_kv is not None:
            kv = pending_kv.wait()
    dk, dv = dkv.split([d_k, dkv.shape[-1] - d_k], -1)
    return dq.to(q.dtype), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


class _RingAttention(torch.autograd.Function):
    """forward: this rank's queries against every rank's keys/values, blocks passed around the ring and merged by
    log-sum-exp (:func:`ring_forward`); backward: its own ring pass (:func:`ring_backward`), each block's key/value
    gradients travelling with it back to their owner."""

    @staticmethod
    def forward(ctx, q, k, v, group, sizes, scale):
        out, lse = ring_forward(q, k, v, group, sizes, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.sizes, ctx.scale = group, sizes, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.group, ctx.sizes, ctx.scale)
        return dq, dk, dv, None, None, None


def ring_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group,
    sizes: Optional[Sequence[int]] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """forward: ``F.scaled_dot_product_attention`` (no mask) of this rank's queries (.., Lq, d) against every rank's
    keys/values (.., Lk_r, d) in group-rank order, computed by a ring of point-to-point steps; backward: a second
    ring pass, each key/value gradient summed over every rank's queries and returned to its owner.

    ``sizes``: every rank's Lk_r (from the agreed split); ``None`` gathers them (one small collective and a host
    read). ``scale``: SDPA's default 1/sqrt(d)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if group_size(group) == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if sizes is None:
        sizes = all_gather_sizes(k.shape[-2], group, k.device)
    sizes = tuple(int(s) for s in sizes)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _RingAttention.apply(q, k, v, group, sizes, scale)
    return ring_forward(q, k, v, group, sizes, scale)[0].to(q.dtype)

"""Communication for row-sharded tensors: private collectives, autograd Functions, public wrappers.

The file reads in three sections, in the order Megatron-LM's ``mappings.py`` uses:

1. private collectives (``_halo_exchange``, ``_halo_return``, ``_split``, ``_gather``, ``_reduce_scatter``):
   plain functions on tensors, no autograd, each testable on its own;
2. ``torch.autograd.Function`` classes named for their forward, whose backward calls the mirror helper;
3. one-line public wrappers with a "forward: X, backward: Y" docstring.

Every function takes an explicit ``group``. Point-to-point peers are *group* ranks mapped to *global* ranks
with ``dist.get_global_rank`` (passing a group rank as a global peer is the classic subgroup hang).
Every helper returns its input untouched (or the layer's own zero padding) when the group has one rank.
Edge ranks pad with zeros exactly as the layer's own padding would; there is no ring wrap.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .fake import is_fake, proportional_sizes
from .failure import wait_all
from .sharding import ShardingError, row_split

__all__ = [
    "halo_exchange",
    "neighbor_rows",
    "halo_pad",
    "scatter_rows",
    "gather_rows",
    "all_gather_sizes",
    "group_rank",
    "group_size",
    "CommCounter",
    "count_traffic",
]

# ---------------------------------------------------------------------------------------------------------------
# Section 1: private collectives
# ---------------------------------------------------------------------------------------------------------------


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Size of ``group`` (1 when torch.distributed is not initialized)."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    """This process's rank inside ``group`` (0 when torch.distributed is not initialized)."""
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def _global_peer(group: Optional[dist.ProcessGroup], peer: int) -> int:
    # P2P ops address global ranks; a group rank used directly talks to the wrong process on offset subgroups.
    if group is None or group is dist.GroupMember.WORLD:
        return peer
    return dist.get_global_rank(group, peer)


class CommCounter:
    """Bytes this process sent and received through the collectives below, per kind of collective.

    Logical volumes, independent of the backend's algorithm: a point-to-point message counts once at the sender
    and once at the receiver; an all-gather counts my shard once per peer as sent and the other shards as
    received; a reduce-scatter counts the other ranks' chunks as sent and my chunk once per peer as received.
    """

    def __init__(self) -> None:
        self.sent: Counter = Counter()
        self.received: Counter = Counter()
        self.calls: Counter = Counter()
        self.wait_s = 0.0  # wall time spent blocked on collectives (waiting for peers and for the transfer)

    def add(self, kind: str, sent: int, received: int) -> None:
        self.sent[kind] += sent
        self.received[kind] += received
        self.calls[kind] += 1

    def as_dict(self) -> dict:
        kinds = sorted(self.calls)
        return {
            "sent_bytes": sum(self.sent.values()),
            "received_bytes": sum(self.received.values()),
            "wait_s": self.wait_s,
            "by_kind": {k: {"sent": self.sent[k], "received": self.received[k], "calls": self.calls[k]} for k in kinds},
        }


# Off (None) by default: each collective then pays one global read.
_counter: Optional[CommCounter] = None


@contextlib.contextmanager
def count_traffic() -> Iterator[CommCounter]:
    """Count the bytes this process exchanges through ``parallel_vae``'s collectives inside the ``with`` block."""
    global _counter
    previous, _counter = _counter, CommCounter()
    try:
        yield _counter
    finally:
        _counter = previous


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _wait(works: Sequence) -> None:
    if _counter is None:
        wait_all(works)  # core/failure.py: plain waits, or polled ones inside fail_fast
        return
    start = time.perf_counter()
    wait_all(works)
    _counter.wait_s += time.perf_counter() - start


def _all_gather_single(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    if _counter is not None:
        peers = out.numel() // max(inp.numel(), 1) - 1
        _counter.add("all_gather", _nbytes(inp) * peers, _nbytes(out) - _nbytes(inp))
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _wait([fn(out, inp, group=group, async_op=True)])


def _all_reduce_sum(t: torch.Tensor, group) -> None:
    """In-place sum over the group (small statistics: GroupNorm's count/mean/M2 and its backward sums)."""
    if _counter is not None:
        peers = group_size(group) - 1
        _counter.add("all_reduce", _nbytes(t) * peers, _nbytes(t) * peers)
    _wait([dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True)])


def _reduce_scatter_single(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    if _counter is not None:
        peers = inp.numel() // max(out.numel(), 1) - 1
        _counter.add("reduce_scatter", _nbytes(inp) - _nbytes(out), _nbytes(out) * peers)
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    _wait([fn(out, inp, group=group, async_op=True)])


def _broadcast(t: torch.Tensor, group, src: int = 0) -> None:
    """In place: every rank's ``t`` becomes group rank ``src``'s (a constant drawn on one rank, e.g. noise)."""
    if _counter is not None:
        peers = group_size(group) - 1
        mine = group_rank(group) == src
        _counter.add("broadcast", _nbytes(t) * peers if mine else 0, 0 if mine else _nbytes(t))
    _wait([dist.broadcast(t, src=_global_peer(group, src), group=group, async_op=True)])


def _p2p_start(sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]], group) -> list:
    """Post all sends and receives (peers are group ranks) as one batch; return the works to wait on."""
    if _counter is not None:
        _counter.add("p2p", sum(_nbytes(t) for t, _ in sends), sum(_nbytes(t) for t, _ in recvs))
    ops = [dist.P2POp(dist.irecv, buf, _global_peer(group, peer), group) for buf, peer in recvs]
    ops += [dist.P2POp(dist.isend, t, _global_peer(group, peer), group) for t, peer in sends]
    return dist.batch_isend_irecv(ops) if ops else []


def _p2p(sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]], group) -> None:
    """Post all sends and receives (peers are group ranks) as one batch and wait for them."""
    _wait(_p2p_start(sends, recvs, group))


def _rows_shape(x: torch.Tensor, dim: int, rows: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] = rows
    return shape


def _halo_pad(
    x: torch.Tensor,
    group,
    dim: int,
    top: int,
    bottom: int,
    prefix: Optional[torch.Tensor] = None,
    cat_dim: int = 0,
    zero_front: int = 0,
    prefix_halo: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    bottom_edge: Optional[int] = None,
    fill_top: Optional[torch.Tensor] = None,
    fill_bottom: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One new tensor: along ``cat_dim``, ``zero_front`` zero slices, then ``prefix`` (if any), then ``x``; along
    ``dim``, ``top`` rows of the rank above and ``bottom`` rows of the rank below around my rows.

    At the global edges the padding is the layer's own: the global first rank gets ``top`` rows of ``fill_top``
    (zeros when None), the global last rank ``bottom_edge`` (default ``bottom``) rows of ``fill_bottom`` (zeros when
    None). ``bottom_edge`` differs from ``bottom`` for strided or asymmetrically padded layers (see
    :func:`parallel_vae.core.halo.conv_halo`). This is ``cat([zeros, prefix, x], cat_dim)`` followed by the halo
    exchange (a causal conv's cached frames and its zero time padding, then the height halo) written once, with my
    rows copied in while the neighbours' rows are in flight.

    ``prefix_halo`` = (rows above, rows below) of the prefix slices, already received earlier (a causal conv's
    cached frames were this rank's previous input, whose halo rows were exchanged then): only the halo rows of
    ``x`` travel. Every rank of the group must pass it or not at the same call.
    """
    rank, size = group_rank(group), group_size(group)
    last = rank == size - 1
    bottom_edge = bottom if bottom_edge is None else bottom_edge
    my_bottom = bottom_edge if last else bottom
    rows = x.size(dim)
    if size > 1 and rows < max(top, bottom):
        raise ShardingError(f"a shard of {rows} rows cannot supply a halo of {max(top, bottom)} rows")
    if (fill_top is not None or fill_bottom is not None) and prefix is not None:
        raise ValueError("edge fill rows and a prefix cannot be combined")
    parts = [p for p in (prefix, x) if p is not None]
    known = prefix.size(cat_dim) if prefix is not None and prefix_halo is not None else 0
    # step 0: the output and the halo receive buffers.
    shape = _rows_shape(x, dim, top + rows + my_bottom)
    data = sum(p.size(cat_dim) for p in parts)
    shape[cat_dim] = zero_front + data
    out = x.new_empty(shape)
    body = out.narrow(cat_dim, zero_front, data)  # the slices that carry data (the zero front has no halo to fetch)
    live = body.narrow(cat_dim, known, data - known)  # the slices whose halo rows travel now
    from_above = live.new_empty(_rows_shape(live, dim, top)) if top and rank > 0 else None
    from_below = live.new_empty(_rows_shape(live, dim, bottom)) if bottom and not last else None
    exchanged = parts[1:] if known else parts

    def edge(start: int, count: int) -> torch.Tensor:
        chunks = [p.narrow(dim, start, count) for p in exchanged]
        return torch.cat(chunks, cat_dim) if len(chunks) > 1 else chunks[0].contiguous()

    # step 1: post the exchange. My last `top` rows are the top halo of the rank below; my first `bottom` rows
    # the bottom halo of the rank above.
    sends, recvs = [], []
    if from_above is not None:
        recvs.append((from_above, rank - 1))
    if from_below is not None:
        recvs.append((from_below, rank + 1))
    if top and not last:
        sends.append((edge(rows - top, top), rank + 1))
    if bottom and rank > 0:
        sends.append((edge(0, bottom), rank - 1))
    works = _p2p_start(sends, recvs, group)
    # step 2: while the rows travel, copy mine in (and the prefix's known halo rows) and pad the global edges.
    if zero_front:
        out.narrow(cat_dim, 0, zero_front).zero_()
    offset = 0
    for p in parts:
        body.narrow(cat_dim, offset, p.size(cat_dim)).narrow(dim, top, rows).copy_(p)
        offset += p.size(cat_dim)
    if known:
        done = body.narrow(cat_dim, 0, known)
        if top:
            done.narrow(dim, 0, top).copy_(prefix_halo[0])
        if bottom:
            done.narrow(dim, top + rows, bottom).copy_(prefix_halo[1])
    if top and rank == 0:
        dest = live.narrow(dim, 0, top)
        dest.copy_(fill_top) if fill_top is not None else dest.zero_()
    if my_bottom and last:
        dest = live.narrow(dim, top + rows, my_bottom)
        dest.copy_(fill_bottom) if fill_bottom is not None else dest.zero_()
    # step 3: wait and attach the neighbours' rows.
    _wait(works)
    if from_above is not None:
        live.narrow(dim, 0, top).copy_(from_above)
    if from_below is not None:
        live.narrow(dim, top + rows, bottom).copy_(from_below)
    return out


def _halo_exchange(x: torch.Tensor, group, dim: int, top: int, bottom: int) -> torch.Tensor:
    """Return ``x`` with ``top`` rows of the rank above and ``bottom`` rows of the rank below attached along ``dim``.

    The global first rank gets ``top`` zero rows and the global last rank ``bottom`` zero rows, exactly the zero
    padding the unsharded layer applies.
    """
    if not top and not bottom:
        return x
    return _halo_pad(x, group, dim, top, bottom)


def _halo_return(grad: torch.Tensor, group, dim: int, top: int, bottom: int, bottom_edge: Optional[int] = None):
    """Mirror of :func:`_halo_pad`: send each halo's gradient to the rank that owns those rows, which adds it to its
    own edge rows (the exchange of :func:`_neighbor_rows_return`). Gradients of the global edges' padding rows are
    not touched here (zero padding has no owner; fill rows return their gradient through the op that built them)."""
    rank, size = group_rank(group), group_size(group)
    last = rank == size - 1
    my_bottom = (bottom if bottom_edge is None else bottom_edge) if last else bottom
    rows = grad.size(dim) - top - my_bottom
    mine = grad.narrow(dim, top, rows)
    g_above = grad.narrow(dim, 0, top if rank > 0 else 0)  # the rank above's rows (none above the global top)
    g_below = grad.narrow(dim, top + rows, bottom if not last else 0)
    out = _neighbor_rows_return(g_above, g_below, mine, group, dim, top, bottom)
    return mine.clone(memory_format=torch.contiguous_format) if out is mine else out


def _neighbor_rows(x: torch.Tensor, group, dim: int, top: int, bottom: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the last ``top`` rows of the rank above, the first ``bottom`` rows of the rank below); a global edge rank
    gets 0 rows on its open side. Only the halo rows are allocated: no copy of ``x``."""
    rank, size = group_rank(group), group_size(group)
    last = rank == size - 1
    above = x.new_empty(_rows_shape(x, dim, top if rank > 0 else 0))
    below = x.new_empty(_rows_shape(x, dim, bottom if not last else 0))
    rows = x.size(dim)
    sends, recvs = [], []
    if above.size(dim):
        recvs.append((above, rank - 1))
    if below.size(dim):
        recvs.append((below, rank + 1))
    if top and not last:
        sends.append((x.narrow(dim, rows - top, top).contiguous(), rank + 1))
    if bottom and rank > 0:
        sends.append((x.narrow(dim, 0, bottom).contiguous(), rank - 1))
    _p2p(sends, recvs, group)
    return above, below


def _neighbor_rows_return(g_above, g_below, g_x: torch.Tensor, group, dim: int, top: int, bottom: int):
    """Mirror of :func:`_neighbor_rows`: each halo's gradient goes back to the rank that owns those rows, which adds
    it to its own edge rows of (a copy of) ``g_x``, x's gradient from its other uses."""
    rank, size = group_rank(group), group_size(group)
    last = rank == size - 1
    rows = g_x.size(dim)
    like = g_x
    sends, recvs = [], []
    if g_above.size(dim):
        sends.append((g_above.contiguous(), rank - 1))
    if g_below.size(dim):
        sends.append((g_below.contiguous(), rank + 1))
    from_below = like.new_empty(_rows_shape(like, dim, top)) if top and not last else None
    from_above = like.new_empty(_rows_shape(like, dim, bottom)) if bottom and rank > 0 else None
    if from_below is not None:
        recvs.append((from_below, rank + 1))
    if from_above is not None:
        recvs.append((from_above, rank - 1))
    _p2p(sends, recvs, group)
    if from_below is None and from_above is None:
        return g_x
    out = g_x.clone(memory_format=torch.contiguous_format)  # autograd may hand the same buffer to other nodes
    if from_below is not None:
        out.narrow(dim, rows - top, top).add_(from_below)
    if from_above is not None:
        out.narrow(dim, 0, bottom).add_(from_above)
    return out


def all_gather_sizes(rows: int, group, device: torch.device) -> list[int]:
    """Row count of every rank of ``group`` (one small all-gather).

    Do NOT cache this result across calls: a cache hit on one rank and a miss on another means mismatched
    collectives and a hang.
    """
    size = group_size(group)
    if size == 1:
        return [rows]
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    out = torch.empty(size, dtype=torch.int64, device=device)
    _all_gather_single(out, mine, group)
    if is_fake(out):  # no values on fake tensors: the rows follow from the group's latent split (core/fake.py)
        return proportional_sizes(rows, size, group_rank(group))
    return [int(v) for v in out.tolist()]


def _split(x: torch.Tensor, group, dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """Keep this rank's rows of a tensor that every rank holds in full."""
    rank = group_rank(group)
    if x.size(dim) != sum(sizes):
        raise ShardingError(f"cannot take rows {list(sizes)} of a tensor with {x.size(dim)} rows")
    start = sum(sizes[:rank])
    return x.narrow(dim, start, sizes[rank]).contiguous()


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad dim 0 of ``x`` to ``rows`` rows (the collectives need equal sizes on every rank)."""
    if x.size(0) == rows:
        return x.contiguous()
    out = x.new_zeros((rows,) + tuple(x.shape[1:]))
    out[: x.size(0)] = x
    return out


def _gather(x: torch.Tensor, group, dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """All-gather every rank's rows (variable counts) into the full tensor, in group-rank order."""
    size = group_size(group)
    longest = max(sizes)
    # (.., rows, ..) -> (rows, ..): the collective concatenates along dim 0.
    local = _pad_rows(x.movedim(dim, 0), longest)
    out = local.new_empty((size * longest,) + tuple(local.shape[1:]))
    _all_gather_single(out, local, group)
    if all(s == longest for s in sizes):
        full = out
    else:
        full = torch.cat([out.narrow(0, r * longest, s) for r, s in enumerate(sizes)], 0)
    return full.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, group, dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """Mirror of :func:`_gather`: every rank holds a full tensor; each owner receives the sum over ranks of its rows."""
    rank, size = group_rank(group), group_size(group)
    longest = max(sizes)
    full = x.movedim(dim, 0)
    # (rows, ..) -> (size * longest, ..): each rank's chunk padded to the same length.
    chunks = [_pad_rows(c, longest) for c in full.split(list(sizes), 0)]
    inp = torch.cat(chunks, 0).contiguous()
    out = inp.new_empty((longest,) + tuple(inp.shape[1:]))
    _reduce_scatter_single(out, inp, group)
    return out.narrow(0, 0, sizes[rank]).movedim(0, dim).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Section 2: autograd Functions (named for their forward; backward calls the mirror helper)
# ---------------------------------------------------------------------------------------------------------------


class _HaloExchange(torch.autograd.Function):
    """forward: attach neighbours' edge rows; backward: return halo gradients to their owners."""

    @staticmethod
    def forward(ctx, x, group, dim, top, bottom):
        ctx.group, ctx.dim, ctx.top, ctx.bottom = group, dim, top, bottom
        return _halo_exchange(x, group, dim, top, bottom)

    @staticmethod
    def backward(ctx, grad):
        return _halo_return(grad, ctx.group, ctx.dim, ctx.top, ctx.bottom), None, None, None, None


class _HaloPad(torch.autograd.Function):
    """forward: [zeros, prefix, x] along cat_dim with neighbours' rows attached along dim (the layer's own padding
    rows at the global edges); backward: return halo gradients to their owners (those of already-known prefix halo
    rows to where those rows came from, those of edge fill rows to the op that built them), then split the rest
    between prefix and x."""

    @staticmethod
    def forward(
        ctx, x, prefix, prefix_above, prefix_below, fill_top, fill_bottom, group, dim, top, bottom, bottom_edge, cat_dim,
        zero_front,
    ):
        ctx.group, ctx.dim, ctx.top, ctx.bottom, ctx.cat_dim = group, dim, top, bottom, cat_dim
        ctx.bottom_edge = bottom if bottom_edge is None else bottom_edge
        ctx.zero_front, ctx.rows = zero_front, x.size(dim)
        ctx.split = [0 if prefix is None else prefix.size(cat_dim), x.size(cat_dim)]
        ctx.fills = (fill_top is not None, fill_bottom is not None)
        known = prefix is not None and (prefix_above is not None or prefix_below is not None)
        ctx.known = known
        halo = (prefix_above, prefix_below) if known else None
        return _halo_pad(
            x, group, dim, top, bottom, prefix, cat_dim, zero_front, halo, ctx.bottom_edge, fill_top, fill_bottom
        )

    @staticmethod
    def backward(ctx, grad):
        n_prefix, n_x = ctx.split
        dim, top, rows, bottom = ctx.dim, ctx.top, ctx.rows, ctx.bottom
        body = grad.narrow(ctx.cat_dim, ctx.zero_front, n_prefix + n_x)
        g_above = g_below = None
        g_fill_top = body.narrow(dim, 0, top) if ctx.fills[0] else None
        g_fill_bottom = body.narrow(dim, top + rows, ctx.bottom_edge) if ctx.fills[1] else None
        if ctx.known:
            done = body.narrow(ctx.cat_dim, 0, n_prefix)
            g_prefix = done.narrow(dim, top, rows)
            g_above = done.narrow(dim, 0, top) if top else None
            g_below = done.narrow(dim, top + rows, bottom) if bottom else None
            g_x = _halo_return(body.narrow(ctx.cat_dim, n_prefix, n_x), ctx.group, dim, top, bottom, ctx.bottom_edge)
        else:
            mine = _halo_return(body, ctx.group, dim, top, bottom, ctx.bottom_edge)
            g_prefix = mine.narrow(ctx.cat_dim, 0, n_prefix) if n_prefix else None
            g_x = mine.narrow(ctx.cat_dim, n_prefix, n_x)
        return (g_x, g_prefix, g_above, g_below, g_fill_top, g_fill_bottom) + (None,) * 7


class _NeighborRows(torch.autograd.Function):
    """forward: (x itself, the neighbours' edge rows), no copy of x; backward: send the halo rows' gradients back to
    their owners, who add them to their edge rows of x's gradient.

    x passes through (a view) so that every rank runs this backward: a rank whose own halos happen to be unused
    (rank 0 of a layer that reads nothing from below) must still answer its neighbour's send."""

    @staticmethod
    def forward(ctx, x, group, dim, top, bottom):
        ctx.group, ctx.dim, ctx.top, ctx.bottom = group, dim, top, bottom
        above, below = _neighbor_rows(x, group, dim, top, bottom)
        return x.view_as(x), above, below

    @staticmethod
    def backward(ctx, g_x, g_above, g_below):
        g = _neighbor_rows_return(g_above, g_below, g_x, ctx.group, ctx.dim, ctx.top, ctx.bottom)
        return g, None, None, None, None


class _ScatterToSpatialRegion(torch.autograd.Function):
    """forward: keep my rows of a replicated tensor; backward: all-gather the row gradients."""

    @staticmethod
    def forward(ctx, x, group, dim, sizes):
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        return _split(x, group, dim, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, ctx.dim, ctx.sizes), None, None, None


class _GatherFromSpatialRegion(torch.autograd.Function):
    """forward: all-gather rows into the full tensor; backward: keep my rows' gradient (``sum_grads=False``, every
    rank computed the same loss of the full tensor) or reduce-scatter it (``sum_grads=True``, each rank's loss
    is a different part of the total, as for attention keys/values)."""

    @staticmethod
    def forward(ctx, x, group, dim, sizes, sum_grads):
        ctx.group, ctx.dim, ctx.sizes, ctx.sum_grads = group, dim, sizes, sum_grads
        return _gather(x, group, dim, sizes)

    @staticmethod
    def backward(ctx, grad):
        if ctx.sum_grads:
            return _reduce_scatter(grad, ctx.group, ctx.dim, ctx.sizes), None, None, None, None
        return _split(grad, ctx.group, ctx.dim, ctx.sizes), None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Section 3: public wrappers
# ---------------------------------------------------------------------------------------------------------------


def halo_exchange(x: torch.Tensor, group=None, dim: int = -2, top: int = 1, bottom: int = 1) -> torch.Tensor:
    """forward: attach ``top`` rows from the rank above and ``bottom`` from the rank below (zeros at the global
    edges); backward: send the halo gradients back, the owner adds them to its edge rows (dim ``dim``)."""
    dim = dim % x.dim()
    if group_size(group) == 1:
        return torch.cat([x.new_zeros(_rows_shape(x, dim, top)), x, x.new_zeros(_rows_shape(x, dim, bottom))], dim)
    return _HaloExchange.apply(x, group, dim, top, bottom)


def halo_pad(
    x: torch.Tensor,
    group=None,
    dim: int = -2,
    top: int = 1,
    bottom: int = 1,
    prefix: Optional[torch.Tensor] = None,
    cat_dim: int = 2,
    zero_front: int = 0,
    prefix_halo: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    bottom_edge: Optional[int] = None,
    fill_top: Optional[torch.Tensor] = None,
    fill_bottom: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """forward: one tensor holding ``zero_front`` zero slices, ``prefix`` and ``x`` along ``cat_dim``, with ``top``
    rows from the rank above and ``bottom`` from the rank below along ``dim``; at the global top ``fill_top`` (or
    zeros), at the global bottom ``bottom_edge`` rows of ``fill_bottom`` (or zeros); backward: send the halo
    gradients back (the owner adds them to its edge rows), return the fill rows' gradients, and split the rest
    between ``prefix`` and ``x``.

    Equal to ``halo_exchange(F.pad(torch.cat([prefix, x], cat_dim), <zero_front before along cat_dim>), ...)``
    with one copy instead of three. ``prefix_halo`` = (the ``top`` rows above, the ``bottom`` rows below) of
    ``prefix``, when they are already known (received with an earlier exchange): then only ``x``'s rows travel,
    and every rank of the group must pass it at the same call. ``fill_top`` / ``fill_bottom`` are used by the
    global edge ranks only (others pass None) and cannot be combined with a prefix.
    """
    dim, cat_dim = dim % x.dim(), cat_dim % x.dim()
    if dim == cat_dim:
        if prefix is not None or zero_front:
            raise ValueError("halo_pad needs different dims for the halo and the concatenation")
        cat_dim = (dim + 1) % x.dim()  # nothing is concatenated: any other dim will do
    if group_size(group) == 1:
        parts = [x.new_zeros(_rows_shape(x, cat_dim, zero_front))] if zero_front else []
        parts += [p for p in (prefix, x) if p is not None]
        body = torch.cat(parts, cat_dim) if len(parts) > 1 else x
        edge = bottom if bottom_edge is None else bottom_edge
        upper = fill_top if fill_top is not None else body.new_zeros(_rows_shape(body, dim, top))
        lower = fill_bottom if fill_bottom is not None else body.new_zeros(_rows_shape(body, dim, edge))
        return torch.cat([upper, body, lower], dim) if top or edge else body
    above, below = prefix_halo if prefix_halo is not None and prefix is not None else (None, None)
    return _HaloPad.apply(
        x, prefix, above, below, fill_top, fill_bottom, group, dim, top, bottom, bottom_edge, cat_dim, zero_front
    )


def neighbor_rows(x: torch.Tensor, group=None, dim: int = -2, top: int = 1, bottom: int = 1):
    """forward: (``x``, the ``top`` last rows of the rank above, the ``bottom`` first rows of the rank below), 0 rows
    at the global edges, without copying ``x``; backward: the halo rows' gradients go back to the owners' edge rows
    (dim ``dim``). Use the returned ``x`` (not the argument) downstream: it carries the backward on every rank."""
    dim = dim % x.dim()
    if group_size(group) == 1:
        return x, x.narrow(dim, 0, 0), x.narrow(dim, 0, 0)
    return _NeighborRows.apply(x, group, dim, top, bottom)


def scatter_rows(
    x: torch.Tensor, group=None, dim: int = -2, sizes: Optional[Sequence[int]] = None, unit: int = 1
) -> torch.Tensor:
    """forward: keep my rows of a tensor every rank holds in full; backward: all-gather the row gradients (dim ``dim``).

    ``sizes`` are the row counts per group rank; by default a balanced split in blocks of ``unit`` rows
    (``unit`` = the spatial factor for pixel tensors, so shards stay aligned with the latent grid).
    """
    dim = dim % x.dim()
    size = group_size(group)
    if size == 1:
        return x
    if sizes is None:
        if x.size(dim) % unit:
            raise ShardingError(f"{x.size(dim)} rows are not a multiple of the shard unit {unit}")
        sizes = [s * unit for s in row_split(x.size(dim) // unit, size)]
    return _ScatterToSpatialRegion.apply(x, group, dim, tuple(sizes))


def gather_rows(
    x: torch.Tensor,
    group=None,
    dim: int = -2,
    sizes: Optional[Sequence[int]] = None,
    sum_grads: bool = False,
) -> torch.Tensor:
    """forward: all-gather every rank's rows into the full tensor; backward: keep my rows' gradient, or with
    ``sum_grads=True`` reduce-scatter it (dim ``dim``).

    Use ``sum_grads=False`` when every rank computes the same loss of the gathered tensor (replicated mode) and
    ``sum_grads=True`` when ranks compute different losses from it. ``sizes`` (row counts per rank) are gathered
    with one small collective when not given.
    """
    dim = dim % x.dim()
    if group_size(group) == 1:
        return x
    if sizes is None:
        sizes = all_gather_sizes(x.size(dim), group, x.device)
    return _GatherFromSpatialRegion.apply(x, group, dim, tuple(sizes), sum_grads)

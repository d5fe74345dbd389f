"""Communication for row-sharded tensors: private collectives, autograd Functions, public wrappers.

The file reads in three sections, in the order Megatron-LM's ``mappings.py`` uses:

1. private collectives (``_all_to_all_start``, ``_all_gather``, ``_reduce_scatter_sum``, ``_split``, ``_gather``,
   ``_reduce_scatter``): plain functions on tensors, each testable on its own;
2. ``torch.autograd.Function`` classes named for their forward, whose backward calls the mirror helper: one
   exchange (``_ExchangeEdgeRows``, an all-to-all of edge rows), the scatter and the gather;
3. public wrappers with a "forward: X, backward: Y" docstring. The halo wrappers cut the edge rows out and put the
   received rows in place with ordinary differentiable ops: autograd does the local assembly.

Every collective goes through ``torch.distributed``'s functional collectives (``torch.ops._c10d_functional``):
Dynamo traces them, so ``torch.compile`` keeps them in its graph, and eager gets their asynchronous form (post,
compute, then wait) for free. Every function takes an explicit ``group``; the collectives name it by its
registered name, and the all-to-all's split sizes are per *group* rank, so subgroups need no peer mapping (the
broadcast's source is the one global rank). Every helper returns its input untouched (or the layer's own
padding) when the group has one rank. Edge ranks pad exactly as the layer's own padding would; no ring wrap.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from .fake import is_fake, proportional_sizes
from .failure import wait_tensor
from .sharding import ShardingError, row_split

__all__ = [
    "halo_exchange",
    "neighbor_rows",
    "start_neighbor_rows",
    "PendingRows",
    "halo_pad",
    "scatter_rows",
    "gather_rows",
    "start_gather_rows",
    "PendingGather",
    "all_gather_sizes",
    "group_rank",
    "group_size",
    "CommCounter",
    "set_overlap",
    "overlap_enabled",
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
        self.wait_by_kind: Counter = Counter()  # the same, per kind of collective waited on

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
            "wait_s_by_kind": dict(sorted(self.wait_by_kind.items())),
            "by_kind": {k: {"sent": self.sent[k], "received": self.received[k], "calls": self.calls[k]} for k in kinds},
        }


# Off (None) by default: each collective then pays one global read.
_counter: Optional[CommCounter] = None

_OVERLAP = True


def set_overlap(enabled: bool) -> bool:
    """Whether the layers overlap their collectives with local work (default on); returns the previous setting.

    On: ``corrected_conv`` (core/halo.py) convolves its own rows while the halo rows travel, and attention
    (core/attention.py) projects its queries while the keys and values travel. Off: each waits right after
    posting, then does the same local work. The arithmetic and its order are the same either way, so outputs and
    gradients are bitwise equal; only where the waits fall differs (``benchmarks/bench_vae.py`` compares both)."""
    global _OVERLAP
    previous, _OVERLAP = _OVERLAP, bool(enabled)
    return previous


def overlap_enabled() -> bool:
    """See :func:`set_overlap`."""
    return _OVERLAP


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


def _group_name(group) -> str:
    # The functional collectives address a group by its registered name (what Dynamo traces, not the object).
    return (dist.group.WORLD if group is None else group).group_name


def _counting() -> bool:
    # Counting is eager bookkeeping: a traced graph neither reads the counter nor times its waits.
    return _counter is not None and not torch.compiler.is_compiling()


def _wait_tensor(t: torch.Tensor, kind: str = "other") -> torch.Tensor:
    """Wait for a functional collective's result (identity for autograd); the wait is timed when counting, in all
    and per ``kind`` (the :class:`CommCounter` kinds)."""
    if torch.compiler.is_compiling():
        return torch.ops._c10d_functional.wait_tensor(t)
    if not _counting():
        return wait_tensor(t)  # core/failure.py: a plain wait, or a watched one inside fail_fast
    start = time.perf_counter()
    out = wait_tensor(t)
    waited = time.perf_counter() - start
    _counter.wait_s += waited
    _counter.wait_by_kind[kind] += waited
    return out


def _all_to_all_start(
    send: torch.Tensor, recv_splits: Sequence[int], send_splits: Sequence[int], group
) -> torch.Tensor:
    """Post an all-to-all of dim 0 of ``send`` (``send_splits[r]`` rows to group rank r; ``recv_splits[r]`` rows
    from it) and return the receive buffer, not yet waited on (see :func:`_wait_tensor`)."""
    if _counting():
        row = _nbytes(send) // max(send.size(0), 1) if send.size(0) else 0
        _counter.add("p2p", row * sum(send_splits), row * sum(recv_splits))
    return torch.ops._c10d_functional.all_to_all_single(send, list(recv_splits), list(send_splits), _group_name(group))


def _all_gather_start(inp: torch.Tensor, group) -> torch.Tensor:
    """Post the gather of every rank's ``inp`` (equal shapes) along dim 0 in group-rank order and return the result,
    not yet waited on (see :func:`_wait_tensor`)."""
    size = group_size(group)
    if _counting():
        _counter.add("all_gather", _nbytes(inp) * (size - 1), _nbytes(inp) * (size - 1))
    return torch.ops._c10d_functional.all_gather_into_tensor(inp.contiguous(), size, _group_name(group))


def _all_gather(inp: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``inp`` (equal shapes) concatenated along dim 0 in group-rank order."""
    return _wait_tensor(_all_gather_start(inp, group), "all_gather")


def _all_gather_single(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """In place: ``out`` becomes every rank's ``inp`` along dim 0 (small tables: the agreement, norm statistics)."""
    out.copy_(_all_gather(inp, group).view_as(out))


def _all_reduce_sum(t: torch.Tensor, group) -> None:
    """In-place sum over the group (small statistics: GroupNorm's count/mean/M2 and its backward sums)."""
    if _counting():
        peers = group_size(group) - 1
        _counter.add("all_reduce", _nbytes(t) * peers, _nbytes(t) * peers)
    out = torch.ops._c10d_functional.all_reduce(t.contiguous(), "sum", _group_name(group))
    t.copy_(_wait_tensor(out, "all_reduce"))


def _reduce_scatter_sum(inp: torch.Tensor, group) -> torch.Tensor:
    """Chunk r (of ``group_size`` equal chunks along dim 0) of the sum over ranks of ``inp``, on group rank r."""
    size = group_size(group)
    if _counting():
        chunk = _nbytes(inp) // size
        _counter.add("reduce_scatter", _nbytes(inp) - chunk, chunk * (size - 1))
    out = torch.ops._c10d_functional.reduce_scatter_tensor(inp.contiguous(), "sum", size, _group_name(group))
    return _wait_tensor(out, "reduce_scatter")


def _broadcast(t: torch.Tensor, group, src: int = 0) -> None:
    """In place: every rank's ``t`` becomes group rank ``src``'s (a constant drawn on one rank, e.g. noise)."""
    if _counting():
        peers = group_size(group) - 1
        mine = group_rank(group) == src
        _counter.add("broadcast", _nbytes(t) * peers if mine else 0, 0 if mine else _nbytes(t))
    root = _global_peer(group, src)  # the functional broadcast names its source by global rank
    t.copy_(_wait_tensor(torch.ops._c10d_functional.broadcast(t.contiguous(), root, _group_name(group)), "broadcast"))


def ring_peers(group) -> tuple[int, int]:
    """(global rank of the next group rank, global rank of the previous one) on the ring of ``group``'s ranks in
    group-rank order: point-to-point ops address global ranks, so an offset subgroup must map its group ranks."""
    rank, size = group_rank(group), group_size(group)
    return _global_peer(group, (rank + 1) % size), _global_peer(group, (rank - 1) % size)


class PendingShift:
    """One posted ring step (:func:`_ring_shift_start`): :meth:`wait` returns the tensor received from the previous
    rank. The sent tensor is held until then (a point-to-point send reads it while in flight)."""

    def __init__(self, recv: torch.Tensor, works: list, send: torch.Tensor):
        self._recv, self._works, self._send = recv, works, send

    def wait(self) -> torch.Tensor:
        if self._works is not None:
            start = time.perf_counter() if _counting() else None
            for w in self._works:
                w.wait()
            if start is not None:
                waited = time.perf_counter() - start
                _counter.wait_s += waited
                _counter.wait_by_kind["ring"] += waited
            self._works, self._send = None, None
        return self._recv


def _ring_shift_start(send: torch.Tensor, recv_shape: Sequence[int], group) -> PendingShift:
    """Post one step of a ring: ``send`` to the next group rank, a tensor of ``recv_shape`` from the previous one
    (point-to-point, ``dist.batch_isend_irecv``, peers mapped to global ranks). Not yet waited on."""
    send = send.contiguous()
    recv = send.new_empty(tuple(recv_shape))
    if _counting():
        _counter.add("ring", _nbytes(send), _nbytes(recv))
    nxt, prv = ring_peers(group)
    ops = [dist.P2POp(dist.isend, send, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
    return PendingShift(recv, dist.batch_isend_irecv(ops), send)


def _rows_shape(x: torch.Tensor, dim: int, rows: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] = rows
    return shape


def _edge_splits(rank: int, size: int, top: int, bottom: int) -> tuple[list[int], list[int]]:
    """(rows I send to each group rank, rows I receive from each): my first ``bottom`` rows go to the rank above
    (its rows below), my last ``top`` rows to the rank below (its rows above); nothing crosses the global edges."""
    send, recv = [0] * size, [0] * size
    if rank > 0:
        send[rank - 1], recv[rank - 1] = bottom, top
    if rank < size - 1:
        send[rank + 1], recv[rank + 1] = top, bottom
    return send, recv


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


def _gather_start(x: torch.Tensor, group, dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """Post the all-gather of every rank's rows (variable counts, each padded to the longest); returns the padded
    result (size * longest, ..), rows first, not yet waited on: :func:`_gather_finish` waits and unpads it."""
    # (.., rows, ..) -> (rows, ..): the collective concatenates along dim 0.
    return _all_gather_start(_pad_rows(x.movedim(dim, 0), max(sizes)), group)


def _gather_finish(out: torch.Tensor, dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """Wait for :func:`_gather_start`'s result, then drop each rank's padding rows: the full tensor in rank order.
    The unpadding reads the received rows, so it can only come after the wait: keep it out of the posting side."""
    out = _wait_tensor(out, "all_gather")
    longest = max(sizes)
    if all(s == longest for s in sizes):
        full = out
    else:
        full = torch.cat([out.narrow(0, r * longest, s) for r, s in enumerate(sizes)], 0)
    return full.movedim(0, dim).contiguous()


def _gather(x: torch.Tensor, group, dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """All-gather every rank's rows (variable counts) into the full tensor, in group-rank order."""
    return _gather_finish(_gather_start(x, group, dim, sizes), dim, sizes)


def _reduce_scatter(x: torch.Tensor, group, dim: int, sizes: Sequence[int]) -> torch.Tensor:
    """Mirror of :func:`_gather`: every rank holds a full tensor; each owner receives the sum over ranks of its rows."""
    rank = group_rank(group)
    longest = max(sizes)
    full = x.movedim(dim, 0)
    # (rows, ..) -> (size * longest, ..): each rank's chunk padded to the same length.
    chunks = [_pad_rows(c, longest) for c in full.split(list(sizes), 0)]
    out = _reduce_scatter_sum(torch.cat(chunks, 0), group)  # (longest, ..)
    return out.narrow(0, 0, sizes[rank]).movedim(0, dim).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Section 2: autograd Functions (named for their forward; backward calls the mirror helper)
# ---------------------------------------------------------------------------------------------------------------


class _ExchangeEdgeRows(torch.autograd.Function):
    """forward: all-to-all of edge rows to the neighbours (posted, not waited); backward: the same all-to-all with
    the splits swapped, so each halo row's gradient returns to the rank that owns the row.

    ``send`` holds (rows first) my first rows for the rank above, then my last rows for the rank below; the result
    holds (rows first) the rank above's last rows, then the rank below's first rows. Cutting the edge rows out of
    ``x`` and placing the received rows is plain autograd around this Function.

    ``x`` passes through (a view) so that every rank runs this backward: a rank whose received rows happen to go
    unused (none come from below the global bottom) must still answer its neighbour's gradient send."""

    @staticmethod
    def forward(ctx, x, send, group, send_splits, recv_splits):
        ctx.group, ctx.send_splits, ctx.recv_splits = group, send_splits, recv_splits
        return x.view_as(x), _all_to_all_start(send, recv_splits, send_splits, group)

    @staticmethod
    def backward(ctx, g_x, g_recv):
        g_send = _all_to_all_start(g_recv.contiguous(), ctx.send_splits, ctx.recv_splits, ctx.group)
        g_send = _wait_tensor(g_send, "p2p")
        return g_x, g_send, None, None, None


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
    """forward: post the all-gather of rows (padded to the longest shard, rows first; not waited: the wait and the
    unpadding are plain autograd after it, :class:`PendingGather`); backward: keep my rows' gradient
    (``sum_grads=False``, every rank computed the same loss of the full tensor) or reduce-scatter it
    (``sum_grads=True``, each rank's loss is a different part of the total, as for attention keys/values).

    The gradient arriving here is in the padded layout, its padding rows zero (autograd's backward of the
    unpadding), which is the layout the reduce-scatter sends: each rank's chunk of ``longest`` rows."""

    @staticmethod
    def forward(ctx, x, group, dim, sizes, sum_grads):
        ctx.group, ctx.dim, ctx.sizes, ctx.sum_grads = group, dim, sizes, sum_grads
        return _gather_start(x, group, dim, sizes)

    @staticmethod
    def backward(ctx, grad):
        rank, rows = group_rank(ctx.group), ctx.sizes[group_rank(ctx.group)]
        if ctx.sum_grads:
            mine = _reduce_scatter_sum(grad, ctx.group)  # (longest, ..): the sum over ranks of my chunk
        else:
            mine = grad.narrow(0, rank * max(ctx.sizes), max(ctx.sizes))
        # (rows, ..) -> (.., rows, ..): my rows, without their padding, back in x's layout
        return mine.narrow(0, 0, rows).movedim(0, ctx.dim).contiguous(), None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Section 3: public wrappers
# ---------------------------------------------------------------------------------------------------------------


class PendingRows:
    """The neighbours' edge rows of one posted exchange (:func:`start_neighbor_rows`).

    ``x`` is the input to use downstream (it carries the exchange's backward on every rank); :meth:`wait` returns
    (the rank above's last ``top`` rows, the rank below's first ``bottom`` rows), 0 rows at the global edges."""

    def __init__(self, x: torch.Tensor, recv: Optional[torch.Tensor], dim: int, n_above: int):
        self.x, self._recv, self._dim, self._n_above = x, recv, dim, n_above

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, dim = self.x, self._dim
        if self._recv is None:  # one rank: nothing travels
            return x.narrow(dim, 0, 0), x.narrow(dim, 0, 0)
        recv = _wait_tensor(self._recv, "p2p")
        n_above, n = self._n_above, recv.size(0)
        # (rows, ..) -> (.., rows, ..): back to x's layout; views, no copy
        return recv.narrow(0, 0, n_above).movedim(0, dim), recv.narrow(0, n_above, n - n_above).movedim(0, dim)


def start_neighbor_rows(x: torch.Tensor, group=None, dim: int = -2, top: int = 1, bottom: int = 1) -> PendingRows:
    """forward: post the exchange of my last ``top`` rows (to the rank below) and my first ``bottom`` rows (to the
    rank above) and return at once; backward: each halo row's gradient goes back to its owner (dim ``dim``).

    Work that needs only my rows can run between this and :meth:`PendingRows.wait`: the rows travel meanwhile."""
    dim = dim % x.dim()
    rank, size = group_rank(group), group_size(group)
    if size == 1:
        return PendingRows(x, None, dim, 0)
    rows = x.size(dim)
    if rows < max(top, bottom):
        raise ShardingError(f"a shard of {rows} rows cannot supply a halo of {max(top, bottom)} rows")
    send_splits, recv_splits = _edge_splits(rank, size, top, bottom)
    # (.., rows, ..) -> (rows, ..): the all-to-all splits dim 0; only the edge rows are copied
    first = x.narrow(dim, 0, send_splits[rank - 1] if rank > 0 else 0)  # for the rank above
    last = x.narrow(dim, rows - top, send_splits[rank + 1] if rank < size - 1 else 0)  # for the rank below
    send = torch.cat([first.movedim(dim, 0), last.movedim(dim, 0)], 0)
    x, recv = _ExchangeEdgeRows.apply(x, send, group, tuple(send_splits), tuple(recv_splits))
    return PendingRows(x, recv, dim, recv_splits[rank - 1] if rank > 0 else 0)


def neighbor_rows(x: torch.Tensor, group=None, dim: int = -2, top: int = 1, bottom: int = 1):
    """forward: (``x``, the ``top`` last rows of the rank above, the ``bottom`` first rows of the rank below), 0 rows
    at the global edges, without copying ``x``; backward: the halo rows' gradients go back to the owners' edge rows
    (dim ``dim``). Use the returned ``x`` (not the argument) downstream: it carries the backward on every rank."""
    pending = start_neighbor_rows(x, group, dim, top, bottom)
    above, below = pending.wait()
    return pending.x, above, below


def halo_exchange(x: torch.Tensor, group=None, dim: int = -2, top: int = 1, bottom: int = 1) -> torch.Tensor:
    """forward: attach ``top`` rows from the rank above and ``bottom`` from the rank below (zeros at the global
    edges); backward: send the halo gradients back, the owner adds them to its edge rows (dim ``dim``)."""
    return halo_pad(x, group, dim, top, bottom)


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

    Equal to ``halo_exchange(F.pad(torch.cat([prefix, x], cat_dim), <zero_front before along cat_dim>), ...)``.
    ``prefix_halo`` = (the ``top`` rows above, the ``bottom`` rows below) of ``prefix``, when they are already
    known (received with an earlier exchange): then only ``x``'s rows travel, and every rank of the group must pass
    it at the same call. ``fill_top`` / ``fill_bottom`` are used by the global edge ranks only (others pass None)
    and cannot be combined with a prefix. The assembly is autograd's (``torch.cat``); only the edge rows travel.
    """
    dim, cat_dim = dim % x.dim(), cat_dim % x.dim()
    if dim == cat_dim:
        if prefix is not None or zero_front:
            raise ValueError("halo_pad needs different dims for the halo and the concatenation")
        cat_dim = (dim + 1) % x.dim()  # nothing is concatenated: any other dim will do
    if (fill_top is not None or fill_bottom is not None) and prefix is not None:
        raise ValueError("edge fill rows and a prefix cannot be combined")
    rank, size = group_rank(group), group_size(group)
    edge = bottom if bottom_edge is None else bottom_edge
    known = prefix is not None and prefix_halo is not None and size > 1
    # step 1: the slices whose edge rows travel now (the prefix's are known already when prefix_halo is given).
    live = x if prefix is None or known else torch.cat([prefix, x], cat_dim)
    if size > 1 and (top or bottom):
        live, above, below = neighbor_rows(live, group, dim, top, bottom)
    else:
        above, below = live.narrow(dim, 0, 0), live.narrow(dim, 0, 0)
    # step 2: the layer's own padding at the global edges.
    if rank == 0:
        above = fill_top if fill_top is not None else live.new_zeros(_rows_shape(live, dim, top))
    if rank == size - 1:
        below = fill_bottom if fill_bottom is not None else live.new_zeros(_rows_shape(live, dim, edge))
    if known:  # the prefix's halo rows were received with an earlier exchange (at the edges: its padding rows)
        live = torch.cat([prefix, live], cat_dim)
        above, below = torch.cat([prefix_halo[0], above], cat_dim), torch.cat([prefix_halo[1], below], cat_dim)
    # step 3: (causal) zero slices in front, then the rows around mine.
    if zero_front:
        front = lambda t: torch.cat([t.new_zeros(_rows_shape(t, cat_dim, zero_front)), t], cat_dim)  # noqa: E731
        live, above, below = front(live), front(above), front(below)
    parts = [p for p in (above, live, below) if p.size(dim)]
    return torch.cat(parts, dim) if len(parts) > 1 else live


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


class PendingGather:
    """The full tensor of one posted gather (:func:`start_gather_rows`): :meth:`wait` returns it (every rank's rows
    in rank order along ``dim``), waiting for the collective on the first call only."""

    def __init__(self, x: torch.Tensor, raw: Optional[torch.Tensor], dim: int, sizes: Sequence[int]):
        self._x, self._raw, self._dim, self._sizes = x, raw, dim, sizes

    def wait(self) -> torch.Tensor:
        if self._raw is not None:  # first call: wait and unpad (one rank: nothing travelled, x is the whole)
            self._x, self._raw = _gather_finish(self._raw, self._dim, self._sizes), None
        return self._x


def start_gather_rows(
    x: torch.Tensor,
    group=None,
    dim: int = -2,
    sizes: Optional[Sequence[int]] = None,
    sum_grads: bool = False,
) -> PendingGather:
    """forward: post the all-gather of every rank's rows and return at once; backward: as :func:`gather_rows`.

    Work that does not need the gathered rows can run between this and :meth:`PendingGather.wait`: the rows travel
    meanwhile (attention projects its queries while the keys and values travel)."""
    dim = dim % x.dim()
    if group_size(group) == 1:
        return PendingGather(x, None, dim, (x.size(dim),))
    if sizes is None:
        sizes = all_gather_sizes(x.size(dim), group, x.device)
    sizes = tuple(sizes)
    return PendingGather(x, _GatherFromSpatialRegion.apply(x, group, dim, sizes, sum_grads), dim, sizes)


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
    return start_gather_rows(x, group, dim, sizes, sum_grads).wait()

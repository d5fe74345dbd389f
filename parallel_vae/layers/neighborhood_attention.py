"""Neighbourhood attention on row shards: own queries against the rows of their windows (LTX-2.5's diffusion decoder).

Neighbourhood attention (NATTEN's ``na3d``, and diffusers' FlexAttention stand-in for it,
``ltx2_diffusion_decoder._neighborhood_block_mask``) lets the query at (t, h, w) attend to a ``kt x kh x kw`` box
of keys that is centred on it where possible and *shifted inward* at the grid's borders, so that it always holds
``kt * kh * kw`` keys: along one axis of length L and kernel k, query i sees keys
``[s(i), s(i) + k)`` with ``s(i) = clamp(i - k // 2, 0, L - k)``.

On row shards the frames and columns are whole, so only the row axis reaches other ranks. A rank owning rows
``[a, b)`` needs key rows ``[s(a), s(b - 1) + kh)``: ``kh // 2`` rows each side inside the frame, up to ``kh - 1``
on one side at the global top and bottom (the inward shift), and more than one neighbour's rows when the shards are
thinner than the reach. :func:`window_rows` receives exactly those rows, from whichever ranks own them, in one
all-to-all (the halo exchange's own autograd Function, ``comm._ExchangeEdgeRows``: its backward sends every key
row's gradient back to its owner, who adds it). No rank computes another rank's queries, and no rank holds more
keys than its own rows' windows.

The attention itself (:func:`neighborhood_sdpa`) runs per query frame and block of query rows and columns: each
block attends to the union of its queries' windows (kt frames x the rows and columns its queries reach) through
SDPA with a boolean mask of the exact per-query windows, so the scores are (block queries) x (their box of keys),
never (tokens x tokens), and the block is sized to a fixed budget.

The rotary embedding (``LTX2VideoVaeRotaryPosEmbed3D``) rotates by the tensor's own 0-based positions; on a shard
those must be the global rows (:class:`ShardedRotaryPosEmbed3D`). It rounds its input to float32 and back, also in a
float64 model (and its gradient likewise), which the float64 tests read as float64 on both sides
(``tests/float64_internals.py``), as for the other float32-inside layers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..core.comm import _ExchangeEdgeRows, _wait_tensor, all_gather_sizes, group_rank, group_size
from ..core.plan import SpatialState

__all__ = [
    "window_start",
    "row_windows",
    "window_rows",
    "neighborhood_sdpa",
    "ShardedNeighborhoodAttention",
    "ShardedRotaryPosEmbed3D",
]

#: score elements (query x key pairs, times batch and heads) one SDPA call of :func:`neighborhood_sdpa` may hold
SCORE_BUDGET = 1 << 22


def window_start(i, length: int, kernel: int):
    """First key index of query ``i``'s window along an axis of ``length`` (NATTEN's inward shift at the borders);
    ``i`` an int or an integer tensor."""
    if isinstance(i, torch.Tensor):
        return torch.clamp(i - kernel // 2, 0, length - kernel)
    return min(max(i - kernel // 2, 0), length - kernel)


def row_windows(sizes: Sequence[int], kernel: int) -> list[tuple[int, int]]:
    """Per rank (its rows ``sizes[r]``, in group-rank order): the global key rows [lo, hi) its queries' windows span."""
    total, out, start = sum(sizes), [], 0
    for s in sizes:
        out.append((window_start(start, total, kernel), window_start(start + s - 1, total, kernel) + kernel))
        start += s
    return out


def window_rows(x: torch.Tensor, group, dim: int, sizes: Sequence[int], windows: Sequence[tuple[int, int]]) -> torch.Tensor:
    """forward: rows ``windows[me]`` (global [lo, hi), containing my own rows) of the tensor whose row shards
    (``sizes``, group-rank order) the ranks hold, from whichever ranks own them, in one all-to-all; backward: each
    received row's gradient goes back to its owner, who adds it to its own row (dim ``dim``)."""
    dim = dim % x.dim()
    size, me = group_size(group), group_rank(group)
    offsets = [sum(sizes[:r]) for r in range(size)]
    a, b = offsets[me], offsets[me] + sizes[me]
    lo, hi = windows[me]
    if x.size(dim) != sizes[me] or not lo <= a <= b <= hi:
        raise ValueError(f"rows {a}..{b} with window {lo}..{hi}: not a shard of the split {list(sizes)}")
    if size == 1:
        return x

    def overlap(r: int, win: tuple[int, int]) -> tuple[int, int]:
        start, stop = max(offsets[r], win[0]), min(offsets[r] + sizes[r], win[1])
        return start, max(stop - start, 0)

    send_splits, recv_splits, parts = [0] * size, [0] * size, []
    for r in range(size):
        if r == me:
            continue
        start, n = overlap(me, windows[r])  # my rows that rank r's window reads
        send_splits[r] = n
        if n:
            parts.append(x.narrow(dim, start - a, n).movedim(dim, 0))
        recv_splits[r] = overlap(r, (lo, hi))[1]  # rank r's rows that my window reads
    # (.., rows, ..) -> (rows, ..): the all-to-all splits dim 0
    send = torch.cat(parts, 0) if parts else x.narrow(dim, 0, 0).movedim(dim, 0).contiguous()
    x, recv = _ExchangeEdgeRows.apply(x, send, group, tuple(send_splits), tuple(recv_splits))
    recv = _wait_tensor(recv, "p2p")
    above = sum(recv_splits[:me])  # rows from lower ranks come first (rank order), all above mine
    pieces = [recv.narrow(0, 0, above).movedim(0, dim), x, recv.narrow(0, above, recv.size(0) - above).movedim(0, dim)]
    return torch.cat([p for p in pieces if p.size(dim)], dim)


def _blocks(length: int, block: int) -> list[tuple[int, int]]:
    return [(i, min(i + block, length)) for i in range(0, length, block)]


def neighborhood_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: tuple[int, int, int],
    q_row0: int,
    k_row0: int,
    height: int,
    scale: float = 1.0,
) -> torch.Tensor:
    """Neighbourhood attention of ``q`` (B, T, h_q, W, heads, d): global rows [q_row0, q_row0 + h_q) of a grid of
    ``height`` rows, against ``k``/``v`` (B, T, h_k, W, heads, d), global rows [k_row0, k_row0 + h_k), which must
    hold every row the queries' windows read. Frames and columns are whole. Returns (B, T, h_q, W, heads, d)."""
    batch, frames, h_q, width, heads, d = q.shape
    kt, kh, kw = kernel
    dev = q.device
    # the exact windows per query row / column, as masks over the key rows / columns this rank holds
    q_rows = torch.arange(q_row0, q_row0 + h_q, device=dev)
    k_rows = torch.arange(k_row0, k_row0 + k.shape[2], device=dev)
    r_start = window_start(q_rows, height, kh)
    row_mask = (k_rows[None] >= r_start[:, None]) & (k_rows[None] < r_start[:, None] + kh)  # (h_q, h_k)
    cols = torch.arange(width, device=dev)
    c_start = window_start(cols, width, kw)
    col_mask = (cols[None] >= c_start[:, None]) & (cols[None] < c_start[:, None] + kw)  # (W, W)
    # block sizes: halve rows, then columns, until one block's scores fit the budget
    bh, bw = h_q, width

    def cost(bh: int, bw: int) -> int:
        return batch * heads * bh * bw * kt * min(bh + kh - 1, k.shape[2]) * min(bw + kw - 1, width)

    while cost(bh, bw) > SCORE_BUDGET and (bh > 1 or bw > 1):
        if bh >= bw and bh > 1:
            bh = (bh + 1) // 2
        else:
            bw = (bw + 1) // 2
    out = torch.empty_like(q) if not torch.is_grad_enabled() else None
    frames_out = []
    for t in range(frames):
        t0 = window_start(t, frames, kt)
        kf, vf = k[:, t0 : t0 + kt], v[:, t0 : t0 + kt]  # (B, kt, h_k, W, heads, d)
        rows_out = []
        for r0, r1 in _blocks(h_q, bh):
            # key rows of this block's windows, local to k: [lo, hi)
            lo = int(window_start(q_row0 + r0, height, kh)) - k_row0
            hi = int(window_start(q_row0 + r1 - 1, height, kh)) + kh - k_row0
            cols_out = []
            for c0, c1 in _blocks(width, bw):
                w_lo, w_hi = window_start(c0, width, kw), window_start(c1 - 1, width, kw) + kw
                qb = q[:, t, r0:r1, c0:c1]  # (B, bh, bw, heads, d)
                kb = kf[:, :, lo:hi, w_lo:w_hi]  # (B, kt, rows, cols, heads, d)
                vb = vf[:, :, lo:hi, w_lo:w_hi]
                # (B, n, heads, d) -> (B, heads, n, d)
                qs = qb.reshape(batch, -1, heads, d).transpose(1, 2)
                ks = kb.reshape(batch, -1, heads, d).transpose(1, 2)
                vs = vb.reshape(batch, -1, heads, d).transpose(1, 2)
                # (bh, bw) queries x (kt, rows, cols) keys: the row window and the column window
                mask = row_mask[r0:r1, None, None, lo:hi, None] & col_mask[None, c0:c1, None, None, w_lo:w_hi]
                mask = mask.expand(r1 - r0, c1 - c0, kt, hi - lo, w_hi - w_lo).reshape(qs.shape[2], ks.shape[2])
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
                o = o.transpose(1, 2).reshape(batch, r1 - r0, c1 - c0, heads, d)
                if out is not None:
                    out[:, t, r0:r1, c0:c1] = o
                else:
                    cols_out.append(o)
            if out is None:
                rows_out.append(torch.cat(cols_out, 2))
        if out is None:
            frames_out.append(torch.cat(rows_out, 1))
    return out if out is not None else torch.stack(frames_out, 1)


class ShardedRotaryPosEmbed3D:
    """``LTX2VideoVaeRotaryPosEmbed3D`` on a row shard: diffusers' forward with the row axis rotated by the global
    row positions. The owning attention sets ``_pv_rows`` = (first global row, height) for the call; frames and
    columns are whole. The rotation itself is the module's own ``_rotate_axis`` (float32 inside, as diffusers')."""

    _pv_state: SpatialState
    _pv_rows: Optional[tuple[int, int]] = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._pv_rows is None:
            return super().forward(hidden_states)
        first, _ = self._pv_rows
        dim_t, dim_h, _ = self.rope_dim_split
        num_frames, rows, width = hidden_states.shape[1:4]
        device = hidden_states.device
        inv_t, inv_h, inv_w = (self._inv_freqs(dim, device) for dim in self.rope_dim_split)
        positions_t = torch.arange(num_frames, dtype=torch.float32, device=device)
        positions_h = torch.arange(first, first + rows, dtype=torch.float32, device=device)  # global rows
        positions_w = torch.arange(width, dtype=torch.float32, device=device)
        rotated_t = self._rotate_axis(hidden_states[..., :dim_t], positions_t, inv_t, axis=1)
        rotated_h = self._rotate_axis(hidden_states[..., dim_t : dim_t + dim_h], positions_h, inv_h, axis=2)
        rotated_w = self._rotate_axis(hidden_states[..., dim_t + dim_h :], positions_w, inv_w, axis=3)
        return torch.cat([rotated_t, rotated_h, rotated_w], dim=-1)


class ShardedNeighborhoodAttention:
    """``LTX2VideoVaeNeighborhoodAttention`` on row shards (channels-last (B, T, h, W, C) in and out): this rank's
    queries, keys and values (RMS-normed, query scaled, rotated at the global rows: the module's own
    ``project_qkv``), the keys and values of its queries' windows from the ranks that own them (:func:`window_rows`,
    one exchange of K and V together), then :func:`neighborhood_sdpa` and the module's ``to_out[0]``, as both of
    diffusers' processors (FlexAttention, NATTEN) do. Builds no flex ``BlockMask``."""

    _pv_state: SpatialState

    def build_block_mask(self, hidden_states):
        return None  # the decoder asks each stage for one; the sharded forward reads none

    def forward(self, hidden_states: torch.Tensor, block_mask=None) -> torch.Tensor:
        batch, frames, rows, width, channels = hidden_states.shape
        group = self._pv_state.group
        sizes = self._pv_state.level_sizes(rows)
        if sizes is None:
            sizes = all_gather_sizes(rows, group, hidden_states.device)
        me, height = group_rank(group), sum(sizes)
        first = sum(sizes[:me])
        kt, kh, kw = self.kernel_size
        if frames < kt or height < kh or width < kw:
            raise ValueError(
                f"Neighborhood attention requires each spatial dim to be at least its kernel size; got "
                f"(T, H, W) = ({frames}, {height}, {width}) with kernel_size {self.kernel_size}."
            )
        self.rope._pv_rows = (first, height)
        try:
            query, key, value = self.project_qkv(hidden_states)
        finally:
            self.rope._pv_rows = None
        windows = row_windows(sizes, kh)
        # one exchange for keys and values: (B, T, rows, W, heads, 2 * head_dim)
        kv = window_rows(torch.cat([key, value], -1), group, 2, sizes, windows)
        key, value = kv.split(self.head_dim, -1)
        out = neighborhood_sdpa(query, key, value, self.kernel_size, first, windows[me][0], height, scale=1.0)
        return self.to_out[0](out.reshape(batch, frames, rows, width, channels))

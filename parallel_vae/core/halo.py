"""Halo machinery: the halo arithmetic of a convolution, edge padding, and the generic halo conv, on row shards.

A halo class (``HaloConv`` here; the layer-specific ones in :mod:`parallel_vae.layers`) is a *mixin* that supplies
``forward`` for a layer class it stands in for; the plan installs ``sharded_class(mixin, type(module))`` by
swapping the instance's ``__class__`` (see :mod:`.plan`), so parameters, buffers, ``state_dict`` keys, hooks and
``isinstance`` checks are untouched and disabling restores the class.
Rows are dim -2 of every tensor (4-D images (B, C, H, W) and 5-D videos (B, C, T, H, W)).

The arithmetic of a convolution's halo (``conv_halo``): a kernel of height k, dilation d and stride s with p_top
rows of padding above needs, for the output rows of a shard that starts on a multiple of s,

* p_top rows above: the rank above's last rows, or the layer's own padding at the global top;
* d (k - 1) - p_top - (s - 1) rows below from the rank below (inner boundary), or the layer's own p_bottom rows
  of padding at the global bottom.

The padding at the global edges is exactly the layer's own (zeros, replicate, reflect or constant, or a sequence
of them, e.g. HunyuanVideo's replicate pad followed by the convolution's zero pad): the edge rank builds those rows
from its own rows with the same ``F.pad`` the layer uses, so their gradient flows back through the same op. An edge
shard too short for its padding (a reflect of n rows reads n + 1; LTX-2's decoder on one latent row per rank) builds
it after the exchange, from its rows and the neighbour's halo rows, which hold the rows it lacks.

The oneDNN note (``_conv``) is why the convolutions call a kernel directly.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .comm import group_rank, group_size, halo_pad, overlap_enabled, set_overlap, start_neighbor_rows
from .fake import is_fake
from .plan import SpatialState, Treatment, original_class, sharded_class, unknown_module
from .sharding import ShardingError

__all__ = [
    "recompute_boundary_rows",
    "corrected_conv",
    "set_overlap",
    "overlap_enabled",
    "conv_halo",
    "conv_treatment",
    "edge_rows",
    "halo_rows",
    "halo_for_conv",
    "HaloConv",
]

# (mode, rows, value) applied innermost first, e.g. (("replicate", 1, 0.0), ("zeros", 1, 0.0)).
PadSpec = Sequence[tuple]


def _onednn(x: torch.Tensor) -> bool:
    # Not on fake tensors (core/fake.py) and not while torch.compile traces (Dynamo runs every op on fake tensors):
    # oneDNN's kernel has no fake implementation; F.conv allocates the same, and inductor picks its own kernel.
    return (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not is_fake(x)
        and x.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def _conv(x: torch.Tensor, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """``F.conv3d`` / ``F.conv2d``, but float32 on CPU always runs oneDNN.

    aten picks the kernel of a batch-1 convolution from N*C*T*H (3-D) and sends it to the slow native kernel
    below 20480, ignoring the width. A row shard crosses that line where the whole frame did not (the first
    chunk's 3-frame causal window at 64 of 128 rows: 96*3*66 < 20480), and the native kernel is 2-7x slower there
    (one thread, Wan2.1 widths). oneDNN computes the same convolution; float32 results agree to rounding.
    """
    if _onednn(x):
        return torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)
    conv = F.conv3d if x.dim() == 5 else F.conv2d
    return conv(x, weight, bias, stride, padding, dilation, groups)


def conv_halo(kernel: int, stride: int, dilation: int, pad_top: int, pad_bottom: int) -> tuple[int, int, int]:
    """(rows above, rows below from the rank below, rows of padding below at the global bottom) for a convolution
    along the rows with this geometry; see the module docstring."""
    reach = dilation * (kernel - 1)
    # Negative: my outputs never read my last -inner rows (the next rank's first output does, as its top halo).
    inner = reach - pad_top - (stride - 1)
    return pad_top, inner, pad_bottom


def _pad_rows_of(x: torch.Tensor, top: int, bottom: int, mode: str, value: float) -> torch.Tensor:
    # F.pad's non-constant modes pad the last 1-3 dims as a whole: name every spatial dim, rows = dim -2.
    pad = [0, 0, top, bottom] + [0, 0] * (x.dim() - 4)
    if mode in ("zeros", "constant"):
        return F.pad(x, pad, mode="constant", value=0.0 if mode == "zeros" else value)
    return F.pad(x, pad, mode=mode)


def _is_zero(spec: PadSpec) -> bool:
    return all(mode == "zeros" or (mode == "constant" and value == 0) for mode, _, value in spec)


def edge_rows(x: torch.Tensor, spec: PadSpec, side: str) -> torch.Tensor:
    """The padding rows the layer itself would put above (``side='top'``) or below ``x``: ``spec`` applied in
    order to ``x``'s edge rows with ``F.pad``, differentiable (replicate/reflect gradients flow to ``x``)."""
    total = sum(n for _, n, _ in spec)
    take = min(x.shape[-2], total + 1)  # reflect of n rows reads n + 1 rows; replicate reads 1
    part = x.narrow(-2, 0, take) if side == "top" else x.narrow(-2, x.shape[-2] - take, take)
    for mode, n, value in spec:
        if n:
            part = _pad_rows_of(part, n, 0, mode, value) if side == "top" else _pad_rows_of(part, 0, n, mode, value)
    return part.narrow(-2, 0, total) if side == "top" else part.narrow(-2, part.shape[-2] - total, total)


def halo_rows(
    x: torch.Tensor,
    group,
    top: int,
    bottom: int,
    bottom_edge: Optional[int] = None,
    top_spec: PadSpec = (),
    bottom_spec: PadSpec = (),
) -> torch.Tensor:
    """forward: ``x`` with ``top`` rows from the rank above and ``bottom`` rows from the rank below attached along
    dim -2; at the global top the layer's own padding ``top_spec`` (``top`` rows in all), at the global bottom
    ``bottom_spec`` (``bottom_edge`` rows, default ``bottom``); backward: halo gradients go back to their owners,
    padding gradients through the padding op.

    With one rank this is exactly the layer's padding."""
    bottom_edge = bottom if bottom_edge is None else bottom_edge
    rank, size = group_rank(group), group_size(group)
    if size == 1:
        out = x
        for mode, n, value in top_spec:
            out = _pad_rows_of(out, n, 0, mode, value)
        for mode, n, value in bottom_spec:
            out = _pad_rows_of(out, 0, n, mode, value)
        return out
    pad_top = rank == 0 and top and not _is_zero(top_spec)
    pad_bottom = rank == size - 1 and bottom_edge and not _is_zero(bottom_spec)
    # A reflect pad of n rows reads n + 1 rows; an edge shard with fewer (one latent row of LTX-2's reflect-padded
    # decoder) builds its padding after the exchange, from its rows and the halo rows of its neighbour.
    late_top = pad_top and x.shape[-2] < _rows_read(top_spec)
    late_bottom = pad_bottom and x.shape[-2] < _rows_read(bottom_spec)
    fill_top = edge_rows(x, top_spec, "top") if pad_top and not late_top else None
    fill_bottom = edge_rows(x, bottom_spec, "bottom") if pad_bottom and not late_bottom else None
    y = halo_pad(
        x, group, dim=-2, top=top, bottom=bottom, bottom_edge=bottom_edge, fill_top=fill_top, fill_bottom=fill_bottom
    )
    if late_top:
        # [zero rows, my rows, rows from below] -> [the layer's padding of (my rows, rows from below), those rows]
        inner = y.narrow(-2, top, y.shape[-2] - top)
        _check_edge_rows(inner, top_spec)
        y = torch.cat([edge_rows(inner, top_spec, "top"), inner], -2)
    if late_bottom:
        inner = y.narrow(-2, 0, y.shape[-2] - bottom_edge)
        _check_edge_rows(inner, bottom_spec)
        y = torch.cat([inner, edge_rows(inner, bottom_spec, "bottom")], -2)
    return y


def _rows_read(spec: PadSpec) -> int:
    """Rows of its edge that ``spec`` reads: n + 1 for a reflect of n rows, less the rows padded before it."""
    read, before = 1, 0
    for mode, n, _ in spec:
        if mode == "reflect":
            read = max(read, n - before + 1)
        before += n
    return read


def _check_edge_rows(inner: torch.Tensor, spec: PadSpec) -> None:
    if inner.shape[-2] < _rows_read(spec):
        raise ShardingError(
            f"an edge shard with its halo holds {inner.shape[-2]} rows; the layer's edge padding {tuple(spec)} reads "
            f"{_rows_read(spec)}"
        )


def halo_for_conv(
    x: torch.Tensor,
    group,
    kernel: int,
    stride: int,
    dilation: int,
    pad_top: int,
    pad_bottom: int,
    top_spec: PadSpec = (),
    bottom_spec: PadSpec = (),
) -> torch.Tensor:
    """``x`` with exactly the rows a convolution of this row geometry needs for this rank's output rows (halos from
    the neighbours, the layer's own padding at the global edges); an unpadded conv along the rows then gives this
    rank's outputs, ``rows / stride`` of them on every rank but the last."""
    _check_aligned(x.shape[-2], stride, group)
    top, inner, edge = conv_halo(kernel, stride, dilation, pad_top, pad_bottom)
    y = halo_rows(x, group, top, max(inner, 0), edge, top_spec, bottom_spec)
    if inner < 0 and group_rank(group) < group_size(group) - 1:
        y = y.narrow(-2, 0, y.shape[-2] + inner)
    return y


def _check_aligned(rows: int, stride: int, group) -> None:
    if stride > 1 and group_rank(group) < group_size(group) - 1 and rows % stride:
        raise ShardingError(
            f"a shard of {rows} rows is not aligned to a stride-{stride} layer; shards must be split in latent rows"
        )


# ---------------------------------------------------------------------------------------------------------------
# Mixins (installed with plan.sharded_class(mixin, type(module)))
# ---------------------------------------------------------------------------------------------------------------


def _rows_of(t: torch.Tensor, rows: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[-2] = rows
    return t.new_zeros(shape)


def corrected_conv(
    conv: nn.Module, x: torch.Tensor, group, conv_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
) -> Optional[torch.Tensor]:
    """A zero-padded ``nn.Conv2d``/``nn.Conv3d`` on this rank's rows without copying them into a padded buffer.

    The convolution runs on ``x`` with its own zero padding, which is right everywhere except the output rows whose
    kernel reaches past an inner shard boundary, where it saw zeros instead of the neighbour's rows. Those rows are
    recomputed from a small slab of the received rows and my own (:func:`recompute_boundary_rows`). The live memory
    is the input and the output, as for the unsharded layer (a padded copy would add a third tensor of the layer's
    size at the peak), and the extra work is the boundary output rows, once more.

    ``conv_fn(x)``, when given, computes the convolution of ``x`` with the layer's own zero padding in place of a
    plain conv call: a class whose forward wraps its convolution (CogVideoX's ``CogVideoXSafeConv3d`` splits long
    inputs along time) keeps that forward on the shard. It runs while the exchange is in flight (with
    :func:`set_overlap` off, after it), so it may do anything local, including different work on different ranks,
    but no collective of its own.

    Returns None where the geometry does not allow it (the conv's own padding would change a shard's output count,
    or a halo deeper than the padding); the caller then uses the padded-copy path. The decision depends on the
    layer alone, so every rank takes the same path and the exchanges pair up."""
    kh, sh, dh, ph = conv.kernel_size[-2], conv.stride[-2], conv.dilation[-2], conv.padding[-2]
    rows = x.shape[-2]
    reach = dh * (kh - 1)
    inner = reach - ph - (sh - 1)
    if inner < 0 or inner > ph or not -sh <= 2 * ph - reach - 1 <= -1:
        return None  # same on every rank: geometry only
    if rows < max(ph, inner):
        raise ShardingError(f"a shard of {rows} rows cannot supply a halo of {max(ph, inner)} rows")
    # step 1: post the exchange of my edge rows; step 2: convolve my rows (their own zero padding stands in for
    # the neighbours' rows) while the rows travel; step 3: wait, then recompute the rows whose taps reach the neighbours' rows.
    pending = start_neighbor_rows(x, group, dim=-2, top=ph, bottom=inner)
    x = pending.x
    if not overlap_enabled():
        above, below = pending.wait()
    if conv_fn is not None:
        y = conv_fn(x)
    else:
        y = _conv(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if overlap_enabled():
        above, below = pending.wait()
    return recompute_boundary_rows(
        y, x, above, below, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
    )


def recompute_boundary_rows(
    y: torch.Tensor, x: torch.Tensor, above: torch.Tensor, below: torch.Tensor, weight, bias, stride, padding,
    dilation, groups,
) -> torch.Tensor:
    """In place on ``y``, the convolution of ``x`` (``rows`` rows) with its own zero row padding ``padding[-2]``:
    recompute the output rows whose kernel reaches the neighbours' rows ``above`` / ``below`` (0 rows at a global
    edge: those rows are right as they are) from a slab of the received rows and my own, with the whole kernel and
    the bias, and write them over ``y``'s. ``above`` holds ``padding[-2]`` rows, ``below`` the conv's inner halo.

    Recomputed, not corrected: adding the missing taps' contribution to a row already rounded to the activations'
    dtype rounds it twice, which in bfloat16 put the sharded Wan2.1 decode 0.091 from float32 against the
    unsharded model's 0.074 (tests/test_api.py). Each output row here is one convolution with its whole receptive
    field, as in the unsharded layer; the extra work is the boundary output rows, once more."""
    kh, sh, dh, ph = weight.shape[-2], stride[-2], dilation[-2], padding[-2]
    rows = x.shape[-2]
    reach = dh * (kh - 1)
    n_out = y.shape[-2]
    other = list(padding)
    other[-2] = 0
    other = tuple(other)
    n_top = -(-ph // sh) if above.shape[-2] else 0  # output rows that reach above my row 0
    need = (n_top - 1) * sh - ph + reach + 1 if n_top else 0  # my rows those outputs read
    first = max(0, -(-(rows + ph - reach) // sh)) if below.shape[-2] else n_out  # first that reaches below
    start = first * sh - ph  # my first row it reads
    if (n_top and need > rows) or (first < n_out and start < 0) or first < n_top:
        # a shard so short that one output row reads both neighbours: recompute all of it from the full slab
        top = above if above.shape[-2] else _rows_of(x, ph)
        bottom = below if below.shape[-2] else _rows_of(x, ph)
        full = _conv(torch.cat([top, x, bottom], -2), weight, bias, stride, other, dilation, groups)
        return y.copy_(full.narrow(-2, 0, n_out))
    if n_top:
        slab = torch.cat([above.narrow(-2, 0, ph), x.narrow(-2, 0, need)], -2)
        y.narrow(-2, 0, n_top).copy_(_conv(slab, weight, bias, stride, other, dilation, groups))
    if first < n_out:
        slab = torch.cat([x.narrow(-2, start, rows - start), below], -2)
        fix = _conv(slab, weight, bias, stride, other, dilation, groups)
        y.narrow(-2, first, n_out - first).copy_(fix.narrow(-2, 0, n_out - first))
    return y


class HaloConv:
    """``nn.Conv2d`` / ``nn.Conv3d`` with its own padding (any mode but circular): the rows' padding becomes a halo.

    Zero padding (the common case) runs :func:`corrected_conv`: no padded copy of the input. Other modes pad the
    width (and time) with ``F.pad`` exactly as ``nn.ConvNd`` does for them, and the rows with a halo whose global
    edges are the layer's own padding."""

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._pv_state.group
        kh, sh, dh, ph = self.kernel_size[-2], self.stride[-2], self.dilation[-2], self.padding[-2]
        mode = self.padding_mode
        if mode == "zeros":
            _check_aligned(x.shape[-2], sh, group)
            y = corrected_conv(self, x, group)
            if y is not None:
                return y
        other = list(self.padding)
        other[-2] = 0
        if mode != "zeros":
            # nn.ConvNd pads non-zero modes with F.pad over every spatial dim; do that for all but the rows.
            pad = []
            for p in reversed(other):
                pad += [p, p]
            x = F.pad(x, pad, mode=mode)
            other = [0] * len(other)
        spec = ((mode, ph, 0.0),)
        x = halo_for_conv(x, group, kh, sh, dh, ph, ph, spec, spec)
        return _conv(x, self.weight, self.bias, self.stride, tuple(other), self.dilation, self.groups)


def conv_treatment(name: str, m: nn.Module) -> Optional[Treatment]:
    """The treatment of a plain ``nn.Conv2d``/``nn.Conv3d`` from its row geometry: ``None`` (local) for one row of
    kernel, stride 1 and no row padding; :class:`HaloConv` otherwise. ``padding="same"``-style strings and circular
    padding (which wraps the image's last rows onto its first) are refused."""
    kh = m.kernel_size[-2]
    if isinstance(m.padding, str):
        raise unknown_module(name, m, f"padding={m.padding!r}")
    if kh == 1 and m.stride[-2] == 1 and m.padding[-2] == 0:
        return None  # one row of kernel (grouped or not): local
    if m.padding_mode == "circular":
        raise unknown_module(name, m, "circular padding wraps rows around the image")
    return Treatment(name, sharded_class(HaloConv, original_class(m)), f"{kh}-row conv: halo rows from its geometry")

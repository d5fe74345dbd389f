"""Plain 2-D image networks (``nn.Sequential`` of convolutions, max-pools, BatchNorms, activations) on row shards.

The loss networks of VAE training (LPIPS's VGG16 trunk, the PatchGAN discriminator) are stacks of the layers the
layer rules (docs/how-it-works.md) already cover, so this walks such a stack layer by layer and gives each kind its one
treatment:

| layer | treatment |
| --- | --- |
| ``nn.Conv2d``, zero padding | halo rows from its geometry (:func:`~.halo.corrected_conv` / :func:`~.halo.halo_for_conv`) |
| ``nn.MaxPool2d``, no row padding | the conv arithmetic with reach ``kernel - 1`` (VGG's 2x2/2 pool: no halo) |
| ``nn.BatchNorm2d`` | statistics over every rank's rows (:func:`~.norm.distributed_batch_norm`) |
| ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.Identity``, ``nn.Dropout`` in eval | local |

Anything else is an error (:func:`~.plan.unknown_module`), never a silent pass-through.

Why the row bookkeeping (:class:`RowSplit`): a strided layer needs every shard but the last to start on a multiple
of its stride (docs/how-it-works.md, "Sharding and alignment"). The VAE splits rows in latent rows (8 pixel rows for most families), but
VGG16 pools 4 times (16x) and a PatchGAN with more than 3 layers strides more than 8x, so at some level a shard
starts on an odd row: 3/2/2 latent rows (24/16/16 pixel rows) start on rows 24 and 40, i.e. rows 3 and 5 after
three pools. Such a level is *realigned* before its strided layer: each boundary moves up to the multiple of the
stride below it, the rows in between travel to the rank below through one halo exchange (its backward returns their
gradients). Rows move, nothing is recomputed, and the result is exact. A stride-1 convolution that shrinks the rows
(PatchGAN's 4x4 kernels with padding 1 give H - 1 rows) takes the missing row from the last rank.

Every rank computes the whole split from one all-gather of the row counts (at the start of a network), so each
check below raises the same :class:`~.sharding.ShardingError` on every rank, before any exchange.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .comm import all_gather_sizes, group_rank, group_size, halo_exchange
from .halo import _conv, conv_halo, corrected_conv, halo_for_conv
from .norm import distributed_batch_norm
from .plan import unknown_module
from .sharding import ShardingError

__all__ = [
    "RowSplit", "row_split_of", "layer_split", "realigned", "realign_rows", "check_layers", "run_layers", "sharded_conv2d",
]  # fmt: skip


@dataclass(frozen=True)
class RowSplit:
    """The global row boundaries of a tensor split over a group at one level: rank r holds rows
    ``bounds[r] .. bounds[r + 1] - 1`` of ``bounds[-1]``."""

    bounds: tuple

    @property
    def total(self) -> int:
        return self.bounds[-1]

    @property
    def sizes(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds, self.bounds[1:])]

    def start(self, rank: int) -> int:
        return self.bounds[rank]


def row_split_of(x: torch.Tensor, group) -> RowSplit:
    """The split of ``x``'s rows (dim -2) over ``group``: one small all-gather (and host read) of the row counts."""
    sizes = all_gather_sizes(x.shape[-2], group, x.device)
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return RowSplit(tuple(bounds))


def realigned(split: RowSplit, stride: int) -> RowSplit:
    """The split with every inner boundary moved up to a multiple of ``stride`` (the global end stays)."""
    b = split.bounds
    return RowSplit((0,) + tuple(x - x % stride for x in b[1:-1]) + (b[-1],))


def layer_split(split: RowSplit, kernel: int, stride: int, dilation: int, pad: int, name: str) -> RowSplit:
    """The split of a row-geometry layer's output (kernel, stride, dilation, symmetric padding ``pad``), with the
    checks its halos need; ``split`` must be aligned to ``stride``.

    A rank that is not last outputs ``rows / stride`` rows (outputs start where its input starts), the last rank
    the rest. It sends its last ``pad`` rows to the rank below and its first ``reach - pad - (stride - 1)`` rows to
    the rank above; every rank must keep at least one output row."""
    b, n = split.bounds, split.sizes
    reach = dilation * (kernel - 1)
    total_out = (split.total + 2 * pad - reach - 1) // stride + 1
    _, inner, _ = conv_halo(kernel, stride, dilation, pad, pad)
    out = RowSplit(tuple(x // stride for x in b[:-1]) + (total_out,))
    halo = max(pad, inner, 0)
    if min(n) < halo:  # every rank sends (and the exchange checks) that many rows
        raise ShardingError(
            f"{name}: a shard too small for the {halo}-row halo of this layer: rows per rank {n} at this level; use "
            "fewer ranks or taller images"
        )
    if min(out.sizes) < 1:
        raise ShardingError(
            f"{name}: a shard too small for this network: rows per rank {n} at this level give {out.sizes} output "
            f"rows, and every rank needs at least one; use fewer ranks or taller images"
        )
    return out


def _realign_checked(split: RowSplit, stride: int, name: str) -> tuple[RowSplit, int]:
    """The realigned split and the rows every rank passes down (0: already aligned), with the checks."""
    new = realigned(split, stride)
    if new == split:
        return split, 0
    n = split.sizes
    move = max(b % stride for b in split.bounds[1:-1])  # the same on every rank: one exchange for all
    if min(new.sizes) < 1 or min(n) < move:
        raise ShardingError(
            f"{name}: a shard too small to realign to stride {stride}: rows per rank {n}; use fewer ranks or taller "
            "images"
        )
    return new, move


def realign_rows(x: torch.Tensor, split: RowSplit, stride: int, group, name: str) -> tuple[torch.Tensor, RowSplit]:
    """forward: this rank's rows of the realigned split (rows from the rank above prepended, the rows that now
    belong to the rank below dropped); backward: through one halo exchange and a narrow."""
    new, move = _realign_checked(split, stride, name)
    if not move:
        return x, split
    rank = group_rank(group)
    y = halo_exchange(x, group, dim=-2, top=move, bottom=0)
    # y holds rows start - move .. end - 1 of this level; keep new.start .. new.end - 1
    return y.narrow(-2, new.start(rank) - (split.start(rank) - move), new.sizes[rank]), new


def check_layers(layers: Sequence[tuple[str, nn.Module]], split: RowSplit) -> RowSplit:
    """The split :func:`run_layers` would produce, computed without tensors: the same checks (and
    :class:`~.sharding.ShardingError`) before any work, e.g. when a training run starts."""
    if len(split.sizes) == 1:
        return split
    for name, m in layers:
        geometry = _geometry(m, name)
        if geometry is not None:
            k, s, d, p = geometry
            if s > 1:
                split, _ = _realign_checked(split, s, name)
            split = layer_split(split, k, s, d, p, name)
    return split


def sharded_conv2d(conv: nn.Conv2d, x: torch.Tensor, group) -> torch.Tensor:
    """A zero-padded ``nn.Conv2d`` on this rank's rows (aligned to its stride): :func:`~.halo.corrected_conv` where
    the geometry allows it, else a halo-padded copy."""
    y = corrected_conv(conv, x, group)
    if y is not None:
        return y
    kh, sh, dh, ph = conv.kernel_size[0], conv.stride[0], conv.dilation[0], conv.padding[0]
    xh = halo_for_conv(x, group, kh, sh, dh, ph, ph)
    return _conv(xh, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)


_LOCAL = (nn.ReLU, nn.LeakyReLU, nn.Identity)


def _geometry(m: nn.Module, name: str) -> Optional[tuple[int, int, int, int]]:
    """(kernel, stride, dilation, pad) along the rows of a conv or pool, or None for a layer that keeps rows."""
    if type(m) is nn.Conv2d:
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise unknown_module(name, m, "only zero padding (an int or pair) is sharded here")
        return m.kernel_size[0], m.stride[0], m.dilation[0], m.padding[0]
    if type(m) is nn.MaxPool2d:
        k, s, p, d = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.stride, m.padding, m.dilation))
        if p or m.ceil_mode or m.return_indices:
            raise unknown_module(name, m, "a max-pool with row padding, ceil_mode or indices")
        return k, s, d, 0
    return None


def run_layers(
    layers: Sequence[tuple[str, nn.Module]], x: torch.Tensor, split: RowSplit, group
) -> tuple[torch.Tensor, RowSplit]:
    """Apply ``layers`` (``(name, module)`` pairs, e.g. ``seq.named_children()``) to this rank's rows ``x`` of a
    tensor split as ``split``; returns this rank's output rows and their split. With one rank it is the plain
    network (each module's own forward)."""
    if group_size(group) == 1:
        for _, m in layers:
            x = m(x)
        return x, RowSplit((0, x.shape[-2]))
    for name, m in layers:
        geometry = _geometry(m, name)
        if geometry is not None:
            k, s, d, p = geometry
            if s > 1:
                x, split = realign_rows(x, split, s, group, name)
            out = layer_split(split, k, s, d, p, name)
            if type(m) is nn.Conv2d:
                x = sharded_conv2d(m, x, group)
            else:
                x = halo_for_conv(x, group, k, s, d, 0, 0)
                x = F.max_pool2d(x, m.kernel_size, m.stride, (0, _pair(m.padding)[1]), m.dilation)
            split = out
        elif type(m) is nn.BatchNorm2d:
            x = _batch_norm(m, x, group)
        elif type(m) is nn.Dropout and (not m.training or m.p == 0):
            pass
        elif type(m) in _LOCAL:
            x = m(x)
        else:
            raise unknown_module(name, m, "not a layer kind of core.rowwise (dropout only in eval mode)")
    return x, split


def _pair(v):
    return v if isinstance(v, (tuple, list)) else (v, v)


def _batch_norm(m: nn.BatchNorm2d, x: torch.Tensor, group) -> torch.Tensor:
    """``nn.BatchNorm2d.forward`` with the batch statistics (and the running-average update) over the group."""
    training = m.training or m.running_mean is None
    factor = 0.0 if m.momentum is None else m.momentum
    if m.training and m.track_running_stats and m.num_batches_tracked is not None:
        m.num_batches_tracked.add_(1)
        if m.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            factor = 1.0 / float(m.num_batches_tracked)
    return distributed_batch_norm(
        x,
        m.running_mean if not m.training or m.track_running_stats else None,
        m.running_var if not m.training or m.track_running_stats else None,
        m.weight,
        m.bias,
        training=training,
        momentum=factor,
        eps=m.eps,
        group=group,
    )

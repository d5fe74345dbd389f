"""Causal 3-D convs that pad space themselves (MiniMax-H3's ``MiniMaxH3VideoCausalConv3d``) and the pad-then-stride-2
downsampler around one (``MiniMaxH3VideoDownsample3d``), on row shards.

``MiniMaxH3VideoCausalConv3d`` is an ``nn.Conv3d`` built with ``padding=0`` whose forward pads rows and columns
symmetrically by ``spatial_padding`` with ``F.pad(mode=spatial_padding_mode)`` (reflect in the released model), then
prepends ``temporal_padding`` zero frames, then convolves. On a shard the column and frame pads stay local; the row
pad becomes a halo (:func:`parallel_vae.core.halo.halo_for_conv`) whose global edges are the layer's own pad mode
(the edge rank reflects its own rows; a one-row edge shard builds its reflect pad after the exchange). Reflect
padding is separable, so padding the columns, then the rows, is the layer's joint pad, corners included.

``MiniMaxH3VideoDownsample3d`` pads the right column and the bottom row by one (``F.pad((0, 1, 0, 1, 0, 0))``, the
same mode) and runs its inner causal conv (``spatial_padding=0``, 3 rows, row stride 2): the bottom row comes from
the rank below, or at the global bottom from the layer's own pad; the inner conv then runs as diffusers wrote it on
rows that carry it (shards start on even rows at every level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.halo import _conv, halo_for_conv
from ..core.plan import SpatialState

__all__ = ["HaloSpatialPadConv", "HaloPadDownsample", "PAD_MODES"]

#: the spatial pad modes whose global edges the halo reproduces (``F.pad`` names)
PAD_MODES = ("reflect", "replicate", "constant")


def _spec(mode: str, rows: int) -> tuple:
    return (("zeros" if mode == "constant" else mode, rows, 0.0),)


class HaloSpatialPadConv:
    """``MiniMaxH3VideoCausalConv3d`` with ``spatial_padding`` p > 0 and a (2p + 1)-row kernel of row stride 1."""

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, mode = self.spatial_padding, self.spatial_padding_mode
        kh, sh, dh = self.kernel_size[1], self.stride[1], self.dilation[1]
        # columns: the layer's own pad, local; rows: a halo with the layer's pad at the global edges
        x = F.pad(x, (p, p, 0, 0, 0, 0), mode=mode)
        x = halo_for_conv(x, self._pv_state.group, kh, sh, dh, p, p, _spec(mode, p), _spec(mode, p))
        if self.temporal_padding > 0:
            x = F.pad(x, (0, 0, 0, 0, self.temporal_padding, 0), mode="constant")
        return _conv(x, self.weight, self.bias, self.stride, (0, 0, 0), self.dilation, self.groups)


class HaloPadDownsample:
    """``MiniMaxH3VideoDownsample3d`` with ``spatial_stride`` 2: one row from the rank below (the layer's own pad at
    the global bottom), the right column padded locally, then the inner conv as diffusers calls it."""

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.spatial_padding_mode
        conv = self.conv
        kh, sh, dh = conv.kernel_size[1], conv.stride[1], conv.dilation[1]
        x = F.pad(x, (0, 1, 0, 0, 0, 0), mode=mode)
        x = halo_for_conv(x, self._pv_state.group, kh, sh, dh, 0, 1, (), _spec(mode, 1))
        return conv(x)  # spatial_padding 0: its rows already carry the halo; called, so hooks on it run

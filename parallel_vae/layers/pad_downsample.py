"""Pad + stride-2 conv downsampling on row shards: the pad's bottom row is the first row of the rank below.

Two diffusers forms: a ``ZeroPad2d((0, 1, 0, 1))`` module before an unpadded stride-2 conv (Wan's and Qwen-Image's
``*Resample`` downsample), and ``Downsample2D`` with ``use_conv`` and ``padding=0`` (AutoencoderKL), whose forward
pads with ``F.pad(x, (0, 1, 0, 1))``. Only the global last rank pads with zeros; the width padding stays local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.halo import _check_aligned, halo_for_conv, halo_rows
from ..core.plan import SpatialState

__all__ = ["HaloZeroPad2d", "HaloDownsample2D"]


class HaloZeroPad2d:
    """The ``ZeroPad2d((0, 1, 0, 1))`` before a stride-2, 3-row, unpadded conv (Wan's and Qwen-Image's
    downsample): width padding stays local; the bottom row is the first row of the rank below, and only the global
    last rank pads with zeros. That one row is exactly the conv's inner halo (conv_halo(3, 2, 1, 0, 1) = (0, 1, 1))."""

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = self.padding
        _check_aligned(x.shape[-2], 2, self._pv_state.group)
        x = F.pad(x, (left, right, 0, 0))
        return halo_rows(x, self._pv_state.group, top, bottom)


class HaloDownsample2D:
    """diffusers ``Downsample2D`` with ``use_conv`` and ``padding=0``: its ``F.pad(x, (0, 1, 0, 1))`` + 3x3
    stride-2 conv. The bottom pad row becomes the first row of the rank below (zeros on the global last rank)."""

    _pv_state: SpatialState

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        group = self._pv_state.group
        x = hidden_states
        conv = self.conv
        x = F.pad(x, (0, 1, 0, 0), mode="constant", value=0)
        x = halo_for_conv(x, group, conv.kernel_size[0], conv.stride[0], conv.dilation[0], 0, 1)
        return conv(x)

"""Pad-then-conv modules (HunyuanVideo's and HunyuanVideo-1.5's causal 3-D convs) on row shards.

The module pads with ``F.pad(x, self.time_causal_padding, mode=self.pad_mode)`` and then runs ``self.conv``; the
row part of both paddings becomes one halo (:func:`parallel_vae.core.halo.halo_for_conv`), whose global edges are
the layer's own pad mode followed by the conv's zero padding.

The inner conv is still *called* (``self.conv(x)``), as diffusers' forward calls it, and not read for its weights:
hooks on it (diffusers' layerwise casting and group offload, accelerate's offload) cast, load or move its weights
in that call, and only there (:mod:`parallel_vae.core.hooks`). So the inner conv gets its own treatment,
:class:`HaloedInnerConv`: its rows already carry the halo, so it convolves with no row padding of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.halo import _conv, halo_for_conv
from ..core.plan import SpatialState

__all__ = ["HaloPadConv", "HaloedInnerConv"]


class HaloPadConv:
    """A module that pads with ``F.pad(x, self.time_causal_padding, mode=self.pad_mode)`` and then runs
    ``self.conv`` (HunyuanVideo's and HunyuanVideo-1.5's causal 3-D convs): the row part of both paddings becomes
    one halo; the edge ranks pad as the layer does (its pad mode, then the conv's own zero padding)."""

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._pv_state.group
        conv = self.conv
        # time_causal_padding = (w_left, w_right, h_top, h_bottom, t_front, t_back), F.pad order
        wl, wr, ht, hb, tf, tb = self.time_causal_padding
        x = F.pad(x, (wl, wr, 0, 0, tf, tb), mode=self.pad_mode)
        kh, sh, dh, ph = conv.kernel_size[1], conv.stride[1], conv.dilation[1], conv.padding[1]
        top_spec = ((self.pad_mode, ht, 0.0), ("zeros", ph, 0.0))
        bottom_spec = ((self.pad_mode, hb, 0.0), ("zeros", ph, 0.0))
        x = halo_for_conv(x, group, kh, sh, dh, ht + ph, hb + ph, top_spec, bottom_spec)
        return conv(x)  # a HaloedInnerConv: through the module call, so hooks on the inner conv run


class HaloedInnerConv:
    """The ``nn.Conv3d`` inside a :class:`HaloPadConv` module: its input rows arrive with the halo and the edge
    padding of both paddings (the parent's and this conv's own), so it convolves with its time and width padding
    only. Valid only as that parent's child, which is the only module that calls it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (self.padding[0], 0, self.padding[2])
        return _conv(x, self.weight, self.bias, self.stride, pad, self.dilation, self.groups)

"""A 2-D conv standing in for a causal 3-D one on single frames (``QwenImage21CausalConv3d``) on row shards.

Qwen-Image 2.1's VAE is Wan's causal video VAE specialized to images: its "causal 3-D conv" is an ``nn.Conv2d``
whose forward squeezes the one frame away (``x.squeeze(2)``), zero-pads rows and columns with ``F.pad(x,
self._padding)`` (``(w, w, h, h)``; the conv's own ``padding`` is set to 0), convolves, and puts the frame back.
It takes no frame cache (it raises if given one).

On a row shard the row padding becomes a halo: the convolution runs on my rows with zero row padding standing in
for the neighbours' rows while my edge rows travel, and the output rows whose taps reach the neighbours' rows are
recomputed afterwards (:func:`parallel_vae.core.halo.recompute_boundary_rows`), as for every zero-padded halo conv.
At the global top and bottom the zero rows are exactly the layer's own padding. The width padding is the layer's.
"""

from __future__ import annotations

import torch

from ..core.comm import start_neighbor_rows
from ..core.halo import _conv, overlap_enabled, recompute_boundary_rows
from ..core.plan import SpatialState

__all__ = ["HaloFrameConv2d"]


class HaloFrameConv2d:
    """``QwenImage21CausalConv3d`` (an ``nn.Conv2d`` on (B, C, 1, H, W) with ``_padding`` = (w, w, h, h) of zeros,
    a kernel of 2h + 1 rows, row stride 1): one exchange of h edge rows each side, no padded copy of the input."""

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor, cache_x=None) -> torch.Tensor:
        if cache_x is not None:  # diffusers' own refusal, word for word
            raise ValueError(
                "This convolution is the image specialization of Wan's causal 3D one: it folds the single frame away "
                "and has no temporal context to prepend, so it cannot take a feature cache."
            )
        if x.dim() != 5 or x.shape[2] != 1:
            # diffusers' squeeze(2) leaves a clip of several frames 5-D and nn.Conv2d then raises; refuse it here
            # before the exchange (the shape agreement refuses such clips before any layer runs)
            raise ValueError(f"{type(self).__name__} takes one frame, (B, C, 1, H, W); got {tuple(x.shape)}")
        w_pad, _, top, _ = self._padding
        # (b, c, 1, h_r, w) -> (b, c, h_r, w)
        x = x.squeeze(2)
        padding = (top, w_pad)
        # step 1: post the exchange of my edge rows; step 2: convolve my rows, zero rows in the neighbours' place;
        # step 3: wait, recompute the output rows whose taps reach the neighbours' rows.
        pending = start_neighbor_rows(x, self._pv_state.group, dim=-2, top=top, bottom=top)
        x = pending.x
        if not overlap_enabled():
            above, below = pending.wait()
        y = _conv(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        if overlap_enabled():
            above, below = pending.wait()
        y = recompute_boundary_rows(y, x, above, below, self.weight, self.bias, self.stride, padding, self.dilation,
                                    self.groups)
        # (b, c, h_r, w) -> (b, c, 1, h_r, w)
        return y.unsqueeze(2)

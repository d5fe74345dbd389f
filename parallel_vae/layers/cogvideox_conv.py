"""Halo treatments for convolutions that sit inside diffusers code we do not change.

:mod:`.halo` treats a layer whose padding and convolution are one module. Two other shapes occur:

* a convolution class whose own ``forward`` wraps the convolution (CogVideoX's ``CogVideoXSafeConv3d`` splits an
  input of more than 2 GB into chunks along time, each with the kernel's overlap, and concatenates the outputs):
  :class:`HaloOwnForwardConv` keeps that forward, on this rank's rows;
* an unpadded convolution whose caller zero-pads the rows below before calling it (CogVideoX's downsample:
  ``F.pad(x, (0, 1, 0, 1))`` in ``CogVideoXDownsample3D.forward``, then ``self.conv``, a 3x3 stride-2 conv):
  :class:`HaloBelowPaddedConv` swaps the caller's pad rows for the rank below's first rows.

Both are mixins installed by class swap (``plan.sharded_class``), like those of :mod:`.halo`.
"""

from __future__ import annotations

import torch

from ..core.halo import _conv, corrected_conv, halo_for_conv
from ..core.plan import SpatialState

__all__ = ["HaloOwnForwardConv", "HaloBelowPaddedConv"]


class HaloOwnForwardConv:
    """A zero-padded ``nn.Conv2d``/``nn.Conv3d`` subclass whose own ``forward`` wraps the convolution: that forward
    runs unchanged on this rank's rows with the layer's own zero padding, and :func:`corrected_conv` adds the
    neighbours' taps to the output rows at inner shard boundaries.

    The one exchange of edge rows comes before the class's forward, so whatever that forward decides from the
    shard's own size (``CogVideoXSafeConv3d``: how many time chunks) may differ between ranks without unpairing
    any collective. Chunking along time is exact for any chunking: each chunk carries the kernel's overlap.

    The convolution calls inside that forward (``nn.ConvNd.forward`` -> ``_conv_forward``) go through
    :func:`parallel_vae.core.halo._conv`, so a float32 shard on CPU runs oneDNN as every other halo conv does
    (see the oneDNN note there: a shard can fall below aten's threshold for the slow native kernel where the
    whole frame did not).

    Geometry: 2 p + 1 rows of kernel with p rows of zero padding, stride 1 (the classification checks it).
    """

    _pv_state: SpatialState

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        return _conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        own = super().forward  # the diffusers class's forward (next in the swapped class's MRO)
        y = corrected_conv(self, x, self._pv_state.group, conv_fn=own)
        if y is None:  # the plan admits only geometries corrected_conv handles
            raise NotImplementedError(
                f"{type(self).__name__}: row kernel {self.kernel_size[-2]}, padding {self.padding[-2]}, "
                f"stride {self.stride[-2]} has no halo treatment"
            )
        return y


class HaloBelowPaddedConv:
    """An ``nn.Conv2d``/``nn.Conv3d`` with no row padding of its own, called on input whose caller appended
    ``_pv_rows_below`` zero rows at the bottom (1 for CogVideoX's ``F.pad(x, (0, 1, 0, 1))``).

    On every rank but the global last, those rows stand where the rows of the rank below belong: they are dropped
    and the conv's inner halo (:func:`parallel_vae.core.halo.conv_halo`) is attached instead, from the rank below.
    The global last rank gets the same number of zero rows back, exactly the caller's pad. The caller's width
    padding is untouched. Shards must start on multiples of the stride, which splitting in latent rows ensures.
    """

    _pv_state: SpatialState
    _pv_rows_below: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self._pv_rows_below
        kh, sh, dh = self.kernel_size[-2], self.stride[-2], self.dilation[-2]
        # (.., rows + n, W') -> (.., rows, W'): the caller's zero rows leave (their gradient was never needed)
        x = x.narrow(-2, 0, x.shape[-2] - n)
        x = halo_for_conv(x, self._pv_state.group, kh, sh, dh, 0, n)
        return _conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

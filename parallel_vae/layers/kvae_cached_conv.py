"""Kandinsky KVAE-Video's cached causal 3-D conv (``KVAECachedCausalConv3d``) on row shards.

diffusers' forward replicate-pads rows and columns by k // 2 (``F.pad(input, (hp, hp, wp, wp, 0, 0),
"replicate")``), prepends the cached last frames of the previous chunk (``cache["padding"]``: frames of that
*padded* input) or, on the first chunk, the first frame repeated, and runs its inner ``KVAESafeConv3d`` (no padding
of its own) on the result, in one or two calls; it sizes its output buffer from the unpadded input and caches the
padded input's last frames for the next chunk.

On a row shard that forward runs unchanged, on this rank's rows. Its replicate pad then puts copies of this rank's
edge rows where, at an inner shard boundary, the neighbour's rows belong; the inner conv's treatment
(:class:`HaloPaddedInnerConv`) replaces exactly those rows, in every tensor it is handed (cached frames included),
by the neighbours' rows of the same tensor, received in a halo exchange, before convolving. At the global top and
bottom the rows stay the layer's own replicate rows. Every rank's tensors have the same frames (the chunks and
caches split time alike on every rank), so the exchanges pair up; each rank caches its own padded rows, which is
what its next chunk reads. The replaced rows get no gradient, as in the unsharded layer they do not exist; the
neighbours' rows send theirs back through the exchange.
"""

from __future__ import annotations

import torch

from ..core.halo import halo_rows
from ..core.plan import SpatialState

__all__ = ["HaloPaddedInnerConv"]


class HaloPaddedInnerConv:
    """The ``KVAESafeConv3d`` inside a ``KVAECachedCausalConv3d`` whose input arrives replicate-padded by
    ``kernel // 2`` rows each side: the padding rows at inner shard boundaries become the neighbours' rows, then
    diffusers' own ``KVAESafeConv3d.forward`` (its memory-bounded chunking over frames) runs."""

    _pv_state: SpatialState

    def forward(self, input: torch.Tensor, write_to=None) -> torch.Tensor:
        pad = self.kernel_size[1] // 2
        # (b, c, t, pad + h_r + pad, w) -> my rows (b, c, t, h_r, w) -> (b, c, t, pad + h_r + pad, w) with the
        # neighbours' rows at inner boundaries and the layer's replicate rows at the global edges
        mine = input.narrow(-2, pad, input.shape[-2] - 2 * pad)
        spec = (("replicate", pad, 0.0),)
        x = halo_rows(mine, self._pv_state.group, pad, pad, pad, spec, spec)
        return super().forward(x, write_to)

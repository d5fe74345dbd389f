"""diffusers' ``CogVideoXCausalConv3d`` in its replicate-padded form (what Mochi's VAE builds) on row shards.

The layer (``diffusers/models/autoencoders/autoencoder_kl_cogvideox.py``) is shared by CogVideoX and Mochi. With
``pad_mode="replicate"`` its forward is ``F.pad(x, time_causal_padding, mode="replicate")`` (width and height
symmetric, time causal) and then its ``conv``, a ``CogVideoXSafeConv3d`` built with ``padding=0``; it returns
``(output, None)`` (no frame cache in that mode). Here the row part of that pad becomes a halo: inner boundaries
receive the neighbours' rows and only the global top and bottom ranks replicate their own edge row, as the layer
does. Time and width are not split, so their replicate padding is the layer's own, applied locally first (replicate
padding is an index clamp per dimension, so padding time and width and then rows equals padding all at once).

The convolution is the layer's own ``conv`` module, called on the haloed rows: ``CogVideoXSafeConv3d`` splits
inputs over 1 G elements into time chunks (exact for stride-1 time kernels, which is every such conv here that
needs a halo), and a row shard keeps that memory behaviour.

``pad_mode="constant"`` (CogVideoX's frame-cached form, which Mochi's ``_enable_framewise_*`` also switch to) is a
different computation and is refused with a clear error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.halo import halo_for_conv
from ..core.plan import SpatialState

__all__ = ["HaloReplicateCausalConv", "replicate_causal_conv_is_local"]


def replicate_causal_conv_is_local(m) -> bool:
    """Whether a replicate-padded ``CogVideoXCausalConv3d`` reads only rows of its own stride block: no row padding
    and a row kernel no taller than its row stride (Mochi's ``k = s`` downsampling convs; 1x1x1 convs). Row shards
    start on multiples of every stride, so such a conv needs no halo."""
    _, _, top, bottom, _, _ = m.time_causal_padding
    conv = m.conv
    return top == bottom == 0 and conv.dilation[1] * (conv.kernel_size[1] - 1) < conv.stride[1]


class HaloReplicateCausalConv:
    """``CogVideoXCausalConv3d`` with ``pad_mode="replicate"`` whose row padding becomes a halo (see the module
    docstring); same signature and return value as the layer: ``forward(inputs, conv_cache=None) -> (out, None)``."""

    _pv_state: SpatialState

    def forward(self, inputs: torch.Tensor, conv_cache=None) -> tuple[torch.Tensor, None]:
        if self.pad_mode != "replicate":
            raise NotImplementedError(
                f"parallel_vae shards CogVideoXCausalConv3d with pad_mode='replicate' only, got {self.pad_mode!r} "
                "(Mochi's _enable_framewise_encoding/_decoding switch it to 'constant'; call neither)"
            )
        conv = self.conv
        # time_causal_padding = (w_left, w_right, h_top, h_bottom, t_front, t_back), F.pad order
        wl, wr, top, bottom, front, back = self.time_causal_padding
        # step 1: the layer's own replicate padding of time and width (not split: local)
        x = F.pad(inputs, (wl, wr, 0, 0, front, back), mode="replicate")
        # step 2: rows: the neighbours' rows at inner boundaries, the edge row replicated at the global edges
        x = halo_for_conv(
            x,
            self._pv_state.group,
            conv.kernel_size[1],
            conv.stride[1],
            conv.dilation[1],
            top,
            bottom,
            (("replicate", top, 0.0),),
            (("replicate", bottom, 0.0),),
        )
        # step 3: the layer's own (unpadded) convolution
        return conv(x), None

"""Halo-aware versions of the Wan layers that read neighbouring rows.

Each class subclasses the diffusers (or torch) layer it stands in for and is installed by swapping the
instance's ``__class__`` (see :mod:`parallel_vae.wan`), so parameters, buffers, ``state_dict`` keys, hooks and
``isinstance`` checks are untouched and disabling restores the original class. Only ``forward`` differs: the
height padding of the original layer is replaced by a halo exchange with the neighbouring ranks, which pads
with zeros at the global top and bottom exactly as the original padding did.

Every instance carries ``_pv_state`` (a :class:`SpatialState`) naming its process group.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d

from .comm import gather_rows, halo_exchange


class SpatialState:
    """What a parallelized module needs to know: its spatial process group.

    Deep copies share the state (an EMA copy of the model keeps working; a process group cannot be copied).
    """

    def __init__(self, group, size: int, factor: int):
        self.group = group
        self.size = size
        self.factor = factor

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"SpatialState(size={self.size}, factor={self.factor})"


class HaloCausalConv3d(WanCausalConv3d):
    """``WanCausalConv3d`` with a 3-row kernel: the rows above and below come from the neighbouring ranks.

    The halo is exchanged after the temporal cache is concatenated, so cached frames carry halos too.
    """

    _pv_state: SpatialState

    def forward(self, x, cache_x=None) -> torch.Tensor:
        # padding = (w_left, w_right, h_top, h_bottom, t_front, t_back), as the parent builds it.
        padding = list(self._padding)
        if cache_x is not None and self._padding[4] > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            padding[4] -= cache_x.shape[2]
        # The height padding becomes a halo: neighbour rows inside the frame, zeros at the global edges.
        x = halo_exchange(x, self._pv_state.group, dim=3, top=padding[2], bottom=padding[3])
        padding[2] = padding[3] = 0
        x = F.pad(x, padding)
        return nn.Conv3d.forward(self, x)


class HaloConv2d(nn.Conv2d):
    """The 3x3 ``Conv2d(padding=1)`` after the nearest-exact 2x upsample: height padding becomes a halo."""

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b*t, c, h, w); rows are dim 2.
        pad_h, pad_w = self.padding
        x = halo_exchange(x, self._pv_state.group, dim=2, top=pad_h, bottom=pad_h)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, pad_w), self.dilation, self.groups)


class HaloZeroPad2d(nn.ZeroPad2d):
    """The ``ZeroPad2d((0, 1, 0, 1))`` before the stride-2 downsample conv.

    Width padding stays local; the bottom padding row is the first row of the rank below, and only the global
    last rank pads with zeros. Shards start on even rows (latent-row units), so the stride-2 grid is aligned.
    """

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = self.padding
        x = F.pad(x, (left, right, 0, 0))
        return halo_exchange(x, self._pv_state.group, dim=2, top=top, bottom=bottom)


class ShardedWanAttentionBlock(WanAttentionBlock):
    """Single-head attention over a frame whose rows are sharded.

    Each rank computes queries for its own rows only, against keys and values of the whole frame, all-gathered
    (variable sizes) in row order. The all-gather's backward reduce-scatters, so each owner receives the key/value
    gradients that every rank's queries produced. No rank computes the whole frame's attention.
    """

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        b, c, t, h, w = x.size()
        # (b, c, t, h, w) -> (b*t, c, h, w)
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = self.norm(x)
        qkv = self.to_qkv(x)
        # (b*t, 3c, h, w) -> (b*t, 1, h*w, 3c)
        qkv = qkv.reshape(b * t, 1, c * 3, -1).permute(0, 1, 3, 2).contiguous()
        q, kv = qkv.split([c, 2 * c], dim=-1)
        # (b*t, 1, h*w, 2c) -> (b*t, 1, H*w, 2c): the whole frame's keys and values, rank order = row order.
        kv = gather_rows(kv, self._pv_state.group, dim=2, sum_grads=True)
        k, v = kv.chunk(2, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)
        # (b*t, 1, h*w, c) -> (b*t, c, h, w)
        x = x.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        x = self.proj(x)
        # (b*t, c, h, w) -> (b, c, t, h, w)
        x = x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        return x + identity

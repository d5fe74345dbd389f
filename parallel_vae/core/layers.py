"""Halo-aware versions of the Wan layers that read neighbouring rows.

Each class subclasses the diffusers (or torch) layer it stands in for and is installed by swapping the
instance's ``__class__`` (see :mod:`parallel_vae.families.wan`), so parameters, buffers, ``state_dict`` keys, hooks and
``isinstance`` checks are untouched and disabling restores the original class. Only ``forward`` differs: the
height padding of the original layer is replaced by a halo exchange with the neighbouring ranks, which pads
with zeros at the global top and bottom exactly as the original padding did.

Every instance carries ``_pv_state`` (a :class:`SpatialState`) naming its process group.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T, WanAttentionBlock, WanCausalConv3d

from .comm import gather_rows, halo_exchange, halo_pad


class SpatialState:
    """What a parallelized module needs to know: its spatial process group.

    Deep copies share the state (an EMA copy of the model keeps working; a process group cannot be copied).
    """

    def __init__(self, group, size: int, factor: int):
        self.group = group
        self.size = size
        self.factor = factor
        # Per causal conv: the halo rows of the last frames of its input, remembered between the chunks of one
        # inference pass (see HaloCausalConv3d). Weak keys: a module that is gone takes its rows with it.
        self.tails: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"SpatialState(size={self.size}, factor={self.factor})"


def _onednn(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
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


class HaloCausalConv3d(WanCausalConv3d):
    """``WanCausalConv3d`` with a 3-row kernel: the rows above and below come from the neighbouring ranks.

    The halo covers the cached frames too. Their halo rows travelled with the previous chunk (the cache is the
    tail of this conv's previous input), so without autograd they are remembered and not sent again.
    """

    _pv_state: SpatialState

    def forward(self, x, cache_x=None) -> torch.Tensor:
        # _padding = (w_left, w_right, h_top, h_bottom, t_front, t_back), as the parent builds it: symmetric in
        # width, causal (front only) in time.
        w_pad, _, top, bottom, front, _ = self._padding
        state = self._pv_state
        prefix = None
        if cache_x is not None and front > 0:
            prefix = cache_x.to(x.device)
            front -= prefix.shape[2]
            if front < 0:
                raise RuntimeError(f"a cache of {prefix.shape[2]} frames is longer than the causal padding")
        # step 1: which halo rows are known. diffusers' encoder and decoder build every conv's cache as the last
        # CACHE_T frames of that conv's input stream (the previous chunk, or the one before and the previous),
        # and clear the caches at the first chunk (cache None), which resets what is remembered here. All ranks
        # run the same calls with the same shapes (bar the rows), so they decide alike and the sends pair up.
        # With autograd on, nothing is remembered: gradient checkpointing re-runs chunks out of order.
        remember = not torch.is_grad_enabled()
        known = state.tails.get(self) if remember and prefix is not None else None
        if known is not None:
            n = prefix.shape[2]
            above, below = known
            fits = above.shape[2] >= n and above.shape[:2] == prefix.shape[:2] and above.shape[4] == prefix.shape[4]
            known = (above[:, :, -n:], below[:, :, -n:]) if fits and above.dtype == prefix.dtype else None
        # step 2: one buffer: the causal zero frames, the cached frames and this chunk along time; the rows of the
        # neighbours above and below (zeros at the global edges) along height.
        x = halo_pad(
            x, state.group, dim=3, top=top, bottom=bottom, prefix=prefix, cat_dim=2, zero_front=front, prefix_halo=known
        )
        if remember:
            # (b, c, k, top + rows + bottom, w) -> the halo rows of the last k frames: the next chunk's cache.
            k = min(CACHE_T, x.shape[2] - front)
            tail = x.narrow(2, x.shape[2] - k, k)
            state.tails[self] = (tail.narrow(3, 0, top).clone(), tail.narrow(3, x.shape[3] - bottom, bottom).clone())
        else:
            state.tails.pop(self, None)
        # step 3: convolve; the width padding is the convolution's own (zeros, symmetric), so it costs no copy.
        return _conv(x, self.weight, self.bias, self.stride, (0, 0, w_pad), self.dilation, self.groups)


class HaloConv2d(nn.Conv2d):
    """The 3x3 ``Conv2d(padding=1)`` after the nearest-exact 2x upsample: height padding becomes a halo."""

    _pv_state: SpatialState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (b*t, c, h, w); rows are dim 2.
        pad_h, pad_w = self.padding
        x = halo_exchange(x, self._pv_state.group, dim=2, top=pad_h, bottom=pad_h)
        return _conv(x, self.weight, self.bias, self.stride, (0, pad_w), self.dilation, self.groups)


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

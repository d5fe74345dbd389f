"""Causal 3-D convs with a frame cache (``WanCausalConv3d``, ``QwenImageCausalConv3d``) on row shards.

The halo is exchanged after the cached frames are concatenated along time, so it covers them too; in inference the
cached frames' halo rows are remembered from the previous chunk instead of being sent again.

Activation checkpointing of the blocks that hold these convs (``enable_cache_checkpointing``): diffusers marks
``AutoencoderKLWan`` as not supporting gradient checkpointing, and a naive ``checkpoint(block, x, feat_cache,
feat_idx)`` is wrong: the block mutates the shared ``feat_cache`` list and ``feat_idx`` counter in place,
so the recomputation during backward would read the caches of a *later* chunk. Here each checkpointed block runs
on a private copy of the cache list taken at the call (a snapshot of references, no tensor copies), and returns the
updated cache entries as outputs of the checkpointed region; the caller's list and counter are updated from them.
The recomputation therefore sees exactly the inputs of the original call.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..core.comm import start_neighbor_rows
from ..core.halo import _conv, overlap_enabled, recompute_boundary_rows
from ..core.plan import SpatialState

__all__ = ["HaloCausalConv", "enable_cache_checkpointing", "disable_cache_checkpointing"]


class HaloCausalConv:
    """A causal 3-D conv with a frame cache (``WanCausalConv3d``, ``QwenImageCausalConv3d``: ``_padding`` =
    (w, w, h, h, t, 0), zero padding, ``forward(x, cache_x)``): the rows above and below come from the neighbours.

    As the unmodified layer does, the causal zero frames, the cached frames and this chunk are concatenated along
    time; the rows are not padded: the convolution runs on my rows with its own zero row padding while the edge
    rows travel, and the output rows that reach the neighbours' rows are recomputed afterwards
    (``core.halo.corrected_conv``).
    The halo covers the cached frames too. Their halo rows travelled with the previous chunk (the cache is the
    tail of this conv's previous input), so without autograd they are remembered and not sent again.
    """

    _pv_state: SpatialState
    CACHE_T = 2  # frames the diffusers encoders/decoders keep per causal conv (both families' CACHE_T)

    def forward(self, x, cache_x=None) -> torch.Tensor:
        w_pad, _, top, bottom, front, _ = self._padding
        state = self._pv_state
        kh, sh = self.kernel_size[1], self.stride[1]
        if kh != 2 * top + 1 or top != bottom or sh != 1:
            raise NotImplementedError(f"causal conv with row kernel {kh}, padding {top}/{bottom}, stride {sh}")
        prefix = None
        if cache_x is not None and front > 0:
            prefix = cache_x.to(x.device)
            front -= prefix.shape[2]
            if front < 0:
                raise RuntimeError(f"a cache of {prefix.shape[2]} frames is longer than the causal padding")
        group = state.group
        # step 1: which halo rows are known. diffusers' encoder and decoder build every conv's cache as the last
        # CACHE_T frames of that conv's input stream (the previous chunk, or the one before and the previous),
        # and clear the caches at the first chunk (cache None), which resets what is remembered here. All ranks
        # run the same calls with the same shapes (bar the rows), so they decide alike and the exchanges pair up.
        # With autograd on, nothing is remembered: gradient checkpointing re-runs chunks out of order.
        remember = not torch.is_grad_enabled()
        known = state.tails.get(self) if remember and prefix is not None else None
        if known is not None:
            n = prefix.shape[2]
            above, below = known
            fits = above.shape[2] >= n and above.shape[:2] == prefix.shape[:2] and above.shape[4] == prefix.shape[4]
            known = (above[:, :, -n:], below[:, :, -n:]) if fits and above.dtype == prefix.dtype else None
        # step 2: post the exchange of the frames whose halo rows are not known, then build the time stack.
        live = x if prefix is None or known is not None else torch.cat([prefix, x], 2)
        pending = start_neighbor_rows(live, group, dim=3, top=top, bottom=bottom)
        live = pending.x
        parts = ([x.new_zeros(_frames(x, front))] if front else []) + ([prefix] if known is not None else []) + [live]
        stack = torch.cat(parts, 2) if len(parts) > 1 else live
        # step 3: convolve my rows (zero row padding in the neighbours' place; the width padding is the
        # convolution's own) while the rows travel; step 4: wait, recompute the rows whose taps reach the neighbours' rows.
        padding = (0, top, w_pad)
        if not overlap_enabled():
            above, below = pending.wait()
        y = _conv(stack, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        if overlap_enabled():
            above, below = pending.wait()
        # the neighbours' rows of every frame of the stack (0 rows at a global edge)
        above, below = (
            _stack_rows(h, front, known[i] if known is not None else None) for i, h in enumerate((above, below))
        )
        if remember:
            # (b, c, frames, halo rows, w) -> those of the last k frames: the next chunk's cache
            k = min(self.CACHE_T, stack.shape[2] - front)
            state.tails[self] = (above[:, :, -k:].clone(), below[:, :, -k:].clone())
        else:
            state.tails.pop(self, None)
        return recompute_boundary_rows(
            y, stack, above, below, self.weight, self.bias, self.stride, padding, self.dilation, self.groups
        )


def _frames(x: torch.Tensor, n: int) -> list[int]:
    shape = list(x.shape)
    shape[2] = n
    return shape


def _stack_rows(rows: torch.Tensor, front: int, known) -> torch.Tensor:
    """The halo rows of the time stack: zeros for the causal frames, the remembered rows, the received rows."""
    parts = ([rows.new_zeros(_frames(rows, front))] if front else []) + ([known] if known is not None else [])
    # At a global edge these hold 0 rows (the conv's own zero padding is right there), but every frame all the
    # same: the remembered tails must look alike on every rank, which decide alike whether to reuse them.
    return torch.cat(parts + [rows], 2) if parts else rows


_FLAG = "_pv_checkpointed"
_OFFLOAD = "_pv_offload"  # the block's checkpoint keeps its saved tensors in host memory
_TENSOR = object()  # a cache entry that enters the checkpointed region as an input
_SLOTS = "_pv_cache_slots"  # how many feat_cache entries the block reads and writes (one per causal conv)


def _checkpointed_forward(block: nn.Module, x, feat_cache=None, feat_idx=None, *args, **kwargs):
    # Wan passes the cache by keyword, Qwen-Image positionally (x, feat_cache, feat_idx): both bind here.
    from ..checkpointing import offload_saved_tensors

    forward = type(block).forward  # the class's own forward; this function is the instance's override
    if not torch.is_grad_enabled():
        if feat_cache is None:
            return forward(block, x, *args, **kwargs)
        return forward(block, x, *args, feat_cache=feat_cache, feat_idx=feat_idx, **kwargs)
    offload = offload_saved_tensors() if block.__dict__.get(_OFFLOAD) else contextlib.nullcontext()
    if feat_cache is None:
        with offload:
            return checkpoint(forward, block, x, *args, use_reentrant=False, **kwargs)
    start = feat_idx[0]
    slots = block.__dict__.get(_SLOTS)
    # The block reads and writes only its own entries, feat_cache[start : start + slots]. Their tensors go in as
    # inputs of the checkpointed region, so autograd saves them like the block input: freed by backward, and
    # offloaded with it. Holding them in the closure instead would keep every chunk's caches until the graph dies.
    # Non-tensor entries (None, Wan's "Rep" marker) stay in the closure. Until the count is known (the first call,
    # at the first chunk, where diffusers has just cleared the caches), the closure keeps this call's entries.
    total = len(feat_cache)
    own = feat_cache[start:] if slots is None else feat_cache[start : start + slots]
    tensors = [e for e in own if isinstance(e, torch.Tensor)] if slots is not None else []
    template = [_TENSOR if slots is not None and isinstance(e, torch.Tensor) else e for e in own]
    del own

    def run(x, *cached):
        it = iter(cached)
        entries = [next(it) if e is _TENSOR else e for e in template]
        cache = [None] * start + entries + [None] * (total - start - len(entries))
        idx = [start]
        out = forward(block, x, *args, feat_cache=cache, feat_idx=idx, **kwargs)
        return out, cache[start : idx[0]], idx[0]

    with offload:
        out, written, end = checkpoint(run, x, *tensors, use_reentrant=False)
    if slots is None:
        block.__dict__[_SLOTS] = end - start
        del template[end - start :]  # the closure keeps only the block's own entries
    elif end - start != slots:
        raise RuntimeError(f"a checkpointed block used {end - start} cache entries, {slots} before")
    feat_cache[start:end] = written
    feat_idx[0] = end
    return out


def enable_cache_checkpointing(blocks: list[tuple[str, nn.Module]], *, offload: bool = False) -> None:
    """Checkpoint each block, whose forward takes ``feat_cache``/``feat_idx`` (Wan-style), with the cache snapshot.
    ``offload``: the tensors each checkpoint keeps (block inputs and the caches they start from) live in host
    memory until backward (:func:`parallel_vae.checkpointing.offload_saved_tensors`)."""
    for _, block in blocks:
        if not block.__dict__.get(_FLAG):
            # An instance attribute shadows the class's forward; partial (not a bound method) deep-copies cleanly.
            block.forward = functools.partial(_checkpointed_forward, block)
            block.__dict__[_FLAG] = True
        block.__dict__[_OFFLOAD] = bool(offload)


def disable_cache_checkpointing(blocks: list[tuple[str, nn.Module]]) -> None:
    for _, block in blocks:
        if block.__dict__.pop(_FLAG, False):
            block.__dict__.pop("forward", None)
        block.__dict__.pop(_OFFLOAD, None)

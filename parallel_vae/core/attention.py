"""Softmax attention over pixels whose rows are split across ranks.

Each rank computes the queries of its own rows only, against the keys and values of the whole frame (or clip),
all-gathered in row order with variable sizes. The gather's backward reduce-scatters, so every owner of a key row
receives the gradients that all ranks' queries sent it. No rank computes another rank's queries, and no score
matrix over all tokens is built anywhere: with a frame-causal mask (HunyuanVideo's mid block) the queries of each
frame attend to the keys of frames up to their own in one SDPA call without a mask, so the peak is one query
frame's scores against the keys it may see, not a (tokens x tokens) mask.

``ShardedAttention`` stands in for diffusers' ``Attention`` in the self-attention-over-pixels configuration the
VAE mid blocks use (group norm inside, residual connection, optional rescale, the default SDPA processor).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from .comm import gather_rows

__all__ = ["sharded_sdpa", "frame_causal_sdpa", "ShardedAttention", "check_pixel_attention"]


def sharded_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, sizes: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """forward: SDPA of my queries (.., Lq, d) against every rank's keys/values (.., Lk_r, d) gathered along dim -2
    in rank order; backward: key/value gradients reduce-scattered to their owners.

    ``sizes``: every rank's Lk_r, from the agreed split (``SpatialState.level_sizes``); ``None`` gathers them
    (one small collective and a host read: avoid it per layer on GPUs)."""
    # (.., Lk_r, 2d) -> (.., sum_r Lk_r, 2d): one gather for keys and values together
    kv = gather_rows(torch.cat([k, v], -1), group, dim=-2, sizes=sizes, sum_grads=True)
    k, v = kv.split([k.shape[-1], v.shape[-1]], -1)
    return F.scaled_dot_product_attention(q, k, v)


def frame_causal_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int, group, sizes: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """forward: attention in which a query of frame t sees the keys of frames <= t of the whole clip; backward as
    :func:`sharded_sdpa`.

    ``q``, ``k``, ``v``: (B, heads, frames * L_r, d), tokens ordered (frame, this rank's positions), L_r may differ
    between ranks (``sizes``: every rank's L_r, as in :func:`sharded_sdpa`). One SDPA call per query frame against the keys of frames 0..t, with no mask: peak score memory is
    one query frame's (L_r x (t + 1) L) block, never (frames L)^2.
    """
    b, h, n, d = q.shape
    local = n // frames
    # (B, h, T * L_r, d) -> (B, h, T, L_r, 2d) -> gathered along the positions: (B, h, T, L, 2d)
    kv = torch.cat([k, v], -1).reshape(b, h, frames, local, 2 * d)
    kv = gather_rows(kv, group, dim=3, sizes=sizes, sum_grads=True)
    total = kv.shape[3]
    q = q.reshape(b, h, frames, local, d)
    out = []
    for t in range(frames):
        # keys and values of frames 0..t: (B, h, (t + 1) * L, d)
        seen = kv.narrow(2, 0, t + 1).reshape(b, h, (t + 1) * total, 2 * d)
        k_t, v_t = seen.split([d, v.shape[-1]], -1)
        out.append(F.scaled_dot_product_attention(q[:, :, t], k_t, v_t))
    # T x (B, h, L_r, d) -> (B, h, T * L_r, d)
    return torch.stack(out, 2).reshape(b, h, n, v.shape[-1])


# Only the default SDPA processor: the classic ``AttnProcessor`` computes the softmax in float32 when
# ``upcast_softmax`` is set (HunyuanVideo's mid block), even for float64 inputs, which SDPA here does not reproduce
# (2.3e-9 apart in float64, over the 1e-10 bar).
_PROCESSORS = (AttnProcessor2_0,)


def check_pixel_attention(attn: Attention, name: str) -> None:
    """Raise unless ``attn`` is the configuration :class:`ShardedAttention` reproduces exactly."""
    problems = []
    if type(attn.processor) not in _PROCESSORS:
        problems.append(f"processor {type(attn.processor).__name__} (only the default SDPA processor is sharded)")
    if attn.spatial_norm is not None:
        problems.append("a spatial norm")
    if attn.norm_q is not None or attn.norm_k is not None:
        problems.append("query/key norms")
    if attn.is_cross_attention or attn.only_cross_attention or attn.added_kv_proj_dim is not None:
        problems.append("cross attention")
    if problems:
        raise NotImplementedError(f"parallel_vae cannot shard the attention at {name}: it has {', '.join(problems)}")


class ShardedAttention(Attention):
    """diffusers ``Attention`` (self-attention over pixels, as in the VAE mid blocks) on row shards.

    Same arithmetic as ``AttnProcessor2_0``: group norm (statistics merged over the group), q/k/v projections of my
    tokens, SDPA against the gathered keys/values, output projection, residual, rescale. ``frames`` (set by a
    parent block, e.g. HunyuanVideo's mid block) switches to frame-causal attention over a flattened clip.
    """

    _pv_state = None

    def forward(
        self, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, frames: Optional[int] = None, **kw
    ):
        if encoder_hidden_states is not None or attention_mask is not None or temb is not None or kw:
            raise NotImplementedError("sharded attention supports self-attention without an explicit mask")
        check_pixel_attention(self, type(self).__name__)  # the processor may have been changed after enabling
        group = self._pv_state.group
        residual = x = hidden_states
        four_d = x.dim() == 4
        if four_d:
            b, c, h, w = x.shape
            # (B, C, h_r, W) -> (B, h_r * W, C): tokens in row-major order, so rank order is row order
            x = x.reshape(b, c, h * w).transpose(1, 2)
        b, n, _ = x.shape
        if self.group_norm is not None:
            # a ShardedGroupNorm (the plan swaps every GroupNorm): statistics over all ranks' tokens
            x = self.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        head_dim = k.shape[-1] // self.heads
        # (B, n, heads * d) -> (B, heads, n, d)
        q, k, v = (t.reshape(b, n, self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if frames is None:
            out = sharded_sdpa(q, k, v, group, self._pv_state.level_sizes(n))
        else:
            out = frame_causal_sdpa(q, k, v, frames, group, self._pv_state.level_sizes(n // frames))
        # (B, heads, n, d) -> (B, n, heads * d)
        out = out.transpose(1, 2).reshape(b, n, self.heads * head_dim).to(q.dtype)
        out = self.to_out[1](self.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(residual.shape)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor


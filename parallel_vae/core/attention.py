"""Softmax attention over pixels whose rows are split across ranks.

Each rank computes the queries of its own rows only, against the keys and values of the whole frame (or clip),
all-gathered in row order with variable sizes. The gather's backward reduce-scatters, so every owner of a key row
receives the gradients that all ranks' queries sent it. No rank computes another rank's queries, and no score
matrix over all tokens is built anywhere: with a frame-causal mask (HunyuanVideo's mid block) the queries of each
frame attend to the keys of frames up to their own in one SDPA call without a mask, so the peak is one query
frame's scores against the keys it may see, not a (tokens x tokens) mask.

Overlap: the keys and values are projected first and their gather posted (:func:`start_kv_gather`); the query
projection runs while they travel, and only the SDPA waits. The gather's autograd Function posts and returns; the
wait and the unpadding of uneven shards come after it as plain autograd (``comm.PendingGather``), so nothing
inside the Function forces the wait early.

``ShardedAttention`` stands in for diffusers' ``Attention`` in the self-attention-over-pixels configuration the
VAE mid blocks use (group norm inside, residual connection, optional rescale, the default SDPA processor).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from .comm import overlap_enabled, start_gather_rows

__all__ = [
    "sharded_sdpa", "frame_causal_sdpa", "start_kv_gather", "PendingKV", "ShardedAttention", "check_pixel_attention",
    "ATTENTION_MODES", "RING_AUTO_BYTES", "resolve_attention_mode",
]


class _FanOut(torch.autograd.Function):
    """forward: ``n`` aliases of ``x``, one per use (query, key, value projections, the residual); backward: their
    gradients summed last to first.

    Autograd sums the gradients of a tensor used several times in the order its engine runs the uses' backwards,
    which follows the order the uses were created. Projecting keys and values before queries (the overlap) would
    change that grouping and move float64 gradients by an ulp; summing here in a fixed order keeps them bitwise
    those of the query-first order, ((g_v + g_k) + g_q), with the overlap on or off."""

    @staticmethod
    def forward(ctx, x, n):
        return tuple(x.view_as(x) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        total = grads[-1]
        for g in reversed(grads[:-1]):
            total = total + g
        return total, None


def fan_out(x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """forward: ``n`` aliases of ``x``; backward: their gradients summed last to first (see :class:`_FanOut`)."""
    return _FanOut.apply(x, n) if torch.is_grad_enabled() and x.requires_grad else (x,) * n


class PendingKV:
    """Every rank's keys and values of one posted gather (:func:`start_kv_gather`); :meth:`attend` waits for them
    (on its first use; :meth:`wait` waits earlier) and runs the attention of this rank's queries against them."""

    def __init__(self, pending, d_k: int, d_v: int, frames: Optional[int], local: int):
        self._pending, self._d_k, self._d_v, self.frames, self._local = pending, d_k, d_v, frames, local

    def wait(self) -> torch.Tensor:
        """The gathered keys and values side by side: (.., sum_r Lk_r, d_k + d_v), or with ``frames``
        (B, h, T, L, d_k + d_v)."""
        return self._pending.wait()

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """SDPA of ``q`` (.., Lq, d) against the gathered keys and values (frame-causal with ``frames``)."""
        kv = self.wait()
        if self.frames is None:
            k, v = kv.split([self._d_k, self._d_v], -1)
            return F.scaled_dot_product_attention(q, k, v)
        b, h, n, d = q.shape
        frames, local, total = self.frames, self._local, kv.shape[3]
        q = q.reshape(b, h, frames, local, d)  # (B, h, T * L_r, d) -> (B, h, T, L_r, d)
        out = []
        for t in range(frames):
            # keys and values of frames 0..t: (B, h, (t + 1) * L, d)
            seen = kv.narrow(2, 0, t + 1).reshape(b, h, (t + 1) * total, self._d_k + self._d_v)
            k_t, v_t = seen.split([self._d_k, self._d_v], -1)
            out.append(F.scaled_dot_product_attention(q[:, :, t], k_t, v_t))
        # T x (B, h, L_r, d_v) -> (B, h, T * L_r, d_v)
        return torch.stack(out, 2).reshape(b, h, n, self._d_v)


def start_kv_gather(
    k: torch.Tensor,
    v: torch.Tensor,
    group,
    sizes: Optional[Sequence[int]] = None,
    frames: Optional[int] = None,
) -> PendingKV:
    """forward: post the all-gather of every rank's keys/values (.., Lk_r, d) along dim -2 in rank order and return
    at once; backward: key/value gradients reduce-scattered to their owners.

    With ``frames``, ``k`` and ``v`` are (B, heads, frames * L_r, d), tokens ordered (frame, this rank's
    positions), and the gather runs along the positions of each frame. ``sizes``: every rank's Lk_r (with
    ``frames``: its L_r), from the agreed split (``SpatialState.level_sizes``); ``None`` gathers them (one small
    collective and a host read: avoid it per layer on GPUs). Work that needs only this rank's tokens (the query
    projection) can run before :meth:`PendingKV.attend`, while the keys and values travel."""
    # (.., Lk_r, 2d): one gather for keys and values together
    kv = torch.cat([k, v], -1)
    local = None
    if frames is None:
        pending = start_gather_rows(kv, group, dim=-2, sizes=sizes, sum_grads=True)
    else:
        b, h, n, _ = k.shape
        local = n // frames
        # (B, h, T * L_r, 2d) -> (B, h, T, L_r, 2d), gathered along the positions: (B, h, T, L, 2d)
        kv = kv.reshape(b, h, frames, local, kv.shape[-1])
        pending = start_gather_rows(kv, group, dim=3, sizes=sizes, sum_grads=True)
    return PendingKV(pending, k.shape[-1], v.shape[-1], frames, local)


def sharded_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, sizes: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """forward: SDPA of my queries (.., Lq, d) against every rank's keys/values (.., Lk_r, d) gathered along dim -2
    in rank order; backward: key/value gradients reduce-scattered to their owners.

    ``sizes``: every rank's Lk_r, as in :func:`start_kv_gather`, which this is with the queries already at hand."""
    return start_kv_gather(k, v, group, sizes).attend(q)


def frame_causal_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int, group, sizes: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """forward: attention in which a query of frame t sees the keys of frames <= t of the whole clip; backward as
    :func:`sharded_sdpa`.

    ``q``, ``k``, ``v``: (B, heads, frames * L_r, d), tokens ordered (frame, this rank's positions), L_r may differ
    between ranks (``sizes``: every rank's L_r, as in :func:`sharded_sdpa`). One SDPA call per query frame against
    the keys of frames 0..t, with no mask: peak score memory is one query frame's (L_r x (t + 1) L) block, never
    (frames L)^2.
    """
    return start_kv_gather(k, v, group, sizes, frames).attend(q)


#: how sequence-parallel attention (a ViT decoder's self-attention over all latent tokens, MiniMax-H3) meets the
#: other ranks' keys and values: ``"gather"`` all-gathers them (:func:`start_kv_gather`), ``"ring"`` passes them
#: around the group (:func:`parallel_vae.core.ring_attention.ring_sdpa`), ``"auto"`` picks by size
#: (:func:`resolve_attention_mode`). Set per model: ``enable_spatial_parallelism(vae, attention=...)``.
ATTENTION_MODES = ("auto", "gather", "ring")
#: ``"auto"`` takes the ring once the whole sequence's keys and values of one attention call exceed this
RING_AUTO_BYTES = 1 << 30


def resolve_attention_mode(mode: str, kv_bytes: int) -> str:
    """``"gather"`` or ``"ring"`` for ``mode`` and the size of the whole sequence's keys and values of one call.

    ``auto``: the gather while those keys and values fit in ``RING_AUTO_BYTES`` (1 GiB), the ring beyond. The gather
    is one collective, overlapped with the query projection, and the platform's SDPA kernel (flash attention on
    GPUs) on the gathered keys; the ring is n - 1 dependent point-to-point steps in each direction and a plain-matmul
    block kernel. The ring wins only where the gathered keys and values themselves weigh on the per-rank peak:
    they grow with the whole sequence, the ring's blocks with one rank's share. ``kv_bytes`` is the same on every
    rank (it follows from the agreed split), so every rank picks the same mode."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "ring" if kv_bytes > RING_AUTO_BYTES else "gather"


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
        # Keys and values first: their gather travels while this rank projects its queries (the overlap;
        # core.comm.set_overlap(False) waits right after posting instead, with the same arithmetic).
        if residual is x:  # tokens in, no group norm: the residual is a fourth use of the same tensor
            x_q, x_k, x_v, residual = fan_out(x, 4)
        else:
            x_q, x_k, x_v = fan_out(x, 3)
        k, v = self.to_k(x_k), self.to_v(x_v)
        head_dim = k.shape[-1] // self.heads
        heads = lambda t: t.reshape(b, n, self.heads, head_dim).transpose(1, 2)  # noqa: E731
        k, v = heads(k), heads(v)  # (B, n, heads * d) -> (B, heads, n, d)
        sizes = self._pv_state.level_sizes(n if frames is None else n // frames)
        pending = start_kv_gather(k, v, group, sizes, frames)
        if not overlap_enabled():
            pending.wait()
        q = heads(self.to_q(x_q))
        out = pending.attend(q)
        # (B, heads, n, d) -> (B, n, heads * d)
        out = out.transpose(1, 2).reshape(b, n, self.heads * head_dim).to(q.dtype)
        out = self.to_out[1](self.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(residual.shape)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor


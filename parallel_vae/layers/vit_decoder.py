"""A ViT decoder over latent tokens (MiniMax-H3's ``MiniMaxH3VideoViTDecoder3d``) on row shards: sequence-parallel
self-attention with rotary positions of the global token grid.

diffusers' decoder turns every latent voxel of a clip into one token (order (frame, row, column)), appends
``num_register_tokens`` learned register tokens and one zero token (all at position 0), runs full self-attention
blocks with 3-axis RoPE over length-normalized coordinates, drops the appended tokens and expands each token into a
``patch_size_t x patch_size x patch_size`` pixel block. Everything but the attention acts per token.

On a row shard:

* each rank turns its own latent rows into tokens (frame, its rows, column), so its pixel block rows are its own;
* the appended tokens live on the group's last rank (their queries, norms and MLPs run once, there, and their keys
  and values reach every rank through the attention's collectives, so their gradients are summed once);
* rotary positions come from the global grid: the whole clip's table is built exactly as diffusers builds it (same
  shapes, so the float32 cos/sin are the same bits: CPU kernels take a vectorized path or a scalar tail by an
  element's place in the tensor) and each rank takes its tokens' rows;
* every attention computes its own queries against all tokens' keys and values: gathered
  (:func:`parallel_vae.core.attention.start_kv_gather`, reduce-scatter backward) or passed around a ring
  (:func:`parallel_vae.core.ring_attention.ring_sdpa`), per ``enable_spatial_parallelism(attention=...)``.

The token counts of every rank and the mode travel with the rotary table into the blocks (:class:`SequenceRotary`,
the ``rotary_emb`` argument diffusers' blocks pass through to their attention), so a recompute in the backward
(activation checkpointing) uses the counts of the call that built it.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_minimax_h3 import MiniMaxH3VideoAttnProcessor
from diffusers.models.modeling_utils import get_parameter_dtype

from ..core.attention import fan_out, overlap_enabled, resolve_attention_mode, start_kv_gather
from ..core.comm import all_gather_sizes, group_rank, group_size
from ..core.plan import SpatialState
from ..core.ring_attention import ring_sdpa

__all__ = ["ShardedViTDecoder", "SequenceParallelRopeAttention", "SequenceRotary"]


class SequenceRotary(tuple):
    """(cos, sin) of this rank's tokens, carrying every rank's token count (``tokens``) and the attention mode."""

    tokens: tuple
    mode: str


def _sequence_rotary(cos, sin, tokens, mode) -> SequenceRotary:
    r = SequenceRotary((cos, sin))
    r.tokens, r.mode = tuple(tokens), mode
    return r


class ShardedViTDecoder:
    """``MiniMaxH3VideoViTDecoder3d.forward`` on this rank's latent rows (see the module docstring)."""

    _pv_state: SpatialState

    def _pv_rotary(self, b: int, t: int, rows: int, w: int, top: int, h: int, last: bool, device):
        """This rank's rows of the whole clip's rotary table, built as diffusers builds it for (t, rows, w)."""
        grids = [
            2.0 * (torch.arange(0.5, size, dtype=torch.float32, device=device) / size) - 1.0 for size in (t, rows, w)
        ]
        position_ids = torch.stack(torch.meshgrid(*grids, indexing="ij"), dim=-1).flatten(0, 2)
        position_ids = position_ids.unsqueeze(0).expand(b, -1, -1)
        suffix = self.num_register_tokens + 1
        position_ids = torch.cat([position_ids, position_ids.new_zeros((b, suffix, 3))], dim=1)
        out = []
        for table in self.rope(position_ids):  # (b, t * rows * w + suffix, 1, d)
            d = table.shape[-1]
            # (b, t * rows * w, 1, d) -> (b, t, rows, w, 1, d): my rows [top, top + h)
            grid = table[:, : t * rows * w].reshape(b, t, rows, w, 1, d).narrow(2, top, h).reshape(b, t * h * w, 1, d)
            out.append(torch.cat([grid, table[:, t * rows * w :]], 1) if last else grid)
        return out

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        state = self._pv_state
        group = state.group
        rank, size = group_rank(group), group_size(group)
        b, c, t, h, w = hidden_states.shape
        sizes = state.level_sizes(h)  # every rank's latent rows
        if sizes is None:
            sizes = all_gather_sizes(h, group, hidden_states.device)
        rows, top, last = sum(sizes), sum(sizes[:rank]), rank == size - 1
        suffix = self.num_register_tokens + 1

        # (B, C, T, h_r, W) -> (B, T h_r W, C): my tokens, in diffusers' (frame, row, column) order
        x = hidden_states.permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c)
        x = self.proj_in(x)
        n_own = x.shape[1]
        if last:  # the register tokens and the zero token: once, on the last rank
            register_tokens = self.register_tokens.expand(b, -1, -1).to(x.dtype)
            x = torch.cat([x, register_tokens, torch.zeros_like(x[:, :1, :])], dim=1)
        elif torch.is_grad_enabled() and self.register_tokens.requires_grad:
            # a zero-gradient use, so every rank's register tokens have a gradient (zeros off the last rank), as
            # data-parallel wrappers and gradient sums over the group expect of every parameter
            x = x + self.register_tokens[:, :0].sum().to(x.dtype)
        cos, sin = self._pv_rotary(b, t, rows, w, top, h, last, x.device)
        tokens = [t * s * w + (suffix if r == size - 1 else 0) for r, s in enumerate(sizes)]
        attn = self.transformer_blocks[0].attn if len(self.transformer_blocks) else None
        inner = attn.heads * attn.dim_head if attn is not None else x.shape[-1]
        kv_bytes = 2 * b * sum(tokens) * inner * x.element_size()
        mode = resolve_attention_mode(getattr(state, "attention", "auto"), kv_bytes)
        rotary_emb = _sequence_rotary(cos, sin, tokens, mode)

        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, rotary_emb)
            else:
                x = block(x, rotary_emb)

        x = self.norm_out(x).to(get_parameter_dtype(self.proj_out))
        x = self.proj_out(x)[:, :n_own, :]
        p, pt = self.patch_size, self.patch_size_t
        # (B, T h_r W, C p_t p p) -> (B, C, T p_t, h_r p, W p): each token's pixel block, local
        x = x.view(b, t, h, w, self.out_channels, pt, p, p)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7).contiguous()
        return x.reshape(b, self.out_channels, t * pt, h * p, w * p)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' MiniMax-H3 rotary step on (B, N, heads, d): the first ``cos.shape[-1]`` channels rotated by halves."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    first, second = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


class SequenceParallelRopeAttention:
    """``MiniMaxH3VideoAttention`` with its default processor on this rank's tokens: projections, float32 q/k RMS
    norms and rotary positions as ``MiniMaxH3VideoAttnProcessor`` computes them, then this rank's queries against
    every rank's keys and values (gathered, or passed around a ring), then the output projection."""

    _pv_state: SpatialState

    def forward(self, hidden_states: torch.Tensor, rotary_emb=None) -> torch.Tensor:
        proc = self.processor
        if type(proc) is not MiniMaxH3VideoAttnProcessor or proc._attention_backend is not None or (
            proc._parallel_config is not None
        ):
            raise NotImplementedError(
                f"parallel_vae shards MiniMaxH3VideoAttention with its default processor and attention backend only; "
                f"got {type(proc).__name__} (backend {getattr(proc, '_attention_backend', None)!r})"
            )
        group = self._pv_state.group
        tokens = getattr(rotary_emb, "tokens", None)
        mode = getattr(rotary_emb, "mode", "gather")
        heads = self.heads
        # Keys and values first, so that the gather travels while the queries are projected.
        x_q, x_k, x_v = fan_out(hidden_states, 3)
        key = self.to_k(x_k).unflatten(2, (heads, -1))
        value = self.to_v(x_v).unflatten(2, (heads, -1))
        key = self.norm_k(key.float()).to(key.dtype)  # float32, as diffusers' processor
        if rotary_emb is not None:
            cos, sin = rotary_emb
            key = _rotate(key, cos.to(key.dtype), sin.to(key.dtype))
        # (B, N, heads, d) -> (B, heads, N, d)
        key, value = key.transpose(1, 2), value.transpose(1, 2)
        pending = None
        if mode == "gather":
            pending = start_kv_gather(key, value, group, tokens)
            if not overlap_enabled():
                pending.wait()
        query = self.to_q(x_q).unflatten(2, (heads, -1))
        query = self.norm_q(query.float()).to(query.dtype)
        if rotary_emb is not None:
            query = _rotate(query, cos.to(query.dtype), sin.to(query.dtype))
        query = query.transpose(1, 2)
        if pending is not None:
            out = pending.attend(query)
        else:
            out = ring_sdpa(query, key, value, group, tokens)
        # (B, heads, N, d) -> (B, N, heads d)
        out = out.transpose(1, 2).flatten(2, 3)
        return self.to_out[0](out)

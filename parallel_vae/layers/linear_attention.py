"""ReLU linear attention over pixels whose rows are split across ranks: all-reduced key-value summaries.

Linear attention (EfficientViT, DC-AE's ``SanaMultiscaleLinearAttention``) never forms a score matrix. With
queries, keys and values laid out (B, heads, d, N) over N pixels, and keys and queries already through a ReLU,

    out[:, n] = (V K^T) q_n / ((sum_m k_m) . q_n + eps)

so every query needs the whole image only through two summaries over the pixels: ``V K^T`` (d x d) and K's sum
over the pixels (d). diffusers computes both at once by padding V with a row of ones, ``[V; 1] K^T`` ((d + 1) x d,
its last row is K's sum). Each rank here forms that (d + 1) x d product over its own pixels and the group sums
it (one all-reduce of a few KB per block), then applies it to its own queries, exactly as the unsharded layer does
with its whole-image summary. Nothing grows with the image: no key or value leaves its rank.

The all-reduce's backward is an all-reduce too. Each rank's loss reads the summed summary through its own queries
only, so the gradient of the total loss with respect to the summary is the sum of the ranks' gradients, and that is
the gradient of every rank's own part (a sum's partial derivative is 1 in each term).

The file reads as comm.py does: the private collective, the autograd Function named for its forward, the public
wrappers. ``ShardedMultiscaleLinearAttention`` installs it on diffusers' layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import SanaMultiscaleAttnProcessor2_0

from ..core.comm import _all_reduce_sum, group_size

__all__ = [
    "all_reduce_summaries",
    "linear_attention_summaries",
    "sharded_linear_attention",
    "ShardedMultiscaleLinearAttention",
]


# ---------------------------------------------------------------------------------------------------------------
# Section 1: private collective
# ---------------------------------------------------------------------------------------------------------------


def _sum_over_group(t: torch.Tensor, group) -> torch.Tensor:
    """A new tensor: ``t`` summed over the group, in ``t``'s dtype.

    The transport is float64 whatever ``t``'s dtype: ranks can reach the sum in different dtypes (diffusers picks
    linear or quadratic attention from the shard's pixel count, and the two branches compute in different dtypes
    for float64 models), and a collective needs the same dtype on every rank. The summaries are (d + 1) x d per
    head, so the wider transport costs nothing."""
    buf = t.detach().to(torch.float64, copy=True).contiguous()
    _all_reduce_sum(buf, group)
    return buf.to(t.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Section 2: autograd Function
# ---------------------------------------------------------------------------------------------------------------


class _AllReduceSummaries(torch.autograd.Function):
    """forward: sum the ranks' partial summaries; backward: sum the ranks' gradients of the summed summary."""

    @staticmethod
    def forward(ctx, partial, group):
        ctx.group = group
        return _sum_over_group(partial, group)

    @staticmethod
    def backward(ctx, grad):
        return _sum_over_group(grad, ctx.group), None


# ---------------------------------------------------------------------------------------------------------------
# Section 3: public wrappers
# ---------------------------------------------------------------------------------------------------------------


def all_reduce_summaries(partial: torch.Tensor, group=None) -> torch.Tensor:
    """forward: the sum of every rank's ``partial`` (same shape everywhere); backward: the sum of every rank's
    gradient of that sum (all-reduce both ways)."""
    if group_size(group) == 1:
        return partial
    return _AllReduceSummaries.apply(partial, group)


def linear_attention_summaries(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, h, d, N) keys and values -> (B, h, d_v + 1, d): ``[V; 1] K^T`` over these N pixels; the last row is K's
    sum over them (the denominator's summary), as diffusers' ``apply_linear_attention`` pads V with ones."""
    # (B, h, d_v, N) -> (B, h, d_v + 1, N): a row of ones below the values
    v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1)
    return torch.matmul(v, k.transpose(-1, -2))


def sharded_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, group=None) -> torch.Tensor:
    """forward: ReLU linear attention of my queries against the keys and values of every rank's pixels,
    ``(V K^T) q / ((sum K) . q + eps)`` with both summaries summed over ``group``; backward: exact, the summaries'
    gradients all-reduced.

    ``q``, ``k``, ``v``: (B, heads, d, N_r) over this rank's N_r pixels (N_r may differ between ranks), keys and
    queries already non-negative. Returns (B, heads, d_v, N_r) in ``q``'s dtype; computes in ``q``'s dtype (cast
    the inputs first for another one). With one rank this is diffusers' ``apply_linear_attention``, op for op."""
    summaries = all_reduce_summaries(linear_attention_summaries(k, v), group)
    # (B, h, d_v + 1, d) @ (B, h, d, N_r) -> (B, h, d_v + 1, N_r): numerators, then the denominator row
    out = torch.matmul(summaries, q)
    return out[:, :, :-1] / (out[:, :, -1:] + eps)


class ShardedMultiscaleLinearAttention:
    """diffusers ``SanaMultiscaleLinearAttention`` (DC-AE's EfficientViT blocks) on row shards; installed by class
    swap (see :mod:`.plan`).

    diffusers' own processor runs unchanged: the q/k/v projections, the multi-scale depthwise convolutions (their
    own modules, which the family's plan makes halo convolutions), the float32 cast, the ReLUs, the output
    projection, the norm and the residual. Only the two methods through which it reaches across pixels are
    replaced, and both compute the same thing from all-reduced summaries:

    * ``apply_linear_attention`` receives the processor's float32 (or wider) q/k/v and returns that dtype;
    * ``apply_quadratic_attention``, which diffusers calls when the tensor's pixel count is at most the head dim,
      computes ``V (K^T Q) / (sum K^T Q + eps)``: the same quantity, by associativity. It runs here in float32 or
      wider (diffusers normalizes the scores in float32) and returns the values' dtype, as diffusers does.

    The processor chooses the branch from the *shard's* pixel count, so ranks of one image may take different
    branches; both call the same collective, so they pair up, and the results agree up to rounding.
    """

    _pv_state = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if type(self.processor) is not SanaMultiscaleAttnProcessor2_0:
            raise NotImplementedError(
                f"parallel_vae shards SanaMultiscaleLinearAttention with its default processor only; "
                f"got {type(self.processor).__name__}"
            )
        return self.processor(self, hidden_states)

    def apply_linear_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return sharded_linear_attention(query, key, value, self.eps, self._pv_state.group)

    def apply_quadratic_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(query.dtype, torch.float32)
        out = sharded_linear_attention(query.to(dt), key.to(dt), value.to(dt), self.eps, self._pv_state.group)
        return out.to(value.dtype)

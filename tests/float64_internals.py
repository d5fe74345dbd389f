"""Float64 tests compute in float64 where diffusers computes in float32 inside a float64 model: in the reference
and on every rank alike.

Wan's ``WanUpsample`` and Qwen-Image's ``QwenImageUpsample`` (the nearest-exact 2x before every decoder upsample
conv) run ``nn.Upsample`` on ``x.float()`` and cast the result back. In a float64 model the forward therefore
rounds the activations to float32, and the backward rounds the incoming gradient to float32 and sums each 2x2 block
in float32. That rounding is per element, the same on a row shard as on the whole frame, but it is not continuous:
two float64 values a rounding error apart (what any correct re-association gives, e.g. the parallel model's
corrected halo convolutions, gathers and reduce-scatters) round to the same float32 value almost always, and to
two adjacent ones when they straddle a float32 rounding midpoint. That element then jumps by one float32 ulp
(6e-8 of its value), and so does everything computed from it, up to every parameter before that upsample.

Measured on the unmodified float64 Wan2.2 model (base_dim 8, z_dim 8, 5 frames of 112 x 80): moving one element of
the gradient that enters the lowest-resolution upsample by 2 float64 ulps, across a float32 midpoint, moves the
parameter gradients by 6.5e-9 of their largest value (decoder mid block, up_blocks.0 resnets, conv_in); with the
upsample in float64 the same move gives 9e-16. Runs whose gradients differ by rounding land on such a straddle
rarely (6 runs of the unmodified model with its input scaled by 1 + 1e-15: one element crossed, a small one) and
on a large element more rarely still; when a parallel run does, the parity check reads ~1e-9 against a reference
that is itself only continuous to that level, with nothing wrong in the sharding. ``test_parity.test_float64_upsample_is_float32_inside``
keeps the premise checked: if diffusers computes these in the model's dtype one day, it fails and this can go.

Only the float64 cases use this; float32 cases run diffusers' own code (the casts are no-ops there).
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageUpsample
from diffusers.models.autoencoders.autoencoder_kl_qwenimage21 import QwenImage21Upsample
from diffusers.models.autoencoders.autoencoder_kl_wan import WanUpsample
from diffusers.models.autoencoders.ltx2_diffusion_decoder import LTX2VideoVaeRotaryPosEmbed3D

__all__ = ["FLOAT32_UPSAMPLES", "float64_internals"]

# diffusers classes whose forward is ``nn.Upsample.forward(self, x.float()).type_as(x)``
FLOAT32_UPSAMPLES = (WanUpsample, QwenImageUpsample, QwenImage21Upsample)


def float64_internals(model: nn.Module) -> nn.Module:
    """In place: every float32-inside upsample of ``model`` (``model`` itself included) computes in its input's
    dtype instead (``nn.Upsample.forward`` on ``x``, no cast). Returns ``model``. A bound method, so deep copies
    (EMA twins) keep it, each on its own module."""
    for m in model.modules():
        if type(m) in FLOAT32_UPSAMPLES:
            m.forward = types.MethodType(nn.Upsample.forward, m)
        if type(m) in FLOAT32_ROTARIES:
            m._rotate_axis = types.MethodType(_rotate_axis_in_input_dtype, m)
    return model


# diffusers classes whose rotation rounds its input to float32 and back (LTX-2.5's diffusion decoder's 3-D RoPE):
# ``_rotate_axis`` casts the pairs with ``.float()``, so a float64 model's queries and keys, and their gradients,
# are rounded to float32 there; and its float32 ``cos``/``sin`` round differently with the angle tensor's length
# (a row shard's vs the whole height's).
FLOAT32_ROTARIES = (LTX2VideoVaeRotaryPosEmbed3D,)


def _rotate_axis_in_input_dtype(self, x, positions, inv_freqs, axis):
    """``LTX2VideoVaeRotaryPosEmbed3D._rotate_axis`` in ``x``'s dtype: the same float32 angles (positions x inverse
    frequencies, exactly rounded per element), their cos/sin and the rotation in ``x``'s dtype, no cast of ``x``."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    shape = [1, 1, 1, 1, 1, inv_freqs.shape[0]]
    shape[axis] = positions.shape[0]
    angles = (positions[:, None] * inv_freqs[None, :]).reshape(shape).to(x.dtype)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).reshape(x.shape)


def float64_internals_if(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """:func:`float64_internals` for a float64 model; any other dtype unchanged."""
    return float64_internals(model) if dtype == torch.float64 else model

"""The LTX-2.5 diffusion decoder wiring: diffusers ``LTX2VideoDiffusionDecoderModel``.

A decoder only (no encoder; LTX-2's ``AutoencoderKLLTX2Video`` encodes into the same latent space). Stages 1-4 turn
the latent (B, 128, T, H, W) into a channels-last context volume: a per-token ``Linear``, then neighbourhood-attention
blocks (RMSNorm, neighbourhood attention with 3-D RoPE, SwiGLU) and channels-last pixel-shuffle upsamplers, 32x
in rows overall (4 from the stage-5 patch). Stage 5 denoises patchified pixel noise conditioned on that context
through AdaLN-Zero modulation from a timestep embedding; the released model runs one x0 step.

| module | treatment | why |
| --- | --- | --- |
| ``LTX2VideoVaeNeighborhoodAttention`` (every block) | ``ShardedNeighborhoodAttention`` (``layers/neighborhood_attention.py``) | windowed attention whose reach is ``kh // 2`` rows (up to ``kh - 1`` at the global top and bottom, where the window shifts inward): own queries against the key/value rows of their windows from the ranks that own them, one all-to-all, any reach |
| ``LTX2VideoVaeRotaryPosEmbed3D`` | ``ShardedRotaryPosEmbed3D`` | rotates by the global row positions (float32 angles of the whole height, narrowed) |
| ``LTX2VideoDiffusionDecoder3d`` | ``ShardedDiffusionDecoder`` | draws the starting noise ``x_t`` over the whole pixel canvas as diffusers does; each rank denoises its rows of group rank 0's canvas (``layers.ltx_noise.canvas_noise``) |
| ``LTX2VideoVaeNABlock``, ``LTX2VideoVaeDiffusionNABlock``, ``nn.ModuleList`` | containers | residual adds; the modulation is per channel and sample, ``context_proj`` per token |
| ``LTX2VideoVaePixelShuffleUpsampler`` (row stride 1 or 2; a temporal stride 2 drops the leading frame) | local | output row j reads input row j // s: shards start on latent rows, so row groups never straddle ranks; time is never split |
| the trailing ghost frames, their crop, patchify / unpatchify (``patch_size`` 4) | local (in the decoder's forward) | time is whole; a latent row is 32 pixel rows |
| ``LTX2VideoVaeSwiGLU`` (tiles of 16384 tokens), ``nn.Linear``, ``nn.RMSNorm`` (over channels, or a head's channels) | local | per token |
| ``LTX2VideoVaeAdaLNZero``, ``PixArtAlphaCombinedTimestepSizeEmbeddings``, ``Timesteps``, ``TimestepEmbedding``, SiLU, dropout | local | per sample: no rows |

**The decode call.** ``decode(z, generator=None, num_inference_steps=None, return_dict=True)`` is the class's own
signature and what parallel_vae takes (replicated ``vae.decode`` and ``pv.sharded_decode(vae, z_local, generator=...,
num_inference_steps=...)``). The timesteps are not an argument: ``denoise`` derives them from the step count
(``linspace(1, 1/n, n)``), identically on every rank, and the timestep embedding and modulation are per sample, so
each rank computes them in full (they have no rows). The noise is the one input with rows: the unmodified model draws
``randn_tensor((B, 3, F, 32H, 32W), generator)`` once per decode, and the parallel model draws the same canvas on
every rank (so generators advance alike) and denoises its own rows of rank 0's. With the same seeded generator, the
parallel decode is the unmodified one, row for row; with per-rank generators it is still one consistent field. The
multi-step Euler updates are per pixel. There is no ``_decode`` in this class, so parallel_vae installs its
replicated decode as ``decode`` (``FamilyAdapter.decode_method``); encoding raises.

Diffusers' default processor is FlexAttention (a ``BlockMask`` built from the window rule); on CPU it runs eagerly
and has no backward. The NATTEN processor fetches NATTEN's kernels from the Hub (GPU only). The sharded attention
computes the same windows with SDPA and a per-block mask for either processor.
"""

from __future__ import annotations

import math
from typing import Optional

import torch.nn as nn
from diffusers.models.autoencoders import ltx2_diffusion_decoder as ldd
from diffusers.models.embeddings import PixArtAlphaCombinedTimestepSizeEmbeddings, TimestepEmbedding, Timesteps

from ..core.plan import SpatialState, Treatment, classify, original_class, sharded_class, unknown_module
from ..layers.ltx_noise import canvas_noise
from ..layers.neighborhood_attention import ShardedNeighborhoodAttention, ShardedRotaryPosEmbed3D
from .base import FamilyAdapter
from .ltx import _stats

__all__ = ["LTX2DiffusionDecoderAdapter", "ShardedDiffusionDecoder", "ADAPTER"]


class ShardedDiffusionDecoder:
    """``LTX2VideoDiffusionDecoder3d`` on row shards: its own stages and ``denoise``, with the starting noise this
    rank's rows of the whole canvas's (``canvas_noise``), not a canvas of the shard's size."""

    _pv_state: SpatialState

    def forward(self, hidden_states, generator=None, num_inference_steps: Optional[int] = None):
        num_inference_steps = num_inference_steps or self.default_num_inference_steps
        latent_context = self.forward_stage_4(self.forward_stages_1_to_3(hidden_states))
        rows = latent_context.shape[2] * self.patch_size
        group = self._pv_state.group
        sizes = self._pv_state.level_sizes(rows)
        if sizes is None:
            from ..core.comm import all_gather_sizes

            sizes = all_gather_sizes(rows, group, hidden_states.device)
        shape = (
            hidden_states.shape[0], self.out_channels, latent_context.shape[1], sum(sizes),
            latent_context.shape[3] * self.patch_size,
        )  # fmt: skip
        x_t = canvas_noise(
            shape, rows, group, sizes=sizes, generator=generator, device=hidden_states.device, dtype=hidden_states.dtype
        )
        return self.denoise(latent_context, x_t, num_inference_steps)


_CONTAINERS = (nn.ModuleList, ldd.LTX2VideoVaeNABlock, ldd.LTX2VideoVaeDiffusionNABlock)
_LOCAL = (
    ldd.LTX2VideoVaeSwiGLU,  # per token (tiles of tokens)
    ldd.LTX2VideoVaeAdaLNZero,  # per sample
    ldd.LTX2VideoVaePixelShuffleUpsampler,  # row stride checked in the plan
    nn.Linear,
    nn.SiLU,
    nn.Dropout,
    PixArtAlphaCombinedTimestepSizeEmbeddings,
    Timesteps,
    TimestepEmbedding,
)
_PROCESSORS = (ldd.LTX2VideoVaeNeighborhoodAttnProcessor, ldd.LTX2VideoVaeNeighborhoodNattenProcessor)


def _treat(name: str, m: nn.Module, parents: dict) -> Optional[Treatment]:
    cls = original_class(m)
    if cls is ldd.LTX2VideoVaeNeighborhoodAttention:
        if type(m.processor) not in _PROCESSORS:
            raise unknown_module(name, m, f"attention processor {type(m.processor).__name__}")
        if len(m.kernel_size) != 3:
            raise unknown_module(name, m, f"kernel {m.kernel_size!r}")
        why = f"neighbourhood attention, kernel {tuple(m.kernel_size)}: the key/value rows of the windows"
        return Treatment(name, sharded_class(ShardedNeighborhoodAttention, cls), why)
    if cls is ldd.LTX2VideoVaeRotaryPosEmbed3D:
        return Treatment(name, sharded_class(ShardedRotaryPosEmbed3D, cls), "rotary positions: global rows")
    if cls is ldd.LTX2VideoDiffusionDecoder3d:
        return Treatment(name, sharded_class(ShardedDiffusionDecoder, cls), "starting noise: the whole canvas's rows")
    if cls is nn.RMSNorm:
        if len(m.normalized_shape) != 1:
            raise unknown_module(name, m, f"normalized over {m.normalized_shape!r}")
        return None  # over the channels of a token (or of one head)
    raise unknown_module(name, m)


class LTX2DiffusionDecoderAdapter(FamilyAdapter):
    name = "ltx2diffusion"
    model_class = ldd.LTX2VideoDiffusionDecoderModel
    video = True
    decode_method = "decode"
    has_encoder = False

    def plan(self, vae):
        self.spatial_factor(vae)
        for up in vae.decoder.upsamples:
            if up.stride[1] not in (1, 2):
                raise unknown_module("decoder.upsamples", up, f"row stride {up.stride[1]}")
        return classify(vae, _CONTAINERS, _LOCAL, _treat)

    def spatial_factor(self, vae) -> int:
        """The upsamplers' row strides x the stage-5 patch: 32 in the released config, checked against
        ``spatial_compression_ratio``."""
        dec = vae.decoder
        factor = math.prod(int(up.stride[1]) for up in dec.upsamples) * int(dec.patch_size)
        widths = math.prod(int(up.stride[2]) for up in dec.upsamples) * int(dec.patch_size)
        ratio = vae.config.spatial_compression_ratio
        if factor != widths or (ratio is not None and int(ratio) != factor):
            raise NotImplementedError(
                f"LTX2VideoDiffusionDecoderModel: its upsamplers expand rows {factor}x and columns {widths}x, and "
                f"spatial_compression_ratio is {ratio}; parallel_vae cannot derive its rows per latent row"
            )
        return factor

    def temporal_factor(self, vae) -> int:
        return int(vae.config.temporal_compression_ratio)

    def latent_channels(self, vae) -> int:
        return int(vae.config.latent_channels)

    def pixel_channels(self, vae) -> int:
        return int(vae.config.out_channels)

    def _no_encoder(self):
        return NotImplementedError(
            "LTX2VideoDiffusionDecoderModel is a decoder only (diffusers gives it no encoder): encode with "
            "AutoencoderKLLTX2Video, whose latents it decodes"
        )

    def call_args(self, vae, method: str, args: tuple, kwargs: dict):
        if method == "_encode":
            raise self._no_encoder()
        return super().call_args(vae, method, args, kwargs)

    def encode_local(self, vae, x, **extra):
        raise self._no_encoder()

    def decode_local(self, vae, z, **extra):
        """The class's decoder on this rank's latent rows (``decode`` without tiling: ``self.decoder(z, ...)``)."""
        return vae.decoder(z, **extra)

    def frames_at_stages(self, vae, frames: int) -> list[int]:
        """Frames each neighbourhood-attention stage sees (stages 1-4, then 5) for ``frames`` latent frames:
        diffusers' frame arithmetic (trailing ghost frames, the upsamplers' causal 1-then-2 mapping, the crop)."""
        dec = vae.decoder
        t = frames + dec.trailing_pad_latent_frames
        out = []
        for up in dec.upsamples:
            out.append(t)
            t = t * int(up.stride[0]) - (1 if int(up.stride[0]) == 2 else 0)
        out.append(t - dec.trailing_pad_latent_frames * dec.temporal_compression_ratio)
        return out

    def check_frames(self, vae, frames: int, latent: bool) -> Optional[str]:
        if not latent:
            return str(self._no_encoder())
        if frames < 1:
            return f"decode needs at least one latent frame (dim 2), got {frames}"
        kernels = [tuple(k) for k in vae.config.decoder_stage_kernels] + [tuple(vae.config.decoder_stage5_kernel)]
        for stage, (t, k) in enumerate(zip(self.frames_at_stages(vae, frames), kernels), 1):
            if t < k[0]:
                return (
                    f"LTX2VideoDiffusionDecoderModel cannot decode {frames} latent frames: stage {stage} sees {t} "
                    f"frames, fewer than its neighbourhood kernel's {k[0]}"
                )
        return None

    def denormalize(self, vae, z):
        """The LTX-2 pipelines' ``z * latents_std / scaling_factor + latents_mean`` (the model's buffers)."""
        mean, std = _stats(vae, z)
        return z * std / float(vae.config.scaling_factor) + mean

    def normalize(self, vae, z):
        mean, std = _stats(vae, z)
        return (z - mean) * float(vae.config.scaling_factor) / std


ADAPTER = LTX2DiffusionDecoderAdapter()

"""The Qwen-Image 2.1 wiring: diffusers ``AutoencoderKLQwenImage21``.

Wan2.2's residual architecture (``is_residual=True``: ``AvgDown3D`` / ``DupUp3D`` channel shortcuts around every
down and up block) specialized to images: every "causal 3-D conv" is an ``nn.Conv2d`` on the squeezed single frame
(``QwenImage21CausalConv3d``), which refuses a frame cache, so the model encodes and decodes exactly one frame,
(B, 4, 1, H, W) with 16x spatial compression in the released config. The rest is Wan's, line for line (channel RMS
norms, per-frame single-head mid-block attention, ``ZeroPad2d`` + stride-2 downsampling, nearest-exact upsampling).

| module | treatment |
| --- | --- |
| ``QwenImage21CausalConv3d`` with a 3-row kernel (conv_in/out, resnet conv1/conv2) | ``HaloFrameConv2d``: one halo row each side; zeros at the global edges (the layer's own ``F.pad``) |
| ``QwenImage21CausalConv3d`` 1x1 (quant convs, conv_shortcut, ``time_conv``) | local |
| ``QwenImage21Resample`` upsample ``Conv2d(3, padding=1)`` | ``HaloConv`` (the nearest-exact 2x before it is local) |
| ``QwenImage21Resample`` downsample ``ZeroPad2d((0, 1, 0, 1))`` | ``HaloZeroPad2d``; the stride-2 conv after it is then local |
| ``QwenImage21AttentionBlock`` (mid blocks) | ``ShardedFrameAttention``: own queries against all-gathered keys/values |
| ``QwenImage21AvgDown3D`` / ``QwenImage21DupUp3D`` (2x2 space-to-channel shortcuts) | local: shards start on even rows at every level |
| ``QwenImage21RMS_norm``, ``QwenImage21Upsample`` (nearest-exact 2x), SiLU, dropout | local |

Frames: diffusers' ``_encode`` runs chunks of 1, 4, 4, ... frames and ``_decode`` one latent frame at a time; every
chunk after the first hands the convs a frame cache, which ``QwenImage21CausalConv3d`` refuses (ValueError), and a
first chunk of 2-4 pixel frames is cut to its first frame. So parallel_vae takes exactly one frame each way and
refuses any other count before a layer runs.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn
from diffusers.models.autoencoders import autoencoder_kl_qwenimage21 as q21

from ..core.plan import Treatment, classify, original_class, sharded_class, unknown_module
from ..layers.frame_conv2d import HaloFrameConv2d
from .wan import _MODES, CausalCacheAdapter, causal_vae_treatment, check_resample_modes

__all__ = ["QwenImage21Adapter", "ADAPTER"]

_LOCAL = (
    q21.QwenImage21RMS_norm,
    # nearest-exact 2x, float32 inside as Wan's (see wan.py); row j reads row j // 2
    q21.QwenImage21Upsample,
    q21.QwenImage21AvgDown3D,  # 2x2 spatial blocks (and frame pairs); shards start on even rows
    q21.QwenImage21DupUp3D,
    nn.SiLU,
    nn.Dropout,
    nn.Identity,
)
_CONTAINERS = (
    nn.Sequential,
    nn.ModuleList,
    q21.QwenImage21Encoder3d,
    q21.QwenImage21Decoder3d,
    q21.QwenImage21MidBlock,
    q21.QwenImage21ResidualBlock,
    q21.QwenImage21Resample,
    q21.QwenImage21UpBlock,
    q21.QwenImage21ResidualUpBlock,
    q21.QwenImage21ResidualDownBlock,
)


def _frame_conv(name: str, m: nn.Module) -> Optional[Treatment]:
    """``QwenImage21CausalConv3d``: ``_padding`` = (w, w, h, h) zeros, the conv's own padding 0."""
    wl, wr, top, bottom = m._padding
    kh, sh, dh = m.kernel_size[0], m.stride[0], m.dilation[0]
    if tuple(m.padding) != (0, 0) or m.padding_mode != "zeros" or wl != wr:
        raise unknown_module(name, m, f"padding {m.padding!r} / {m.padding_mode!r}, _padding {m._padding!r}")
    if kh == 1 and sh == 1 and top == bottom == 0:
        return None  # 1x1: per pixel
    if kh == 2 * top + 1 and top == bottom and sh == 1 and dh == 1:
        return Treatment(name, sharded_class(HaloFrameConv2d, original_class(m)), f"{kh}-row conv: halo rows")
    raise unknown_module(name, m, f"row kernel {kh}, stride {sh}, dilation {dh}, row padding {top}/{bottom}")


def _treat(name: str, m: nn.Module, parents: dict) -> Optional[Treatment]:
    if original_class(m) is q21.QwenImage21CausalConv3d:
        return _frame_conv(name, m)
    return causal_vae_treatment(
        name, m, parents, causal_conv=q21.QwenImage21CausalConv3d, attention=q21.QwenImage21AttentionBlock,
        resample=q21.QwenImage21Resample, modes=_MODES,
    )


class QwenImage21Adapter(CausalCacheAdapter):
    name = "qwenimage21"
    model_class = q21.AutoencoderKLQwenImage21
    causal_conv, attention, resample = q21.QwenImage21CausalConv3d, q21.QwenImage21AttentionBlock, q21.QwenImage21Resample
    local, containers = _LOCAL, _CONTAINERS

    def plan(self, vae):
        check_resample_modes(vae, self.resample)
        self.spatial_factor(vae)  # a config whose scale factor disagrees with its layers is refused here
        return classify(vae, self.containers, self.local, _treat)

    def spatial_factor(self, vae) -> int:
        """2**(number of spatial downsamples) x patch size: 16 in the released config, checked against
        ``scale_factor_spatial``, which diffusers' own tiling reads."""
        cfg = vae.config
        factor = 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)
        if cfg.scale_factor_spatial is not None and factor != cfg.scale_factor_spatial:
            raise NotImplementedError(
                f"AutoencoderKLQwenImage21: {len(cfg.dim_mult) - 1} downsamples x patch {cfg.patch_size or 1} = "
                f"{factor} pixel rows per latent row, but scale_factor_spatial is {cfg.scale_factor_spatial}"
            )
        return factor

    def temporal_factor(self, vae) -> int:
        return 2 ** sum(bool(t) for t in vae.temperal_downsample)

    def pixel_channels(self, vae) -> int:
        p = vae.config.patch_size or 1
        return int(vae.config.in_channels) // (p * p)

    def progress_total(self, vae, x, decode: bool) -> int:
        return 1

    def check_frames(self, vae, frames: int, latent: bool) -> Optional[str]:
        if frames == 1:
            return None
        what = "latent frame" if latent else "pixel frame"
        return (
            f"AutoencoderKLQwenImage21 {'decodes' if latent else 'encodes'} exactly one {what} (dim 2), got {frames}: "
            f"its QwenImage21CausalConv3d is a 2-D conv that takes no frame cache, so diffusers raises at a second "
            f"chunk" + ("" if latent else " and cuts a first chunk of 2-4 frames to its first frame")
        )


ADAPTER = QwenImage21Adapter()

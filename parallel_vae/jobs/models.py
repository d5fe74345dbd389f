"""Seeded ``AutoencoderKLWan`` models of the real Wan2.1 and Wan2.2 layouts at any channel width.

No model hub is needed: the architecture (block structure, attention, downsample/upsample kinds, residual
variant, patch size) is the real one; only ``base_dim`` / ``z_dim`` are chosen small for tests and demos.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanAttentionBlock,
    WanCausalConv3d,
    WanResample,
    WanResidualBlock,
)
from diffusers.utils import logging as diffusers_logging

# Real configs (diffusers' Wan-AI/Wan2.1-T2V-*-Diffusers and Wan2.2-TI2V-5B-Diffusers vae/config.json).
WAN21_CONFIG = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    is_residual=False,
    in_channels=3,
    out_channels=3,
    patch_size=None,
    scale_factor_temporal=4,
    scale_factor_spatial=8,
)
WAN22_CONFIG = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_temporal=4,
    scale_factor_spatial=16,
    # Per-channel latent statistics of the released Wan2.2 VAE (the official Wan2_2_VAE constants; diffusers'
    # defaults are Wan2.1's 16 values, wrong for z_dim 48).
    latents_mean=[
        -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
        0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
        -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
        -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
    ],
    latents_std=[
        0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
        0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
        0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
        0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
    ],
)  # fmt: skip
LAYOUTS = {"wan2.1": WAN21_CONFIG, "wan2.2": WAN22_CONFIG}


def wan_config(layout: str = "wan2.1", *, base_dim: Optional[int] = None, z_dim: Optional[int] = None) -> dict:
    """The diffusers config of ``layout`` ("wan2.1" or "wan2.2"), optionally at a smaller width.

    For Wan2.2 the decoder keeps the real ratio decoder_base_dim / base_dim = 256 / 160 (rounded to a multiple of
    4, which its DupUp3D channel grouping needs).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    cfg = dict(LAYOUTS[layout])
    if base_dim is not None:
        if layout == "wan2.2":
            cfg["decoder_base_dim"] = max(4, round(base_dim * 256 / 160 / 4) * 4)
        cfg["base_dim"] = base_dim
    if z_dim is not None:
        cfg["z_dim"] = z_dim
    # Pipelines normalize latents with per-channel statistics; keep them the right length (identity at test widths).
    if cfg["z_dim"] != LAYOUTS[layout]["z_dim"]:
        cfg["latents_mean"] = [0.0] * cfg["z_dim"]
        cfg["latents_std"] = [1.0] * cfg["z_dim"]
    return cfg


def build_wan_vae(
    layout: str = "wan2.1",
    *,
    base_dim: Optional[int] = None,
    z_dim: Optional[int] = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    perturb: float = 0.0,
    init: str = "pytorch",
) -> AutoencoderKLWan:
    """A seeded ``AutoencoderKLWan`` of ``layout``; identical weights in every process for the same arguments.

    ``perturb`` adds seeded uniform noise of that amplitude to every parameter, so that unit norm scales and zero
    biases do not hide mistakes in tests (a gradient that only matches when gamma == 1 is not checked).

    ``init``: ``"pytorch"`` keeps the modules' own initialization (what the tests use). ``"zero_residual"`` is for
    training from scratch: every bias is zeroed and so is the last layer of every residual branch (each residual
    block's ``conv2`` and each attention block's ``proj``), so every block starts as the identity. Measured on
    the synthetic data (base_dim 12, 32x32x5 clips, batch 8, 400 AdamW steps): with PyTorch's init the encoder's
    output barely depends on its input (its spread across clips is 0.01-0.1 of its spread over positions, mostly
    bias and border patterns) and the decoder learns the dataset's mean colour and stays there; with this init
    the latents differ between clips within 100 steps and held-out PSNR is 15.8 dB instead of 14.4 dB.
    """
    if init not in ("pytorch", "zero_residual"):
        raise ValueError(f"init must be 'pytorch' or 'zero_residual', got {init!r}")
    cfg = wan_config(layout, base_dim=base_dim, z_dim=z_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**cfg)
        if init == "zero_residual":
            _zero_residual_init(vae)
        if perturb:
            with torch.no_grad():
                for p in vae.parameters():
                    p.add_(torch.rand_like(p).sub_(0.5).mul_(2 * perturb))
    return cast_quietly(vae, dtype).eval()


def _zero_residual_init(vae: AutoencoderKLWan) -> None:
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith("bias"):
                param.zero_()
        for module in vae.modules():
            if isinstance(module, WanResidualBlock):
                module.conv2.weight.zero_()
            elif isinstance(module, WanAttentionBlock):
                module.proj.weight.zero_()


def temporal_resampling_convs(vae: AutoencoderKLWan) -> list:
    """The ``time_conv`` of every ``downsample3d`` / ``upsample3d`` resampler: the convolutions that only run from a
    clip's second temporal chunk on, so single frames never reach them."""
    return [m.time_conv for m in vae.modules() if isinstance(m, WanResample) and hasattr(m, "time_conv")]


@torch.no_grad()
def inflate_temporal(vae: AutoencoderKLWan) -> AutoencoderKLWan:
    """Turn a VAE trained on single frames into the per-frame starting point of video training, in place.

    Wan's VAE was made this way (a 2D image VAE of the same structure, inflated to causal 3D): single frames are
    cheap to train on (one frame through the full-resolution layers instead of five or nine), but they train only
    the present-frame tap of each causal convolution (the past taps only ever see the causal zero padding) and
    never the temporal resampling convolutions. After this call:

    * every ``WanCausalConv3d`` with a temporal kernel keeps only its last (present-frame) tap; the past taps are 0;
    * every encoder ``downsample3d`` time convolution passes the latest frame of each pair through (identity on the
      last tap, zero bias), so latent frame ``k >= 1`` encodes frame ``4k``;
    * every decoder ``upsample3d`` time convolution writes its input to both output frames (identity into each half
      of its ``2 * C`` outputs), so frame ``4k`` is repeated over its chunk.

    The result reconstructs every frame of a clip as well as the single-frame model does on the frame it keeps,
    and video training then learns the temporal taps from there (checked exactly in tests). Returns ``vae``.

    Wan2.1 layouts only: Wan2.2's residual resampling (``is_residual``) adds parameter-free shortcuts that average
    and repeat frames in time, so no weight setting makes that model per-frame; it raises ``ValueError``.
    """
    if getattr(vae.config, "is_residual", False):
        raise ValueError("inflate_temporal needs a Wan2.1 layout (is_residual=False): Wan2.2's parameter-free "
                         "temporal shortcuts cannot be made per-frame")
    time_convs = temporal_resampling_convs(vae)
    skip = {id(conv) for conv in time_convs}
    for module in vae.modules():
        if isinstance(module, WanCausalConv3d) and module.weight.shape[2] > 1 and id(module) not in skip:
            module.weight[:, :, :-1].zero_()
    for conv in time_convs:
        out_ch, in_ch = conv.weight.shape[:2]
        eye = torch.eye(in_ch, dtype=conv.weight.dtype, device=conv.weight.device)
        conv.weight.zero_()
        for half in range(out_ch // in_ch):
            conv.weight[half * in_ch : (half + 1) * in_ch, :, -1, 0, 0] = eye
        if conv.bias is not None:
            conv.bias.zero_()
    return vae


def cast_quietly(vae: AutoencoderKLWan, dtype: torch.dtype) -> AutoencoderKLWan:
    """``vae.to(dtype)`` without diffusers' keep-in-fp32 warning, which it prints even when the list is empty
    (Wan has no keep-in-fp32 modules)."""
    if dtype == next(vae.parameters()).dtype:
        return vae
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return vae.to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------------------------
# Seeded models of every supported family (the real layouts; only the channel widths are small)
# ---------------------------------------------------------------------------------------------------------------

# The real configs (diffusers' defaults or the released checkpoints' vae/config.json), keyed by the layout name that
# recipes take in ``--seeded LAYOUT:...``. Each entry: (diffusers class name, config).
_KL_BLOCKS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    norm_num_groups=32,
)
SEEDED_LAYOUTS = {
    "wan2.1": ("AutoencoderKLWan", WAN21_CONFIG),
    "wan2.2": ("AutoencoderKLWan", WAN22_CONFIG),
    # Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux.1 differ in latent width, scaling/shift and quant convs.
    "sd": ("AutoencoderKL", dict(_KL_BLOCKS, latent_channels=4, sample_size=512, scaling_factor=0.18215)),
    "sdxl": ("AutoencoderKL", dict(_KL_BLOCKS, latent_channels=4, sample_size=1024, scaling_factor=0.13025)),
    "sd3": (
        "AutoencoderKL",
        dict(_KL_BLOCKS, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
             use_quant_conv=False, use_post_quant_conv=False),
    ),
    "flux1": (
        "AutoencoderKL",
        dict(_KL_BLOCKS, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
             use_quant_conv=False, use_post_quant_conv=False),
    ),
    "flux2": ("AutoencoderKLFlux2", dict(_KL_BLOCKS, latent_channels=32, sample_size=1024, patch_size=[2, 2])),
    "qwenimage": (
        "AutoencoderKLQwenImage",
        dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
             temperal_downsample=[False, True, True], dropout=0.0, input_channels=3),
    ),
    "hunyuanvideo": (
        "AutoencoderKLHunyuanVideo",
        dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=["HunyuanVideoDownBlock3D"] * 4,
             up_block_types=["HunyuanVideoUpBlock3D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
             act_fn="silu", norm_num_groups=32, scaling_factor=0.476986, spatial_compression_ratio=8,
             temporal_compression_ratio=4, mid_block_add_attention=True),
    ),
    "hunyuanvideo15": (
        "AutoencoderKLHunyuanVideo15",
        dict(in_channels=3, out_channels=3, latent_channels=32, block_out_channels=[128, 256, 512, 1024, 1024],
             layers_per_block=2, spatial_compression_ratio=16, temporal_compression_ratio=4,
             downsample_match_channel=True, upsample_match_channel=True, scaling_factor=1.03682),
    ),
    # THUDM/CogVideoX-2b vae/config.json (CogVideoX-5b's differs only in scaling_factor, 0.7)
    "cogvideox": (
        "AutoencoderKLCogVideoX",
        dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=["CogVideoXDownBlock3D"] * 4,
             up_block_types=["CogVideoXUpBlock3D"] * 4, block_out_channels=[128, 256, 256, 512], layers_per_block=3,
             act_fn="silu", norm_eps=1e-6, norm_num_groups=32, temporal_compression_ratio=4, sample_height=480,
             sample_width=720, scaling_factor=1.15258426, use_quant_conv=False, use_post_quant_conv=False),
    ),
    # DC-AE f32c32 as Sana uses it (mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers): 32x spatial, 32 latent channels,
    # ResBlocks at the three shallow levels, EfficientViT (multi-scale ReLU linear attention + GLUMBConv) at the three
    # deep ones, stride-2 conv downsampling and nearest-interpolate upsampling, both with channel shortcuts.
    "dcae": (
        "AutoencoderDC",
        dict(in_channels=3, latent_channels=32, attention_head_dim=32,
             encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
             decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
             encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
             decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
             encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
             encoder_qkv_multiscales=[[], [], [], [5], [5], [5]], decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
             upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
             decoder_act_fns="silu", scaling_factor=0.41407),
    ),
    # LTX-Video 0.9.0 (Lightricks/LTX-Video vae/config.json), which is also diffusers' default: stride-2 conv
    # downsamplers, no timestep conditioning, no decoder noise, zero padding; 32x spatial, 8x temporal.
    "ltxvideo": (
        "AutoencoderKLLTXVideo",
        dict(in_channels=3, out_channels=3, latent_channels=128, block_out_channels=[128, 256, 512, 512],
             decoder_block_out_channels=[128, 256, 512, 512], layers_per_block=[4, 3, 3, 3, 4],
             decoder_layers_per_block=[4, 3, 3, 3, 4], spatio_temporal_scaling=[True, True, True, False],
             decoder_spatio_temporal_scaling=[True, True, True, False],
             decoder_inject_noise=[False, False, False, False, False], upsample_residual=[False, False, False, False],
             upsample_factor=[1, 1, 1, 1], timestep_conditioning=False, patch_size=4, patch_size_t=1,
             resnet_norm_eps=1e-6, scaling_factor=1.0, encoder_causal=True, decoder_causal=False),
    ),
    # LTX-2 (diffusers' convert_ltx2_to_diffusers.py, version 2.0): spatial / temporal / spatiotemporal
    # space-to-depth downsamplers, residual depth-to-space upsamplers, reflect padding in the decoder.
    "ltx2": (
        "AutoencoderKLLTX2Video",
        dict(in_channels=3, out_channels=3, latent_channels=128, block_out_channels=[256, 512, 1024, 2048],
             down_block_types=["LTX2VideoDownBlock3D"] * 4, decoder_block_out_channels=[256, 512, 1024],
             layers_per_block=[4, 6, 6, 2, 2], decoder_layers_per_block=[5, 5, 5, 5],
             spatio_temporal_scaling=[True, True, True, True], decoder_spatio_temporal_scaling=[True, True, True],
             decoder_inject_noise=[False, False, False, False],
             downsample_type=["spatial", "temporal", "spatiotemporal", "spatiotemporal"],
             upsample_residual=[True, True, True], upsample_factor=[2, 2, 2], timestep_conditioning=False,
             patch_size=4, patch_size_t=1, resnet_norm_eps=1e-6, encoder_causal=True, decoder_causal=False,
             encoder_spatial_padding_mode="zeros", decoder_spatial_padding_mode="reflect",
             spatial_compression_ratio=32, temporal_compression_ratio=8),
    ),
    # Mochi-1 (genmo/mochi-1-preview vae/config.json; its latents_mean / latents_std are diffusers' defaults). The
    # encoder's 15 input channels are 3 pixel channels plus their Fourier features.
    "mochi": (
        "AutoencoderKLMochi",
        dict(in_channels=15, out_channels=3, encoder_block_out_channels=[64, 128, 256, 384],
             decoder_block_out_channels=[128, 256, 512, 768], latent_channels=12, layers_per_block=[3, 3, 4, 6, 3],
             act_fn="silu", temporal_expansions=[1, 2, 3], spatial_expansions=[2, 2, 2],
             add_attention_block=[False, True, True, True, True], scaling_factor=1.0),
    ),
    # Qwen-Image 2.1 (Qwen/Qwen-Image-2.1): diffusers' AutoencoderKLQwenImage21 defaults, which are that release's
    # vae config (the 64 latents_mean / latents_std are the class defaults, not repeated here). Images only: 4 pixel
    # channels, one frame, 16x spatial; decoder 1.5x the encoder's width.
    "qwenimage21": (
        "AutoencoderKLQwenImage21",
        dict(base_dim=96, decoder_base_dim=144, z_dim=64, dim_mult=[1, 2, 4, 8, 8], num_res_blocks=2, attn_scales=[],
             temperal_downsample=[False, True, True, True], dropout=0.0, is_residual=True, in_channels=4,
             out_channels=4, patch_size=None, scale_factor_temporal=8, scale_factor_spatial=16),
    ),
    # HunyuanImage-2.1 (hunyuanvideo-community/HunyuanImage-2.1-Diffusers): the vae config of diffusers' conversion
    # script (scripts/convert_hunyuan_image_to_diffusers.py). 32x spatial; GroupNorms fixed at 32 groups.
    "hunyuanimage": (
        "AutoencoderKLHunyuanImage",
        dict(in_channels=3, out_channels=3, latent_channels=64, block_out_channels=[128, 256, 512, 512, 1024, 1024],
             layers_per_block=2, spatial_compression_ratio=32, sample_size=384, scaling_factor=0.75289,
             downsample_match_channel=True, upsample_match_channel=True),
    ),
    # HunyuanImage-2.1 refiner (hunyuanvideo-community/HunyuanImage-2.1-Refiner-Diffusers): diffusers'
    # AutoencoderKLHunyuanImageRefiner defaults, written out. 16x spatial; every frame kept (see its adapter).
    "hunyuanimage_refiner": (
        "AutoencoderKLHunyuanImageRefiner",
        dict(in_channels=3, out_channels=3, latent_channels=32, block_out_channels=[128, 256, 512, 1024, 1024],
             layers_per_block=2, spatial_compression_ratio=16, temporal_compression_ratio=4,
             downsample_match_channel=True, upsample_match_channel=True, scaling_factor=1.03682),
    ),
    # Kandinsky KVAE 2-D (kandinskylab KVAE-2D-1.0): diffusers' AutoencoderKLKVAE defaults, written out. 8x spatial;
    # GroupNorms fixed at 32 groups; no latent scaling in the config.
    "kvae": (
        "AutoencoderKLKVAE",
        dict(in_channels=3, channels=128, num_enc_blocks=2, num_dec_blocks=2, z_channels=16, double_z=True,
             ch_mult=[1, 2, 4, 8], sample_size=1024),
    ),
    # Kandinsky 5 KVAE-Video (kandinskylab KVAE-3D-1.0): diffusers' AutoencoderKLKVAEVideo defaults, written out.
    # 8x spatial, 4x temporal; GroupNorms fixed at 32 groups; no latent scaling in the config.
    "kvae_video": (
        "AutoencoderKLKVAEVideo",
        dict(ch=128, ch_mult=[1, 2, 4, 8], num_res_blocks=2, in_channels=3, out_ch=3, z_channels=16,
             temporal_compress_times=4),
    ),
    # MiniMax-H3: diffusers' AutoencoderKLMiniMaxH3 defaults, which are the released checkpoint's config (the 24
    # latents_mean / latents_std are the class defaults, not repeated here). Causal CNN encoder, 16x spatial / 4x
    # temporal; ViT decoder of 36 blocks, 32 heads x 64, RoPE over 3/4 of each head; 17-frame encoder clips.
    "minimax_h3": (
        "AutoencoderKLMiniMaxH3",
        dict(in_channels=3, out_channels=3, latent_channels=24, block_out_channels=[128, 256, 256, 512, 512, 1024],
             layers_per_block=2, spatial_downsample_factors=[2, 2, 2, 2, 1, 1],
             temporal_downsample_factors=[1, 2, 2, 1, 1, 1], norm_num_groups=32, norm_eps=1e-6,
             spatial_padding_mode="reflect", decoder_num_layers=36, decoder_num_attention_heads=32,
             decoder_attention_head_dim=64, decoder_num_register_tokens=4, decoder_ffn_mult=4, decoder_rope_theta=100.0,
             decoder_rope_dim_ratio=0.75, decoder_norm_eps=1e-5, clip_length=17, token_drop=3),
    ),
    # LTX-2.5's diffusion decoder (LTX2VideoDiffusionDecoderModel): diffusers' defaults, which its conversion script
    # writes for the released model: stage widths 2048..256, neighbourhood kernels (3, 7, 7) / (3, 5, 5) and
    # (11, 11, 11) in the one-step x0 stage 5; 32x spatial, 8x temporal. ``width`` sets stage 5's channels.
    "ltx2diffusion": (
        "LTX2VideoDiffusionDecoderModel",
        dict(out_channels=3, latent_channels=128, patch_size=4, scaling_factor=1.0, decoder_head_dim=64,
             decoder_stage_channels=[2048, 1024, 512, 512, 256], decoder_stage_depths=[4, 6, 4, 2, 8],
             decoder_stage_kernels=[[3, 7, 7], [3, 7, 7], [3, 5, 5], [3, 5, 5]],
             decoder_upsample_strides=[[1, 2, 2], [2, 1, 1], [2, 2, 2], [2, 2, 2]],
             decoder_upsample_channel_reductions=[2, 2, 1, 2], decoder_stage5_kernel=[11, 11, 11],
             decoder_t_emb_dim=384, decoder_timestep_scale_multiplier=1000.0, decoder_model_output_type="x0",
             decoder_num_inference_steps=1, spatial_compression_ratio=32, temporal_compression_ratio=8),
    ),
    # Cosmos-1.0 tokenizer CV8x8x8 (nvidia/Cosmos-1.0-Diffusion-7B-Text2World vae/config.json = diffusers' defaults;
    # the 16 x 16 per-(channel, frame) latents_mean / latents_std are the class defaults, not repeated here): Haar
    # patching (patch 4), one spatiotemporal down/upsample, 8x spatial and temporal; decoder twice the width.
    "cosmos": (
        "AutoencoderKLCosmos",
        dict(in_channels=3, out_channels=3, latent_channels=16, encoder_block_out_channels=[128, 256, 512, 512],
             decode_block_out_channels=[256, 512, 512, 512], attention_resolutions=[32], resolution=1024,
             num_layers=2, patch_size=4, patch_type="haar", scaling_factor=1.0, spatial_compression_ratio=8,
             temporal_compression_ratio=8),
    ),
}  # fmt: skip
# Mochi's per-frame GroupNorms have 32 groups and its attention heads are 32 channels wide, both fixed in diffusers.
MOCHI_WIDTH_UNIT = 32
# Classes whose GroupNorms diffusers fixes at 32 groups: a seeded width rounds up to a multiple of 32.
GROUPS_32_CLASSES = ("AutoencoderKLHunyuanImage", "AutoencoderKLKVAE", "AutoencoderKLKVAEVideo")
# Kandinsky's KVAE classes name their base width "channels" (2-D) and "ch" (video) and their latents "z_channels".
_BASE_WIDTH_KEYS = ("channels", "ch")


def seeded_config(
    layout: str, width: Optional[int] = None, latent: Optional[int] = None, overrides: Optional[dict] = None
) -> tuple[str, dict]:
    """(diffusers class name, config) of ``layout`` at base channel width ``width`` and ``latent`` latent channels;
    ``overrides`` replace config entries last (fewer layers per block for fast tests with the same layer kinds, or
    another released variant of the family, e.g. LTX-Video 0.9.5).

    ``width`` replaces the first block's channels; the others keep the real ratios. Families with GroupNorm keep
    the real group count where the width allows, else halve it until every group has at least 2 channels of the
    first block, so statistics still span several channels. Mochi: ``width`` is the first block of the encoder and
    of the decoder, a multiple of 32 (its group count and head width are fixed). Classes whose GroupNorms diffusers
    fixes at 32 groups (``GROUPS_32_CLASSES``: HunyuanImage, KVAE, KVAE-Video) round ``width`` up to a multiple of
    32. Latent statistics of a changed latent width become identity (zeros / ones) of the right length.
    """
    if layout not in SEEDED_LAYOUTS:
        raise ValueError(f"unknown seeded layout {layout!r}; choose one of {sorted(SEEDED_LAYOUTS)}")
    cls_name, base = SEEDED_LAYOUTS[layout]
    if cls_name == "AutoencoderKLWan":
        return cls_name, wan_config(layout, base_dim=width, z_dim=latent)
    cfg = {k: (list(v) if isinstance(v, list) else v) for k, v in base.items()}
    if width is not None:
        if "base_dim" in cfg:
            if cfg.get("decoder_base_dim"):  # Qwen-Image 2.1: the decoder keeps its real ratio to the encoder
                cfg["decoder_base_dim"] = max(1, width * cfg["decoder_base_dim"] // cfg["base_dim"])
            cfg["base_dim"] = width
        elif cls_name == "AutoencoderDC":
            for key in ("encoder_block_out_channels", "decoder_block_out_channels"):
                cfg[key] = [width * c // cfg[key][0] for c in cfg[key]]
            # At least one head in the narrowest attention level (the real head dim where the width allows).
            attn = [c for c, t in zip(cfg["encoder_block_out_channels"], cfg["encoder_block_types"]) if t != "ResBlock"]
            cfg["attention_head_dim"] = min(cfg["attention_head_dim"], min(attn, default=cfg["attention_head_dim"]))
        elif cls_name == "AutoencoderKLMochi":
            cfg.update(_mochi_widths(cfg, width))
        elif any(k in cfg for k in _BASE_WIDTH_KEYS) and "ch_mult" in cfg:  # KVAE: levels are ch * ch_mult
            key = next(k for k in _BASE_WIDTH_KEYS if k in cfg)
            cfg[key] = -(-width // 32) * 32 if cls_name in GROUPS_32_CLASSES else width
        elif cls_name == "AutoencoderKLCosmos":  # both stacks in the real ratios to the encoder's first block
            first = cfg["encoder_block_out_channels"][0]
            for key in ("encoder_block_out_channels", "decode_block_out_channels"):
                cfg[key] = [width * c // first for c in cfg[key]]
        elif cls_name == "LTX2VideoDiffusionDecoderModel":
            # stage 5's channels, the others in the real ratios (8 : 4 : 2 : 2 : 1); heads no wider than stage 5
            last = cfg["decoder_stage_channels"][-1]
            cfg["decoder_stage_channels"] = [width * c // last for c in cfg["decoder_stage_channels"]]
            cfg["decoder_head_dim"] = min(cfg["decoder_head_dim"], width)
        else:
            if cls_name in GROUPS_32_CLASSES:
                width = -(-width // 32) * 32
            ratios = [c // cfg["block_out_channels"][0] for c in cfg["block_out_channels"]]
            scale0 = cfg["block_out_channels"][0]
            if "decoder_block_out_channels" in cfg:  # LTX: its own decoder widths, in the same ratio
                scale = cfg["block_out_channels"][0]
                cfg["decoder_block_out_channels"] = [width * c // scale for c in cfg["decoder_block_out_channels"]]
            cfg["block_out_channels"] = [width * r for r in ratios]
            if "decoder_num_attention_heads" in cfg:  # MiniMax-H3's ViT: heads in the encoder's ratio, 64 wide
                cfg["decoder_num_attention_heads"] = max(1, cfg["decoder_num_attention_heads"] * width // scale0)
            if "norm_num_groups" in cfg:
                groups = cfg["norm_num_groups"]
                while width % groups or width // groups < 2:
                    groups //= 2
                cfg["norm_num_groups"] = max(groups, 1)
    if latent is not None:
        key = next((k for k in ("z_dim", "z_channels") if k in cfg), "latent_channels")
        if latent != cfg[key] and cls_name in (
            "AutoencoderKLQwenImage", "AutoencoderKLMochi", "AutoencoderKLQwenImage21", "AutoencoderKLMiniMaxH3",
            "AutoencoderKLCosmos",
        ):
            cfg["latents_mean"], cfg["latents_std"] = [0.0] * latent, [1.0] * latent
        cfg[key] = latent
    cfg.update(overrides or {})
    return cls_name, cfg


def _mochi_widths(cfg: dict, width: int) -> dict:
    """Mochi's encoder and decoder channels with the first block of each at ``width`` and the real ratios within each
    stack (1 : 2 : 4 : 6). The real decoder is twice as wide as the encoder; a seeded one is not, because ``width``
    cannot go below 32 (``MOCHI_WIDTH_UNIT``: diffusers fixes its GroupNorms at 32 groups and its attention heads at
    32 channels), and a decoder at 64 would quadruple the smallest model's decoder (23 M -> 91 M parameters)."""
    if width % MOCHI_WIDTH_UNIT:
        raise ValueError(
            f"a Mochi width must be a multiple of {MOCHI_WIDTH_UNIT} (its GroupNorms have 32 groups and its attention "
            f"heads are 32 channels, fixed in diffusers), got {width}"
        )
    return {
        key: [c * width // cfg[key][0] for c in cfg[key]]
        for key in ("encoder_block_out_channels", "decoder_block_out_channels")
    }


def build_seeded_vae(
    layout: str,
    *,
    width: Optional[int] = None,
    latent: Optional[int] = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    perturb: float = 0.0,
    overrides: Optional[dict] = None,
):
    """A seeded VAE of any supported family's real layout (``SEEDED_LAYOUTS``); identical weights in every process
    for the same arguments. ``perturb`` adds seeded uniform noise to every parameter (norm scales that are not 1
    and biases that are not 0, so a wrong statistic or a dropped gradient shows); ``overrides`` as in
    :func:`seeded_config`."""
    import diffusers

    cls_name, cfg = seeded_config(layout, width, latent, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = getattr(diffusers, cls_name)(**cfg)
        if perturb:
            with torch.no_grad():
                for name, p in vae.named_parameters():
                    p.add_(torch.rand_like(p).sub_(0.5).mul_(2 * perturb))
    return cast_quietly(vae, dtype).eval()

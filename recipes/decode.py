"""Decode latents (or round-trip a video or images) with the VAE split by rows over all launched processes.

    accelerate launch [--config_file accelerate_configs/X.yaml] recipes/decode.py [flags]

Any supported family: Wan 2.1/2.2, Qwen-Image, HunyuanVideo, HunyuanVideo-1.5, CogVideoX, LTX-Video, LTX-2, Mochi
(videos) and AutoencoderKL (SD/SDXL/SD3/Flux.1), Flux.2, DC-AE (images); the class comes from the model's config.
Writes OUTPUT_DIR/video.mp4 for video VAEs, OUTPUT_DIR/image.png (+ contact_sheet.png for a batch) for image VAEs (main rank, atomically) and
OUTPUT_DIR/metrics.json. With no model flag it uses the built-in default model (parallel_vae/assets/default_vae/
if present, else a seeded model of the real Wan2.1 layout at a small width); with no input flag, a built-in
17-frame 64x96 demo clip is encoded and decoded (an image VAE round-trips 4 of its frames as a batch).

--parallel auto: shard only when the busiest rank's share of the decode is at least --auto_threshold GFLOP,
counted from the model and the latent shape on fake tensors (no compute; parallel_vae.jobs.fake_run.
decode_flops_per_rank), so a wide model shards at smaller sizes than a narrow one. The default threshold was
measured on a shared 2-core CPU machine (no GPU, gloo, 1 thread per rank, the embedded model, other jobs running:
noisy) with

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml benchmarks/decode_threshold.py

which times a 1-process decode against a 2-process sharded decode of the same latents (docs/recipes.md,
"Decoding videos and images", gives the same numbers):

{THRESHOLD_TABLE}

Re-measure on your hardware (the benchmark prints the threshold to pass as --auto_threshold).
Bad input (missing or unreadable file, wrong latent channels, fewer latent rows than ranks with --parallel on,
a video size that is not a multiple of the spatial factor, an unknown dtype): one message from the main rank,
non-zero exit on every rank, nothing written.
"""

from __future__ import annotations

import os
import sys

try:
    import parallel_vae  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a checkout without installing: the package sits next to recipes/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Only the torch-free command line here: --help answers before torch, diffusers or deepspeed load.
from parallel_vae.jobs.cli import (
    AUTO_MIN_GFLOP_PER_RANK,
    DTYPE_NAMES,
    SEEDED_DEFAULT_WIDTH,
    SEEDED_LAYOUT_NAMES,
    ArgumentParser,
    add_runtime_args,
    check_early,
    help_requested,
    print_help_once,
)

THRESHOLD_TABLE = """\
    Measured 2026-11-27 with the embedded checkpoint, GFLOP per rank counted as --parallel auto counts them:
    sharding lost at 0.72 GFLOP per rank and below (0.72x; 32 latent elements) and won from 1.45 up (1.81x at
    1.45, 1.38x at 2.5, 1.09x at 4.7, 1.82x at 7.1 (the demo clip's size), 3.59x at 18.9). The load average was
    15 on the 2 cores (other jobs), so the speedups are noisy; the crossover sits where the earlier measurement
    by latent elements put it (between 32 and 64 per rank for this model).

    -> default --auto_threshold 1.4 (GFLOP). Counting FLOPs, a wider model shards at fewer latent elements: the
    real Wan2.1 (base_dim 96) does 63x the embedded model's (base_dim 12) FLOPs per latent element and crosses
    1.4 GFLOP per rank at 4 latent elements per rank, where the embedded model needs 64. Any real Wan latent (e.g. 21 x 60 x 104 for 81 frames of 480x832) is far above it; on GPUs, where
    per-layer compute is much shorter relative to each halo exchange, the crossover is higher: re-measure there."""
__doc__ = __doc__.replace("{THRESHOLD_TABLE}", THRESHOLD_TABLE)


def build_parser() -> ArgumentParser:
    import argparse

    p = ArgumentParser(
        prog="decode.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m = p.add_argument_group("model (default: the built-in model)")
    m.add_argument(
        "--pretrained",
        metavar="PATH_OR_ID",
        help="a diffusers VAE of any supported family (AutoencoderKLWan, AutoencoderKLQwenImage, AutoencoderKL, "
        "AutoencoderKLFlux2, AutoencoderKLHunyuanVideo, AutoencoderKLHunyuanVideo15, AutoencoderKLCogVideoX, "
        "AutoencoderKLLTXVideo, AutoencoderKLLTX2Video, AutoencoderKLMochi, AutoencoderDC; the class comes from the "
        "config's _class_name): a local save_pretrained folder or a hub id (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers). "
        "For a pipeline folder/repo the VAE is in vae/: detected for local folders, tried first for hub ids",
    )
    m.add_argument(
        "--seeded",
        metavar="LAYOUT[:WIDTH[:LATENT]]",
        help="a seeded, untrained model of a family's real layout at a small width (default "
        f"{SEEDED_DEFAULT_WIDTH}, Mochi 32), for tests and benchmarks: "
        f"LAYOUT is one of {', '.join(SEEDED_LAYOUT_NAMES)} "
        "(e.g. sd:32:4; mochi widths are multiples of 32)",
    )
    m.add_argument(
        "--subfolder",
        help="folder inside --pretrained (or --config) holding the VAE's config.json; default: detected "
        "(top level or vae/)",
    )
    m.add_argument(
        "--single_file",
        metavar="PATH",
        help="single-file checkpoint (.safetensors/.pt/.pth/.ckpt): original or diffusers key names, loaded with "
        "the class's from_single_file. Wan files need no --config; other families need --config",
    )
    m.add_argument(
        "--config",
        metavar="PATH_OR_ID",
        help="for --single_file: diffusers folder or hub id with the VAE config (honours --subfolder). Default: "
        "inferred offline from the weight shapes (Wan2.1 or Wan2.2 layout; real latents_mean/std only for "
        "Wan2.1's z_dim 16)",
    )
    m.add_argument(
        "--dtype",
        default="float32",
        choices=list(DTYPE_NAMES),
        help="parameter and compute dtype (default: %(default)s)",
    )

    i = p.add_argument_group("input (default: the built-in demo clip, round-tripped)")
    i.add_argument(
        "--latents",
        metavar="PATH",
        help="latents (batch, channels, frames, rows, cols) for video VAEs, (batch, channels, rows, cols) for image "
        "VAEs, or one sample without batch, from .safetensors, .pt/.pth, .npy or .npz; e.g. "
        "torch.save(pipe(..., output_type='latent').frames, 'latents.pt')",
    )
    i.add_argument(
        "--latents_key",
        help="entry to read from a --latents file holding several tensors (default: the only one, or "
        "'latents' / 'frames')",
    )
    i.add_argument(
        "--latents_normalized",
        action="store_true",
        help="the latents are normalized, as pipelines return them with output_type='latent': undo it the "
        "family's way before decoding (Wan/Qwen-Image: z * latents_std + latents_mean; AutoencoderKL: "
        "z / scaling_factor + shift_factor; Flux.2: un-BatchNorm and unpatchify; HunyuanVideo(-1.5), CogVideoX, "
        "Mochi and DC-AE: z / scaling_factor (CogVideoX pipelines return (B, T, C, H, W): permute to (B, C, T, H, W) "
        "first); LTX-Video, LTX-2: z * latents_std / scaling_factor + latents_mean)",
    )
    i.add_argument(
        "--video",
        metavar="PATH",
        help="video file (mp4, webm, gif, ...) to round-trip: sharded encode, then decode; metrics get PSNR and "
        "SSIM against the input. Height and width must be multiples of the spatial factor (8 for Wan2.1, 16 for "
        "Wan2.2); frames past the last 1 + 4k are dropped",
    )
    i.add_argument("--max_frames", type=int, help="read at most this many frames of --video (or of the demo clip)")
    i.add_argument(
        "--image",
        metavar="PATH",
        nargs="+",
        help="image file(s) (png, jpg, ...) of one size to round-trip through an image VAE (AutoencoderKL, Flux.2, DC-AE) "
        "as one batch; without it an image VAE round-trips 4 frames of the demo clip",
    )

    o = p.add_argument_group("output")
    o.add_argument(
        "--output_dir",
        default="outputs/decode",
        help="receives video.mp4 (video_<i>.mp4 for further batch samples) or, for image VAEs, image.png "
        "(image_<i>.png) and contact_sheet.png (a batch: inputs above reconstructions for a round trip), "
        "metrics.json and, when asked, decoded.safetensors (default: %(default)s)",
    )
    o.add_argument("--fps", type=float, default=16.0, help="frame rate of the mp4 (default: %(default)s, Wan's rate)")
    o.add_argument(
        "--save_tensor",
        action="store_true",
        help="also write decoded.safetensors: the decoded video tensor ('video', (B, C, T, H, W) in [-1, 1], the "
        "model dtype) before mp4 encoding, for exact comparisons",
    )

    par = p.add_argument_group("parallelism")
    par.add_argument(
        "--parallel",
        default="auto",
        choices=["auto", "on", "off"],
        help="on: split rows over all processes (needs at least one latent row per process); off: every process "
        "decodes the whole input, no communication, rank 0 writes; auto: on when the busiest process's share of the "
        "decode is at least --auto_threshold GFLOP and the rows can be split, else off (default: %(default)s)",
    )
    par.add_argument(
        "--auto_threshold",
        type=float,
        default=AUTO_MIN_GFLOP_PER_RANK,
        help="GFLOP per process (the busiest rank's share of the decode) from which --parallel auto shards "
        "(default: %(default)s, measured as described above)",
    )
    add_runtime_args(p)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    if help_requested(argv):
        return print_help_once(parser)
    early = check_early(parser, argv)  # flag mistakes before the heavy imports
    if early is not None:
        return early
    from parallel_vae._deps import require_extra

    require_extra("recipes", "recipes/decode.py")
    from parallel_vae.jobs.decode_job import run_decode
    from parallel_vae.jobs.runtime import run_recipe

    return run_recipe(parser, run_decode, argv)


if __name__ == "__main__":
    from parallel_vae.jobs.cli import exit_process

    exit_process(main())

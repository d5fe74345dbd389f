"""The recipes' command lines, without importing torch, diffusers or deepspeed: ``--help`` answers at once, and
under a multi-process launch only rank 0 prints it (:func:`help_requested`).

The job modules import what they need from here; nothing here may import more than the standard library and
:mod:`parallel_vae.errors`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from ..errors import InputError

__all__ = [
    "ArgumentParser",
    "UsageError",
    "DEFAULT_TIMEOUT_S",
    "AUTO_MIN_GFLOP_PER_RANK",
    "DTYPE_NAMES",
    "SEEDED_LAYOUT_NAMES",
    "add_runtime_args",
    "add_finetune_args",
    "add_loss_args",
    "parse_seeded_spec",
    "check_early",
    "SEEDED_DEFAULT_WIDTH",
    "help_requested",
    "exit_process",
]

# Long enough for the slowest step between two collectives of a real decode (a rank waiting for rank 0 to write
# the mp4 of an 81-frame 720p video), short enough that a hang is noticed.
DEFAULT_TIMEOUT_S = 900

# Smallest per-rank work (GFLOP of the busiest rank's share of the decode) for which sharding over 2 ranks beat one
# process, measured by benchmarks/decode_threshold.py (see recipes/decode.py --help for the numbers).
AUTO_MIN_GFLOP_PER_RANK = 1.4

# The decode recipe's --dtype choices (parallel_vae.jobs.loading.DTYPES maps them to torch dtypes).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# The --seeded layouts (parallel_vae.jobs.models.SEEDED_LAYOUTS builds them).
SEEDED_LAYOUT_NAMES = (
    "wan2.1", "wan2.2", "sd", "sdxl", "sd3", "flux1", "flux2", "qwenimage", "hunyuanvideo", "hunyuanvideo15",
    "cogvideox", "dcae", "ltxvideo", "ltx2", "mochi",
    "qwenimage21",
    "hunyuanimage",
    "hunyuanimage_refiner",
    "kvae",
    "kvae_video",
    "minimax_h3",
    "ltx2diffusion",
    "cosmos",
)  # fmt: skip


# The width a --seeded LAYOUT with no width is built at: small, since a seeded model is untrained (for tests,
# benchmarks and trying the recipes) and the real widths take minutes on a CPU (flux1 84 M parameters,
# hunyuanvideo 246 M). Mochi's widths are multiples of 32.
SEEDED_DEFAULT_WIDTH = 16
_SEEDED_MIN_MULTIPLE = {"mochi": 32}


def parse_seeded_spec(spec: str) -> tuple[str, int, "Optional[int]"]:
    """``--seeded LAYOUT[:WIDTH[:LATENT]]`` -> (layout, width, latent or None), the syntax both recipes share,
    checked without torch (before a launch's heavy imports). WIDTH defaults to ``SEEDED_DEFAULT_WIDTH`` (Mochi: 32);
    LATENT to the layout's real latent channels."""
    parts = spec.split(":")
    if not parts[0] or parts[0] not in SEEDED_LAYOUT_NAMES or len(parts) > 3:
        raise UsageError(
            f"--seeded {spec!r}: expected LAYOUT[:WIDTH[:LATENT]] with LAYOUT one of {', '.join(SEEDED_LAYOUT_NAMES)}"
        )
    values = []
    for key, text in zip(("width", "latent"), parts[1:]):
        if not text.isdigit() or int(text) < 1:
            raise UsageError(f"--seeded {spec!r}: {key} must be a positive integer, got {text!r}")
        values.append(int(text))
    layout = parts[0]
    multiple = _SEEDED_MIN_MULTIPLE.get(layout, 1)
    width = values[0] if values else max(SEEDED_DEFAULT_WIDTH, multiple)
    if width % multiple:
        raise UsageError(f"--seeded {spec!r}: {layout} widths are multiples of {multiple}, got {width}")
    return layout, width, values[1] if len(values) > 1 else None


def check_early(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> Optional[int]:
    """Parse ``argv`` and check what needs no torch (the flags' syntax, ``--seeded``), before a launch's heavy
    imports: a mistake then costs a second, not the 7 to 25 s of importing torch, diffusers and accelerate. Returns
    the exit status to leave with (2, printed by rank 0 only) or ``None`` to go on."""
    try:
        args = parser.parse_args(argv)
        if getattr(args, "seeded", None):
            parse_seeded_spec(args.seeded)
        if getattr(args, "offload_checkpoints", False) and not getattr(args, "gradient_checkpointing", False):
            raise UsageError("--offload_checkpoints offloads what the checkpoints save: add --gradient_checkpointing")
    except UsageError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    return None


class UsageError(InputError):
    """A command-line flag is missing, unknown or has a bad value (exit status 2, as argparse uses)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing and exiting, so that under a multi-process
    launch the message is printed once, by the main rank, like every other input error."""

    def error(self, message: str):  # noqa: D401 (argparse's name)
        raise UsageError(f"{message} (see {self.prog} --help)")


def help_requested(argv: Optional[list[str]]) -> bool:
    """Whether ``argv`` asks for ``--help``: the recipe then prints it from rank 0 only (every launched process
    parses the same command line) and exits 0 before anything heavy is imported."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    args = args[: args.index("--")] if "--" in args else args
    return any(a in ("-h", "--help") for a in args)


def print_help_once(parser: argparse.ArgumentParser) -> int:
    if int(os.environ.get("RANK", "0")) == 0:
        parser.print_help()
    return 0


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """The flags every recipe shares: experiment tracking and the collective timeout."""
    g = parser.add_argument_group("tracking and runtime")
    g.add_argument(
        "--report_to",
        default="none",
        choices=["none", "wandb"],
        help="experiment tracker, through accelerate's tracker API. wandb runs offline (files under "
        "OUTPUT_DIR/wandb, sync later with `wandb sync`) when there is no login (no WANDB_API_KEY, no netrc "
        "entry) or WANDB_MODE=offline (default: %(default)s)",
    )
    g.add_argument("--tracker_project", default="parallel_vae", help="wandb project name (default: %(default)s)")
    g.add_argument("--run_name", default=None, help="wandb run name (default: wandb picks one)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar (default: one on the main rank)")
    g.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds a rank waits in a collective before the run fails instead of hanging (default: %(default)s)",
    )


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    # Long by design: one flat declaration per flag, in the order --help prints them; splitting it by group would
    # only move the same declarations into more functions.
    m = p.add_argument_group("model (default: the built-in model)")
    m.add_argument(
        "--pretrained",
        metavar="PATH_OR_ID",
        help="diffusers VAE folder or hub id to start from, any supported family (the class comes from its config)",
    )
    m.add_argument("--subfolder", default=None, help="folder inside --pretrained holding config.json (detected)")
    m.add_argument("--single_file", metavar="PATH", help="single-file checkpoint to start from")
    m.add_argument(
        "--seeded",
        metavar="LAYOUT[:WIDTH[:LATENT]]",
        help="start from a freshly initialized, seeded model of a real layout at a small width (default "
        f"{SEEDED_DEFAULT_WIDTH}, Mochi 32) with LAYOUT one of " + ", ".join(SEEDED_LAYOUT_NAMES) + ", e.g. "
        "wan2.1:12:16 (the embedded default checkpoint was trained from wan2.1:12:16 with --seeded_init "
        "zero_residual) or sd:32:4 (image VAEs train on single frames)",
    )
    m.add_argument(
        "--seeded_init",
        default="pytorch",
        choices=["pytorch", "zero_residual"],
        help="initialization of a --seeded model: the modules' own, or zero biases and identity residual blocks, "
        "which trains from scratch (see parallel_vae.jobs.models.build_wan_vae) (default: %(default)s)",
    )
    m.add_argument(
        "--inflate",
        action="store_true",
        help="before training, make the starting model's temporal layers per-frame (parallel_vae.jobs.models."
        "inflate_temporal): the step from a model trained on --frames 1 to video training",
    )
    m.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64", "bfloat16"],
        help="parameter dtype (float64 is for exactness tests; for bf16 training prefer float32 parameters with "
        "--mixed_precision bf16) (default: %(default)s)",
    )
    m.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "bf16"],
        help="autocast through accelerate (default: the launch config's setting)",
    )
    m.add_argument(
        "--train",
        default="all",
        choices=["all", "decoder"],
        help="train the whole VAE, or only post_quant_conv + decoder with the encoder frozen (default: %(default)s)",
    )
    m.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute encoder/decoder block activations in backward (halo exchanges are repeated in order)",
    )
    m.add_argument(
        "--offload_checkpoints",
        action="store_true",
        help="with --gradient_checkpointing: keep what the checkpoints save (block inputs, Wan's chunk caches) in "
        "pinned host memory until backward needs it (docs/training.md)",
    )

    par = p.add_argument_group("parallel layout")
    par.add_argument(
        "--sp_degree",
        type=int,
        default=None,
        help="spatial ranks per clip S; the world is split into D = world / S data-parallel replicas of S "
        "consecutive ranks (default: the whole world, D = 1)",
    )

    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' (procedural moving shapes and textures, seeded), 'synthetic:N' (N clips), or a folder "
        "of videos / image-sequence folders (default: %(default)s)",
    )
    d.add_argument("--val_data", default="synthetic:4", help="held-out clips, same forms as --data (default: %(default)s)")
    d.add_argument(
        "--frames", type=int, default=9,
        help="frames per clip, 1 + k x the VAE's temporal factor: 1 + 4k (Wan, HunyuanVideo...), 1 + 6k (Mochi) "
        "(default: %(default)s)",
    )
    d.add_argument("--height", type=int, default=64, help="clip height, a multiple of the spatial factor (default: %(default)s)")
    d.add_argument("--width", type=int, default=64, help="clip width, a multiple of the spatial factor (default: %(default)s)")

    o = p.add_argument_group("optimization")
    o.add_argument(
        "--max_steps",
        type=int,
        default=100,
        help="optimizer steps; 0 validates and exports the starting model only (default: %(default)s)",
    )
    o.add_argument("--batch_size", type=int, default=1, help="clips per data-parallel replica per step (default: %(default)s)")
    o.add_argument(
        "--optimizer",
        default="adamw",
        choices=["adamw", "sgd"],
        help="adamw for training; sgd makes the update proportional to the gradient, which is what the layout "
        "exactness tests compare (an Adam first step is nearly sign(gradient) and would hide gradient errors) "
        "(default: %(default)s)",
    )
    o.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: %(default)s)")
    o.add_argument("--weight_decay", type=float, default=0.0, help="weight decay (default: %(default)s)")
    o.add_argument("--warmup_steps", type=int, default=0, help="linear learning-rate warm-up steps (default: %(default)s)")
    o.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=["constant", "cosine", "linear"],
        help="learning rate after the warm-up: constant, or decaying to 0 at --max_steps along a half cosine or a "
        "line; the decay is laid out over --max_steps, so resume with the same --max_steps (default: %(default)s)",
    )
    o.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping, 0 = off (default: %(default)s)")
    o.add_argument("--l1", type=float, default=1.0, help="weight of the mean L1 reconstruction loss (default: %(default)s)")
    o.add_argument("--mse", type=float, default=0.0, help="weight of the mean squared reconstruction loss (default: %(default)s)")
    o.add_argument(
        "--kl",
        type=float,
        default=1e-6,
        help="weight of the KL term, normalized like the reconstruction terms (per pixel element), so 1e-6 means "
        "what it means in latent-diffusion VAE training; the logged 'kl' is per sample (default: %(default)s)",
    )
    o.add_argument(
        "--sample_posterior",
        action="store_true",
        help="decode a posterior sample (noise seeded per step and sample) instead of the mean",
    )
    o.add_argument("--seed", type=int, default=0, help="data order and posterior noise seed (default: %(default)s)")

    io = p.add_argument_group("validation, checkpoints, output")
    io.add_argument("--output_dir", default="outputs/finetune", help="run folder (default: %(default)s)")
    io.add_argument("--validate_every", type=int, default=50, help="validate every N steps, 0 = only at the end (default: %(default)s)")
    io.add_argument(
        "--checkpoint_every",
        type=int,
        default=50,
        help="accelerate save_state every N steps and at the last step, 0 = off (default: %(default)s)",
    )
    io.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=2,
        help="keep the newest N checkpoints, deleting older ones after each save, 0 = keep all (default: %(default)s)",
    )
    io.add_argument(
        "--resume",
        default=None,
        help="'latest' (the newest complete checkpoint under OUTPUT_DIR/checkpoints) or a checkpoint folder written "
        "by --checkpoint_every; refused when the run configuration changes the training trajectory",
    )
    io.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a non-empty OUTPUT_DIR: its checkpoints, samples, final/ and summaries are deleted "
        "first (without it, a used run folder is refused unless you --resume)",
    )
    io.add_argument("--log_every", type=int, default=1, help="log the training loss every N steps (default: %(default)s)")
    io.add_argument(
        "--export_dir",
        default=None,
        help="where the final model is saved with save_pretrained (default: OUTPUT_DIR/final); plain diffusers "
        "AutoencoderKLWan.from_pretrained loads it",
    )
    io.add_argument(
        "--export_dtype",
        default=None,
        choices=["float32", "float16", "bfloat16", "float64"],
        help="dtype of the exported weights (default: the training dtype)",
    )


def add_loss_args(p: argparse.ArgumentParser) -> None:
    """The perceptual and adversarial loss flags of the fine-tuning recipe (parallel_vae.jobs.loss_terms)."""
    g = p.add_argument_group(
        "perceptual and adversarial losses (latent-diffusion / taming VAE training; computed on row shards)"
    )
    g.add_argument(
        "--perceptual_weight",
        type=float,
        default=0.0,
        help="weight of the LPIPS (VGG16) perceptual loss, the mean over frames added to the per-element loss as in "
        "taming (1.0 there); 0 = off (default: %(default)s)",
    )
    g.add_argument(
        "--perceptual_weights_file",
        metavar="FILE[,FILE]",
        default=None,
        help="LPIPS weights, safetensors or torch files, comma-separated: a full LPIPS / taming state dict "
        "(net.sliceK.N.*, linK.model.1.weight), or torchvision's vgg16 file plus LPIPS's vgg.pth; nothing is "
        "downloaded",
    )
    g.add_argument(
        "--disc_weight",
        type=float,
        default=0.0,
        help="weight of the PatchGAN generator loss (hinge discriminator); with --adaptive_weight it scales the "
        "adaptive weight, as taming's disc_weight; 0 = no discriminator (default: %(default)s)",
    )
    g.add_argument(
        "--disc_start",
        type=int,
        default=0,
        help="optimizer step from which the discriminator trains and its loss is added (taming's disc_start) "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--disc_weights_file",
        metavar="FILE",
        default=None,
        help="discriminator weights in taming's layout (main.N.*; a taming / latent-diffusion checkpoint's "
        "loss.discriminator.* is found too); default: a fresh one, taming's initialization seeded by --seed",
    )
    g.add_argument("--disc_ndf", type=int, default=64, help="width of a fresh discriminator (default: %(default)s)")
    g.add_argument("--disc_layers", type=int, default=3, help="stride-2 layers of a fresh discriminator (default: %(default)s)")
    g.add_argument(
        "--adaptive_weight",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="taming's adaptive weight: ||grad nll|| / ||grad g_loss|| at the decoder's last layer (decoder.conv_out), "
        "clamped to [0, 1e4], times --disc_weight (default: on)",
    )
    g.add_argument(
        "--disc_optimizer",
        default="adam",
        choices=["adam", "sgd"],
        help="discriminator optimizer: Adam with taming's betas (0.5, 0.9), or SGD (for exactness tests) "
        "(default: %(default)s)",
    )
    g.add_argument("--disc_lr", type=float, default=None, help="discriminator learning rate (default: --lr)")


def exit_process(status: int) -> None:
    """Leave a recipe process with ``status``, skipping the interpreter's teardown when it was launched with several
    processes.

    Everything a recipe owns is already closed when this runs (outputs renamed into place, trackers ended, the
    process group destroyed: :meth:`Runtime.close`). What remains is the interpreter's own finalization, and there
    gloo's C++ threads can still hold objects whose destruction needs the GIL of an interpreter being torn down:
    seen in CI as a rank killed by SIGABRT ("terminate called without an active exception") *after* a successful
    decode had printed its summary, which the launcher then reports as a failed run. ``os._exit`` after flushing
    the standard streams leaves without that teardown. A single unlaunched process has no gloo threads and exits
    normally (atexit handlers run).
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe must not change the exit status
            pass
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os._exit(status)
    sys.exit(status)

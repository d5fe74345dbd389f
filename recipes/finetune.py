"""Fine-tune the Wan VAE on the sharded path, launched with accelerate (DDP or DeepSpeed ZeRO-2/3).

    accelerate launch [--config_file accelerate_configs/X.yaml] recipes/finetune.py [flags]

A world of D x S processes: --sp_degree S ranks split each clip's rows (sharded encode -> decode, halo
exchanges, the loss computed on shards and scaled so DDP / DeepSpeed averaging gives the single-process gradient);
D = world / S data-parallel replicas take different clips. The full video is never gathered during a training
step. With no data flag it trains on the built-in synthetic clips (moving shapes and textures); with no model flag
it starts from the built-in default model.

Outputs in OUTPUT_DIR: checkpoints/step_N (accelerate save_state, --checkpoint_every; resume with --resume),
samples/step_N.mp4 (validation input | reconstruction), finetune_summary.json (loss history, validation PSNR/SSIM,
per-rank peak memory and step time), and final/ (save_pretrained; plain diffusers AutoencoderKLWan loads it).
Validation decodes held-out clips with parallel_vae.decode_video, the same path as recipes/decode.py.
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
    ArgumentParser,
    add_finetune_args,
    add_loss_args,
    add_runtime_args,
    check_early,
    help_requested,
    print_help_once,
)


def build_parser() -> ArgumentParser:
    import argparse

    p = ArgumentParser(prog="finetune.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_finetune_args(p)
    add_loss_args(p)
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

    require_extra("recipes", "recipes/finetune.py")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":  # accelerate launch with a DeepSpeed config
        require_extra("train", "recipes/finetune.py under DeepSpeed")
    from parallel_vae.jobs.finetune_job import accelerator_kwargs, run_finetune
    from parallel_vae.jobs.runtime import run_recipe

    return run_recipe(parser, run_finetune, argv, accelerator_kwargs=accelerator_kwargs)


if __name__ == "__main__":
    from parallel_vae.jobs.cli import exit_process

    exit_process(main())

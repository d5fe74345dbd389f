"""Measure a Wan VAE's per-channel latent mean and std, and optionally write them into its config.json.

    python recipes/latent_stats.py --pretrained outputs/finetune/final                   # print them
    python recipes/latent_stats.py --pretrained outputs/finetune/final --write           # and store them

``latents_mean`` / ``latents_std`` in a Wan VAE's config are what pipelines normalize latents with,
``(z - mean) / std`` (recipes/decode.py's ``--latents_normalized`` undoes it). Wan2.1's values describe Wan2.1's
released weights; a VAE trained from scratch or fine-tuned far needs its own. The statistics are of the posterior
means over ``--data`` clips (default: the fine-tuning recipe's synthetic training clips, seed 0), in float64.
``--write`` replaces config.json atomically and leaves the weights alone. One process; no launcher needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

try:
    import parallel_vae  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from parallel_vae._deps import require_extra  # noqa: E402
from parallel_vae.jobs._files import atomic_path  # noqa: E402
from parallel_vae.jobs.data import make_dataset  # noqa: E402
from parallel_vae.errors import InputError  # noqa: E402
from parallel_vae.jobs.loading import load_vae  # noqa: E402
from parallel_vae.jobs.training import latent_statistics  # noqa: E402
from parallel_vae.families import spatial_factor  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latent_stats.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, metavar="FOLDER", help="a save_pretrained folder (config.json inside)")
    p.add_argument("--data", default="synthetic:64", help="clips to measure on, as recipes/finetune.py --data (default: %(default)s)")
    p.add_argument("--frames", type=int, default=9, help="frames per clip, 1 + 4k (default: %(default)s)")
    p.add_argument("--height", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--width", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default: %(default)s, the fine-tuning recipe's training clips)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--write", action="store_true", help="store the values in FOLDER/config.json")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    require_extra("recipes", "recipes/latent_stats.py")
    if args.threads:
        torch.set_num_threads(args.threads)
    config_path = os.path.join(args.pretrained, "config.json")
    try:
        if not os.path.isfile(config_path):
            raise InputError(f"--pretrained {args.pretrained}: no config.json there (give a save_pretrained folder)")
        vae, _ = load_vae(pretrained=args.pretrained, dtype=torch.float32)
        data = make_dataset(args.data, frames=args.frames, height=args.height, width=args.width,
                            spatial_factor=spatial_factor(vae), seed=args.seed)  # fmt: skip
        if len(data) == 0:
            raise InputError(f"--data {args.data}: no clips")
    except (InputError, ValueError, FileNotFoundError) as e:
        p.error(str(e))
    mean, std = latent_statistics(vae, (data[i] for i in range(len(data))))
    mean, std = [round(v, 4) for v in mean], [round(v, 4) for v in std]
    print(json.dumps({"latents_mean": mean, "latents_std": std, "clips": len(data)}))
    if args.write:
        with open(config_path) as f:
            config = json.load(f)
        config["latents_mean"], config["latents_std"] = mean, std
        with atomic_path(config_path) as tmp, open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        print(f"wrote {config_path}")
    return 0


if __name__ == "__main__":
    from parallel_vae.jobs.cli import exit_process

    exit_process(main())

"""Reconstruction quality of a Wan VAE checkpoint on held-out synthetic clips and the decode demo clip.

    python benchmarks/eval_vae_quality.py                          # the built-in default model
    python benchmarks/eval_vae_quality.py --pretrained outputs/dv_stageB/final

Each row is the mean PSNR (dB) and SSIM of ``decode(encode(x).mode())`` in plain diffusers, single process, next to
two references that need no training: every pixel replaced by its clip's mean colour (what a collapsed VAE gives),
and each frame's 8x8 block means upsampled bilinearly (3 numbers per 8x8 block and frame; a Wan2.1 latent holds
16 per 8x8 block and *four* frames). The held-out clips use the fine-tuning recipe's validation seed (``--seed`` +
7919), so the numbers are comparable with its logged validation. Prints a table; writes JSON to ``--output``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from parallel_vae.jobs.data import SyntheticVideoDataset  # noqa: E402
from parallel_vae.jobs.finetune_job import VALIDATION_SEED_OFFSET  # noqa: E402
from parallel_vae.jobs.loading import default_vae, load_vae  # noqa: E402
from parallel_vae.jobs.metrics import psnr, ssim, write_json  # noqa: E402
from parallel_vae.jobs.video import demo_video  # noqa: E402

SETS = [("held-out synthetic", 8, 5, 64, 64), ("held-out synthetic", 8, 9, 64, 64), ("held-out synthetic", 8, 17, 64, 96)]


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x)


def block_means(x: torch.Tensor, block: int = 8) -> torch.Tensor:
    b, c, t, h, w = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    low = F.interpolate(F.avg_pool2d(frames, block), scale_factor=block, mode="bilinear", align_corners=False)
    return low.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


def evaluate(vae, clips) -> dict:
    rows = {"vae": [], "mean colour": [], "8x8 block means": []}
    with torch.no_grad():
        for x in clips:
            x = x[None]
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
            for name, pred in (("vae", y), ("mean colour", mean_colour(x)), ("8x8 block means", block_means(x))):
                rows[name].append((psnr(pred, x), ssim(pred, x)))
    return {k: {"psnr": sum(p for p, _ in v) / len(v), "ssim": sum(s for _, s in v) / len(v)} for k, v in rows.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", default=None, help="diffusers folder (default: the built-in default model)")
    p.add_argument("--seed", type=int, default=0, help=f"the fine-tuning run's --seed (validation clips use seed + {VALIDATION_SEED_OFFSET})")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="outputs/eval_vae_quality.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.pretrained:
        vae, source = load_vae(pretrained=args.pretrained, dtype=torch.float32)
    else:
        vae, source = default_vae()
    vae = vae.float().eval()
    results = []
    for name, n, t, h, w in SETS:
        data = SyntheticVideoDataset(n, t, h, w, seed=args.seed + VALIDATION_SEED_OFFSET)
        results.append({"set": f"{name}, {n} clips {t}x{h}x{w}", **evaluate(vae, [data.clip(i) for i in range(n)])})
    results.append({"set": "decode demo clip 17x64x96", **evaluate(vae, [demo_video()])})
    print(f"model: {source}")
    print(f"{'clips':<42} {'VAE PSNR / SSIM':>18} {'mean colour':>16} {'8x8 block means':>18}")
    for r in results:
        cells = [f"{r[k]['psnr']:.2f} / {r[k]['ssim']:.3f}" for k in ("vae", "mean colour", "8x8 block means")]
        print(f"{r['set']:<42} {cells[0]:>18} {cells[1]:>16} {cells[2]:>18}")
    print("wrote", write_json({"model": source, "results": results}, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())

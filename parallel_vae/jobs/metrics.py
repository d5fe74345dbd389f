"""Reconstruction quality (PSNR, SSIM) and per-rank peak memory."""

from __future__ import annotations

import json
import resource
import sys

import numpy as np
import torch

from ._files import atomic_path

__all__ = ["psnr", "ssim", "peak_memory_bytes", "reset_peak_memory", "write_json"]


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of two tensors in [-1, 1] (``data_range`` 2), over all elements."""
    mse = torch.mean((pred.detach().double() - target.detach().double()) ** 2).item()
    if mse == 0:
        return float("inf")
    return float(10 * np.log10(data_range**2 / mse))


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean SSIM (scikit-image, Gaussian-weighted as in Wang et al.) over frames of (B, C, T, H, W) or (C, T, H, W)
    videos in [-1, 1]; channels are averaged (``channel_axis``)."""
    from skimage.metrics import structural_similarity

    p = pred.detach().double().cpu()
    t = target.detach().double().cpu()
    if p.dim() == 4:
        p, t = p[None], t[None]
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch {tuple(p.shape)} vs {tuple(t.shape)}")
    scores = []
    for b in range(p.shape[0]):
        for f in range(p.shape[2]):
            # (C, H, W) -> (H, W, C)
            a = p[b, :, f].permute(1, 2, 0).numpy()
            c = t[b, :, f].permute(1, 2, 0).numpy()
            win = min(7, a.shape[0], a.shape[1])
            win -= 1 - win % 2  # odd window no larger than the frame
            scores.append(
                structural_similarity(
                    a, c, data_range=2.0, channel_axis=-1, gaussian_weights=True, sigma=1.5, win_size=win
                )
            )
    return float(np.mean(scores))


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only; the CPU figure is a process-lifetime high-water mark)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> dict:
    """This process's peak memory.

    On CUDA: ``torch.cuda.max_memory_allocated`` (tensor bytes since the last reset). On CPU: the peak resident
    set size (``ru_maxrss``) of this process since it started, which includes the Python interpreter, torch's
    libraries and allocator caches; compare it between runs of the same script, not with CUDA figures.
    """
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return {"kind": "cpu_peak_rss", "bytes": int(rss * scale)}


def write_json(obj, path: str) -> str:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file in the same folder, then ``os.replace``), so a
    reader never sees half a file; returns ``path``. Non-finite floats are rejected (they are not JSON)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=False)
            f.write("\n")
    return path

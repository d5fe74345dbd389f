"""Video and image files: read to and write from tensors in [-1, 1], via imageio (ffmpeg for video, Pillow for
PNG).

Writes are atomic (a temporary file in the same folder, then ``os.replace``), so a crash or an error never leaves
a partial ``video.mp4`` or ``image.png`` behind.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from ..errors import InputError
from ._files import atomic_path

__all__ = [
    "read_video",
    "write_video",
    "check_video_size",
    "read_image",
    "write_image",
    "contact_sheet",
    "to_uint8_frames",
    "from_uint8_frames",
    "demo_video",
]


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) in [-1, 1] -> (T, H, W, C) uint8. A single-channel video is repeated to RGB."""
    if video.dim() != 4:
        raise ValueError(f"expected a (C, T, H, W) video, got shape {tuple(video.shape)}")
    v = video.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    v = v.permute(1, 2, 3, 0).cpu().numpy()
    if v.shape[-1] == 1:
        v = np.repeat(v, 3, axis=-1)
    return v


def from_uint8_frames(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, C) uint8 -> (C, T, H, W) float32 in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1)
    return t.permute(3, 0, 1, 2).contiguous()


def read_video(path: str, max_frames: Optional[int] = None) -> torch.Tensor:
    """Read a video file (mp4, webm, gif, ...) into a (3, T, H, W) float32 tensor in [-1, 1]."""
    import imageio.v3 as iio

    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        frames = []
        for i, frame in enumerate(iio.imiter(path)):
            if max_frames is not None and i >= max_frames:
                break
            frames.append(frame[..., :3] if frame.ndim == 3 else np.repeat(frame[..., None], 3, -1))
    except Exception as e:  # imageio raises a zoo of types for unreadable files
        raise ValueError(f"cannot read video {path}: {e}") from e
    if not frames:
        raise ValueError(f"video {path} has no frames")
    return from_uint8_frames(np.stack(frames))


# libx264 (yuv420p) encodes frames whose width and height are even and at most this; outside it ffmpeg writes an
# empty file and imageio raises nothing (seen: a 32768 x 16 video "written" as 0 bytes).
X264_MAX_SIDE = 16384


def check_video_size(height: int, width: int, path: str) -> None:
    """Refuse, before anything is encoded, a frame size libx264 cannot encode, saying which sizes work.

    Decided: an error, not a fallback to PNG frames. A caller asking for an mp4 gets an mp4 or a clear refusal;
    ``--save_tensor`` keeps the decoded tensor whatever its size."""
    if height % 2 == 0 and width % 2 == 0 and 0 < height <= X264_MAX_SIDE and 0 < width <= X264_MAX_SIDE:
        return
    raise InputError(
        f"cannot write {path}: libx264 encodes frames whose width and height are even and at most {X264_MAX_SIDE} "
        f"pixels, and this video is {width}x{height} (width x height); decode fewer rows or columns, or keep the "
        "decoded tensor with --save_tensor"
    )


def _check_written(path: str, what: str, expect: tuple, read) -> None:
    """Read ``path`` back: it must exist, be non-empty and hold ``expect`` (frames, height, width); else OSError."""
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    problem = None
    if size == 0:
        problem = "the encoder wrote an empty file"
    else:
        try:
            got = read(path)
        except Exception as e:  # imageio raises a zoo of types for unreadable files
            problem = f"it cannot be read back ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        else:
            if tuple(got) != tuple(expect):
                problem = f"it reads back as {got}, expected {expect} (frames, height, width)"
    if problem:
        raise OSError(f"writing {what} failed: {problem}")


def _video_shape(path: str) -> tuple:
    import imageio.v3 as iio

    frames, shape = 0, None
    for frame in iio.imiter(path):
        frames, shape = frames + 1, frame.shape[:2]
    return (frames, *shape) if shape else (0, 0, 0)


def write_video(video: torch.Tensor, path: str, fps: float = 16.0) -> str:
    """Write a (C, T, H, W) video in [-1, 1] to ``path`` (H.264 mp4) atomically; returns ``path``. The file is read
    back (frame count and size) before it is moved into place; a frame size libx264 refuses is an ``InputError``."""
    import imageio.v3 as iio

    check_video_size(video.shape[-2], video.shape[-1], path)
    frames = to_uint8_frames(video)
    with atomic_path(path, suffix=os.path.splitext(path)[1] or ".mp4") as tmp:
        # macro_block_size=1: keep the exact size (the default rounds up to multiples of 16).
        iio.imwrite(tmp, frames, fps=fps, codec="libx264", macro_block_size=1)
        _check_written(tmp, path, frames.shape[:3], _video_shape)
    return path


def read_image(path: str) -> torch.Tensor:
    """Read an image file (png, jpg, webp, ...) into a (3, H, W) float32 tensor in [-1, 1] (alpha dropped, grey
    repeated to RGB)."""
    import imageio.v3 as iio

    if os.path.isdir(path):
        raise FileNotFoundError(f"image {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        img = iio.imread(path)
    except Exception as e:  # imageio raises a zoo of types for unreadable files
        raise ValueError(f"cannot read image {path}: {e}") from e
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    if img.ndim != 3 or img.dtype != np.uint8:
        raise ValueError(f"image {path}: expected an 8-bit RGB or grey image, got {img.dtype} of shape {img.shape}")
    return from_uint8_frames(img[None, ..., :3])[:, 0]


def write_image(image: torch.Tensor, path: str) -> str:
    """Write a (C, H, W) image in [-1, 1] to ``path`` (PNG) atomically; returns ``path``."""
    import imageio.v3 as iio

    frame = to_uint8_frames(image.unsqueeze(1))[0]
    with atomic_path(path, suffix=os.path.splitext(path)[1] or ".png") as tmp:
        iio.imwrite(tmp, frame, extension=".png")
        _check_written(tmp, path, (1, *frame.shape[:2]), lambda p: (1, *iio.improps(p, extension=".png").shape[:2]))
    return path


def contact_sheet(images: torch.Tensor, columns: Optional[int] = None, gap: int = 2) -> torch.Tensor:
    """(B, C, H, W) images in [-1, 1] -> one (C, rows x H + gaps, columns x W + gaps) image, row by row, with
    ``gap`` pixels of white between them."""
    b, c, h, w = images.shape
    cols = columns or min(b, 4)
    rows = (b + cols - 1) // cols
    sheet = images.new_ones((c, rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap))
    for i in range(b):
        r, q = divmod(i, cols)
        sheet[:, r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = images[i]
    return sheet


def demo_video(frames: int = 17, height: int = 64, width: int = 96) -> torch.Tensor:
    """A deterministic synthetic clip (3, frames, height, width) in [-1, 1]: a colour gradient drifting right and a
    square moving diagonally, so motion, edges and flat areas all appear (the recipes' built-in demo input)."""
    t = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1)
    y = torch.arange(height, dtype=torch.float32).view(1, height, 1) / max(height - 1, 1)
    x = torch.arange(width, dtype=torch.float32).view(1, 1, width) / max(width - 1, 1)
    phase = 2 * torch.pi * (x - t / max(frames, 1))
    red = torch.sin(phase) * 0.8
    green = (y * 2 - 1) * 0.8
    blue = torch.cos(2 * torch.pi * y + t / 4) * 0.5
    # three (T, H, W) planes -> (3, T, H, W)
    video = torch.stack([c.expand(frames, height, width) for c in (red, green, blue)])
    side = max(2, min(height, width) // 4)
    for f in range(frames):
        top = (f * 3) % max(height - side, 1)
        left = (f * 5) % max(width - side, 1)
        video[:, f, top : top + side, left : left + side] = torch.tensor([0.9, 0.9, -0.9]).view(3, 1, 1)
    return video.clamp(-1, 1).contiguous()

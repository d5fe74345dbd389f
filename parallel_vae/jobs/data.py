"""Datasets of video clips for fine-tuning: every item a float32 (3, T, H, W) tensor in [-1, 1].

Wan's VAE encodes the first frame alone and then chunks of 4, so ``T = 1 + 4k`` (``temporal_factor``, 6 for
Mochi); its spatial downsampling needs ``H`` and ``W`` to be multiples of ``spatial_factor`` (8 for Wan2.1, 16 for
Wan2.2). :func:`validate_clip_shape` checks both and names the nearest valid values.

* :class:`SyntheticVideoDataset`: procedural, seeded clips (moving shapes over textured, possibly panning
  backgrounds), the built-in training data that needs no files.
* :class:`VideoFolderDataset`: video files and image-sequence folders under a root, cut to ``T`` frames, resized
  (aspect preserved, shorter side covering the target) and cropped to exactly ``(H, W)``.
* :func:`make_dataset`: ``"synthetic"``, ``"synthetic:N"`` or a folder path -> the right dataset.
* :func:`data_parallel_sampler` / :func:`shard_indices`: ``torch.utils.data.DistributedSampler`` keyed on the
  *data-parallel* rank.

Determinism is the contract that spatial parallelism needs: all ranks of one spatial group must load the identical
clip. Every random choice (synthetic content, temporal offset, crop position) comes from a generator seeded with
``(seed, index)`` or ``(seed, epoch, index)``, never from global RNG state, so item ``i`` is the same in every
process, DataLoader worker and run. Usage in a D (data) x S (spatial) layout::

    dataset = make_dataset(spec, frames, height, width, spatial_factor, seed=seed)
    sampler = data_parallel_sampler(dataset, dp_rank=rank // S, dp_size=D, seed=seed)  # NOT the global rank
    loader = DataLoader(dataset, batch_size=b, sampler=sampler, num_workers=4)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)   # new permutation
        dataset.set_epoch(epoch)   # new temporal offsets / crops (before the epoch's iterator is created)
        for clips in loader: ...   # (b, 3, T, H, W), identical on the S ranks of a replica

With ``persistent_workers=True`` the workers keep the dataset copy (and epoch) they started with; either leave it
off or read items with an explicit epoch, ``dataset.clip(index, epoch)``, which is a pure function of its
arguments (also what a resumed run needs).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler

from ..errors import InputError

__all__ = [
    "VIDEO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "DEFAULT_SYNTHETIC_CLIPS",
    "validate_clip_shape",
    "SyntheticVideoDataset",
    "VideoFolderDataset",
    "make_dataset",
    "data_parallel_sampler",
    "shard_indices",
]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_SYNTHETIC_CLIPS = 1024
SHORT_CLIP_POLICIES = ("skip", "loop")


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------


def _nearest(below: int, step: int) -> str:
    """"a or b": the valid value ``below`` an invalid one and the next (only the upper when ``below`` is not
    positive)."""
    return f"{below} or {below + step}" if below > 0 else f"{below + step}"


def validate_clip_shape(frames: int, height: int, width: int, spatial_factor: int, temporal_factor: int = 4) -> None:
    """Raise :class:`~parallel_vae.errors.InputError` (a ``ValueError``) unless ``frames = 1 + k temporal_factor``
    and ``height``, ``width`` are positive multiples of ``spatial_factor``; the message names the nearest valid
    values."""
    if not isinstance(spatial_factor, int) or spatial_factor < 1:
        raise InputError(f"spatial_factor must be a positive integer, got {spatial_factor!r}")
    tf = temporal_factor
    if not isinstance(frames, int) or frames < 1 or (frames - 1) % tf:
        first = ", ".join(str(1 + i * tf) for i in range(3))
        hint = _nearest(frames - (frames - 1) % tf, tf) if isinstance(frames, int) and frames >= 1 else f"{first}, ..."
        raise InputError(
            f"frames={frames!r} is not 1 + {tf}k (the VAE encodes the first frame alone, then chunks of {tf}); "
            f"nearest valid: {hint}"
        )
    for name, size in (("height", height), ("width", width)):
        if not isinstance(size, int) or size < 1 or size % spatial_factor:
            below = size - size % spatial_factor if isinstance(size, int) and size >= 1 else 0
            raise InputError(
                f"{name}={size!r} is not a positive multiple of spatial_factor={spatial_factor}; "
                f"nearest valid: {_nearest(below, spatial_factor)}"
            )


def _check_index(index: int, length: int) -> int:
    """Python-style index into ``range(length)``; ``IndexError`` beyond it (which ends plain iteration)."""
    index = int(index)
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"clip index out of range for a dataset of {length} clips")
    return index


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic clips
# ---------------------------------------------------------------------------------------------------------------------


def _square_wave(phase: torch.Tensor, pixels_per_period: float) -> torch.Tensor:
    """A square wave in [0, 1] with ~1 pixel soft edges (hard edges alias), from a phase in radians."""
    sharpness = max(pixels_per_period / (2 * math.pi), 1.0)
    return (torch.sin(phase) * sharpness).clamp(-1, 1) * 0.5 + 0.5


def _texture(rng: np.random.Generator, u: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """A static background texture at coordinates ``u`` (1, W) and ``v`` (H, 1), in units of the short side
    (``scale`` pixels) -> (3, H, W): smooth gradients, stripes, a checkerboard or smooth noise."""

    def colour() -> torch.Tensor:
        return torch.from_numpy(rng.uniform(-0.9, 0.9, 3).astype(np.float32)).view(3, 1, 1)

    def direction() -> tuple[float, float]:
        angle = rng.uniform(0, 2 * math.pi)
        return math.cos(angle), math.sin(angle)

    kind = rng.choice(["gradient", "stripes", "checker", "noise"])
    if kind == "gradient":
        # two smooth colour ramps in different directions, so hue varies over the frame, not only brightness
        (cx, cy), (dx, dy) = direction(), direction()
        s1 = torch.sin(2 * math.pi * rng.uniform(0.2, 0.8) * (cx * u + cy * v) + rng.uniform(0, 2 * math.pi))
        s2 = torch.sin(2 * math.pi * rng.uniform(0.2, 0.8) * (dx * u + dy * v) + rng.uniform(0, 2 * math.pi))
        return colour() * 0.6 + colour() * 0.4 * s1 + colour() * 0.4 * s2
    if kind == "stripes":
        period = rng.uniform(0.06, 0.3)
        cx, cy = direction()
        s = _square_wave(2 * math.pi * (cx * u + cy * v) / period + rng.uniform(0, 2 * math.pi), period * scale)
        return torch.lerp(colour(), colour(), s)
    if kind == "checker":
        period = rng.uniform(0.1, 0.4)
        cx, cy = direction()
        a = _square_wave(2 * math.pi * (cx * u + cy * v) / period, period * scale) * 2 - 1
        b = _square_wave(2 * math.pi * (-cy * u + cx * v) / period, period * scale) * 2 - 1
        return torch.lerp(colour(), colour(), a * b * 0.5 + 0.5)
    # smooth noise: a few random plane waves per channel, amplitude falling with frequency (roughly 1/f, like photos)
    channels = []
    for _ in range(3):
        acc = torch.zeros(v.shape[0], u.shape[1])
        for _ in range(6):
            freq = rng.uniform(0.5, 4.0)
            fx, fy = direction()
            acc += torch.sin(2 * math.pi * freq * (fx * u + fy * v) + rng.uniform(0, 2 * math.pi)) / freq
        channels.append(acc)
    noise = torch.stack(channels)  # (3, H, W)
    return colour() * 0.5 + noise * (0.5 / noise.abs().amax().clamp_min(1e-6))


def _background(rng: np.random.Generator, frames: int, height: int, width: int) -> torch.Tensor:
    """A texture seen by a camera panning at constant velocity (in most clips) -> (3, T, H, W).

    The texture is drawn once, large enough for the whole pan, and each frame resamples a shifted window
    (bilinear, so sub-pixel pans move smoothly): T times cheaper than evaluating the texture per frame.
    """
    short = float(min(height, width))
    pan_y, pan_x = rng.uniform(-1.5, 1.5, 2) * short / 64 if rng.random() < 0.7 else (0.0, 0.0)  # pixels/frame
    extra_y = math.ceil(abs(pan_y) * (frames - 1)) + 1
    extra_x = math.ceil(abs(pan_x) * (frames - 1)) + 1
    tex_h, tex_w = height + extra_y, width + extra_x
    u = (torch.arange(tex_w, dtype=torch.float32).view(1, tex_w) + 0.5) / short
    v = (torch.arange(tex_h, dtype=torch.float32).view(tex_h, 1) + 0.5) / short
    texture = _texture(rng, u, v, short).expand(3, tex_h, tex_w)
    t = torch.arange(frames, dtype=torch.float32)
    # top-left of frame f in texture pixels, kept inside the texture for the whole pan
    top = (t * pan_y + max(0.0, -pan_y * (frames - 1))).view(frames, 1, 1)
    left = (t * pan_x + max(0.0, -pan_x * (frames - 1))).view(frames, 1, 1)
    # pixel positions -> grid_sample's [-1, 1] (align_corners=False: pixel p's centre is at (2p + 1) / size - 1)
    gy = (2 * (torch.arange(height, dtype=torch.float32).view(1, height, 1) + top) + 1) / tex_h - 1  # (T, H, 1)
    gx = (2 * (torch.arange(width, dtype=torch.float32).view(1, 1, width) + left) + 1) / tex_w - 1  # (T, 1, W)
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)  # (T, H, W, 2) as (x, y)
    batch = texture.unsqueeze(0).expand(frames, 3, tex_h, tex_w)  # (T, 3, h, w)
    shifted = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return shifted.transpose(0, 1).contiguous()  # (T, 3, H, W) -> (3, T, H, W)


def _trajectory(rng: np.random.Generator, t: np.ndarray, length: int, margin: float, speed: float, wrap: bool):
    """Centre positions over time (T,) along an axis of ``length`` pixels: constant velocity, then either
    wrapping around (modulo) or bouncing off the walls (a triangle wave keeping ``margin`` from them)."""
    velocity = speed * rng.choice([-1.0, 1.0])
    if wrap:
        return np.remainder(rng.uniform(0, length) + velocity * t, length)
    span = max(length - 2 * margin, 1e-3)
    q = np.remainder(rng.uniform(0, span) + velocity * t, 2 * span)
    return margin + span - np.abs(q - span)


def _composite_shape(rng: np.random.Generator, video: torch.Tensor) -> None:
    """Draw one moving shape over ``video`` (3, T, H, W) in place.

    The shape comes from a signed distance ``sd`` (negative inside) with ``alpha = clamp(0.5 - sd)``, a one-pixel
    antialiased edge, so sub-pixel motion still changes the frame. Per-frame quantities are (T, 1, 1), per-row
    ones (T, H, 1) and per-column ones (T, 1, W); only the final combinations are full (T, H, W).
    """
    _, frames, height, width = video.shape
    short = min(height, width)
    size = rng.uniform(0.08, 0.24) * short  # circumradius / half-extent, pixels
    speed = rng.uniform(0.3, 2.5) * short / 64  # pixels per frame
    angle = rng.uniform(0, 2 * math.pi)
    speed_y, speed_x = abs(math.sin(angle)) * speed + 0.1, abs(math.cos(angle)) * speed + 0.1
    wrap = bool(rng.random() < 0.4)
    t = np.arange(frames, dtype=np.float64)
    cy = _trajectory(rng, t, height, size, speed_y, wrap)
    cx = _trajectory(rng, t, width, size, speed_x, wrap)
    theta = rng.uniform(0, 2 * math.pi) + rng.uniform(-0.08, 0.08) * t  # spin, radians per frame

    def per_frame(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32)).view(frames, 1, 1)

    dy = torch.arange(height, dtype=torch.float32).view(1, height, 1) + 0.5 - per_frame(cy)  # (T, H, 1)
    dx = torch.arange(width, dtype=torch.float32).view(1, 1, width) + 0.5 - per_frame(cx)  # (T, 1, W)
    if wrap:  # periodic offsets: a shape crossing an edge shows on both sides instead of popping
        dy = torch.remainder(dy + height / 2, height) - height / 2
        dx = torch.remainder(dx + width / 2, width) - width / 2
    cos, sin = per_frame(np.cos(theta)), per_frame(np.sin(theta))
    rx, ry = cos * dx + sin * dy, cos * dy - sin * dx  # shape-local coordinates, (T, H, W)

    kind = rng.choice(["circle", "rectangle", "triangle"])
    if kind == "circle":
        sd = torch.hypot(dx, dy) - size
    elif kind == "rectangle":
        sd = torch.maximum(rx.abs() - size, ry.abs() - size * rng.uniform(0.4, 1.0))
    else:  # equilateral: outside any of its three edges (inradius = circumradius / 2)
        sd = ry.clone()
        for a in (math.pi / 2 + 2 * math.pi / 3, -math.pi / 6):
            sd = torch.maximum(sd, math.cos(a) * rx + math.sin(a) * ry)
        sd -= size / 2
    alpha = (0.5 - sd).clamp_(0, 1)  # (T, H, W)

    fill = torch.from_numpy(rng.uniform(-1, 1, 3).astype(np.float32)).view(3, 1, 1, 1)
    if rng.random() < 0.35:  # a texture that moves and turns with the shape
        period = rng.uniform(0.15, 0.5) * size + 2
        fill = fill + 0.35 * torch.sin(rx * (2 * math.pi / period))
    video.lerp_(fill.expand_as(video), alpha)  # "over" compositing


def synthetic_clip(rng: np.random.Generator, frames: int, height: int, width: int) -> torch.Tensor:
    """A procedural clip (3, frames, height, width) float32 in [-1, 1] drawn from ``rng``: 1-5 moving shapes
    (circles, rectangles, triangles; bouncing or wrapping, some spinning or textured) over a gradient, stripes,
    checkerboard or smooth-noise background that pans in most clips."""
    video = _background(rng, frames, height, width)
    for _ in range(int(rng.integers(1, 6))):
        _composite_shape(rng, video)
    return video.clamp_(-1, 1)


class SyntheticVideoDataset(Dataset):
    """``num_clips`` procedural clips (3, frames, height, width) float32 in [-1, 1], item ``i`` seeded by
    ``(seed, i)``: the same in every process and run, with nothing to download.

    Shapes move by at least ~0.1 pixel per frame with antialiased edges, so consecutive frames always differ; the
    variety (textures, edges, flat regions, motion, pans) is what a small VAE needs to learn something
    recognizable. Any positive ``height``/``width`` works here; :func:`make_dataset` checks them against the
    model's ``spatial_factor``.
    """

    def __init__(self, num_clips: int, frames: int, height: int, width: int, seed: int = 0, temporal_factor: int = 4):
        if not isinstance(num_clips, int) or num_clips < 1:
            raise InputError(f"num_clips must be a positive integer, got {num_clips!r}")
        if not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        validate_clip_shape(frames, height, width, spatial_factor=1, temporal_factor=temporal_factor)
        self.num_clips, self.frames, self.height, self.width, self.seed = num_clips, frames, height, width, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_clips

    def set_epoch(self, epoch: int) -> None:
        """Accepted for a uniform dataset interface; synthetic clips do not change between epochs."""
        self.epoch = int(epoch)

    def clip(self, index: int, epoch: int = 0) -> torch.Tensor:
        """Clip ``index`` (3, T, H, W); ``epoch`` is ignored (see :meth:`set_epoch`)."""
        index = _check_index(index, self.num_clips)
        rng = np.random.default_rng([self.seed, index])
        return synthetic_clip(rng, self.frames, self.height, self.width)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.clip(index)


# ---------------------------------------------------------------------------------------------------------------------
# Folders of videos and image sequences
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Clip:
    """One source clip: a video file, or an image-sequence folder with its frame files in order."""

    path: str
    num_frames: int
    frame_files: tuple[str, ...] = ()


def _natural_key(name: str):
    """Sort key comparing digit runs as numbers, so frame_2.png comes before frame_10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _discover(root: str) -> list[tuple[str, tuple[str, ...]]]:
    """``[(path, frame_files)]`` under ``root`` in a fixed order: every video file is a clip (empty
    ``frame_files``), and every folder holding images (``root`` included) is one image-sequence clip. Hidden
    files and folders (``.name``, e.g. macOS ``._clip.mp4``) are ignored; symlinked subfolders are not followed."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=_natural_key)
        files = sorted((f for f in files if not f.startswith(".")), key=_natural_key)
        images = tuple(os.path.join(folder, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
        if images:
            found.append((folder, images))
        found.extend((os.path.join(folder, f), ()) for f in files if f.lower().endswith(VIDEO_EXTENSIONS))
    return found


def _probe(entry: tuple[str, tuple[str, ...]]) -> int:
    """The frame count of a discovered clip, reading headers only (no decoding); raises on unreadable files."""
    import imageio.v3 as iio

    path, frame_files = entry
    if frame_files:
        iio.improps(frame_files[0])  # the first frame must at least open
        return len(frame_files)
    if path.lower().endswith(".gif"):
        return int(iio.improps(path).n_images)
    import imageio_ffmpeg

    # counts packets with stream copy: exact for constant-frame-rate video and fast, as nothing is decoded
    return int(imageio_ffmpeg.count_frames_and_secs(path)[0])


def _to_float_rgb(frame: np.ndarray) -> torch.Tensor:
    """An image array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), uint8/uint16/float -> (3, H, W) in [-1, 1]."""
    if frame.ndim == 2:
        frame = frame[..., None]
    frame = frame[..., :3]
    if frame.shape[-1] == 1:
        frame = np.repeat(frame, 3, axis=-1)
    if np.issubdtype(frame.dtype, np.integer):
        x = torch.from_numpy(frame.astype(np.float32)) / float(np.iinfo(frame.dtype).max)
    else:
        x = torch.from_numpy(frame.astype(np.float32))
    return x.permute(2, 0, 1).mul(2).sub(1)


def _resize_crop(frame: np.ndarray, height: int, width: int, u_y: float, u_x: float) -> torch.Tensor:
    """(h, w, C) image -> (3, height, width): aspect-preserving resize so the image covers the target, then a crop
    at fraction (u_y, u_x) of the slack (0.5 = centre). Antialiased, so downscaling does not alias."""
    x = _to_float_rgb(frame)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        # (3, h, w) -> (1, 3, nh, nw) -> (3, nh, nw)
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top = min(int(u_y * (nh - height + 1)), nh - height)
    left = min(int(u_x * (nw - width + 1)), nw - width)
    return x[:, top : top + height, left : left + width].clamp(-1, 1)


class VideoFolderDataset(Dataset):
    """Clips (3, frames, height, width) float32 in [-1, 1] from the videos and image-sequence folders under
    ``root``.

    Discovery (sorted, so every rank sees the same list): each file with an extension in :data:`VIDEO_EXTENSIONS`
    is one clip; each folder holding files with an extension in :data:`IMAGE_EXTENSIONS` is one clip, its frames
    in natural name order (``2.png`` before ``10.png``).

    Each item takes ``frames`` frames ``frame_stride`` apart, starting at frame 0, or at a random offset when
    ``random_offset``; resizes them keeping the aspect ratio so the shorter side covers the target; and crops
    ``(height, width)`` from the centre, or at a random position when ``random_crop``. The random draws come from
    ``numpy.random.default_rng([seed, epoch, index])``: the same on every rank and DataLoader worker, new each
    epoch (:meth:`set_epoch`).

    Decisions:

    * Short clips (fewer than ``(frames - 1) * frame_stride + 1`` source frames): ``short_clips="skip"`` (default)
      drops them at construction with one warning that counts them; ``"loop"`` keeps them and repeats the clip
      from its start (a visible cut where it wraps).
    * Unreadable files: frame counts are probed at construction (headers only, in ``probe_workers`` threads);
      files that fail are skipped with a warning naming each one. A file that probes fine but fails to decode
      later raises :class:`~parallel_vae.errors.InputError` naming it: substituting another clip silently would
      hide the broken file.
    * No usable clip at all: :class:`~parallel_vae.errors.InputError` naming the folder, the accepted extensions
      and why clips were skipped.

    :attr:`skipped` maps each skipped path to the reason.
    """

    def __init__(
        self,
        root: str,
        frames: int,
        height: int,
        width: int,
        spatial_factor: int,
        *,
        seed: int = 0,
        random_offset: bool = True,
        random_crop: bool = False,
        frame_stride: int = 1,
        short_clips: str = "skip",
        probe_workers: int = 8,
        temporal_factor: int = 4,
    ):
        validate_clip_shape(frames, height, width, spatial_factor, temporal_factor)
        if not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(frame_stride, int) or frame_stride < 1:
            raise InputError(f"frame_stride must be a positive integer, got {frame_stride!r}")
        if short_clips not in SHORT_CLIP_POLICIES:
            raise InputError(f"short_clips={short_clips!r}; choose one of {SHORT_CLIP_POLICIES}")
        if not os.path.isdir(root):
            raise InputError(f"dataset folder not found: {root}")
        self.root, self.frames, self.height, self.width = root, frames, height, width
        self.seed, self.random_offset, self.random_crop = seed, random_offset, random_crop
        self.frame_stride, self.short_clips = frame_stride, short_clips
        self.epoch = 0
        self.span = (frames - 1) * frame_stride + 1  # source frames one clip covers

        entries = _discover(root)
        with ThreadPoolExecutor(max_workers=max(1, probe_workers)) as pool:  # ffmpeg subprocesses: threads suffice
            counts = list(pool.map(_probe_or_error, entries))
        self.clips: list[_Clip] = []
        self.skipped: dict[str, str] = {}
        for (path, frame_files), count in zip(entries, counts):
            if isinstance(count, str):
                self.skipped[path] = f"unreadable ({count})"
            elif count < 1:
                self.skipped[path] = "no frames"
            elif count < self.span and short_clips == "skip":
                self.skipped[path] = f"too short ({count} frames, need {self.span})"
            else:
                self.clips.append(_Clip(path, count, frame_files))

        accepted = f"videos {', '.join(VIDEO_EXTENSIONS)} or folders of images {', '.join(IMAGE_EXTENSIONS)}"
        if not self.clips:
            why = f"; skipped {len(self.skipped)}: " + _summarize(self.skipped) if self.skipped else ""
            raise InputError(f"no usable clips in {root} (looked for {accepted}){why}")
        if self.skipped:
            warnings.warn(
                f"VideoFolderDataset({root}): using {len(self.clips)} clips, skipped {len(self.skipped)}: "
                + _summarize(self.skipped),
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose offsets and crops ``dataset[i]`` returns (call it on every rank alike)."""
        self.epoch = int(epoch)

    def clip(self, index: int, epoch: int = 0) -> torch.Tensor:
        """Clip ``index`` at ``epoch`` (3, T, H, W): a pure function of ``(files, seed, epoch, index)``."""
        index = _check_index(index, len(self.clips))
        clip = self.clips[index]
        # always draw all three, so one choice never shifts another's random stream
        u_t, u_y, u_x = np.random.default_rng([self.seed, int(epoch), index]).random(3)
        if not self.random_crop:
            u_y = u_x = 0.5
        if clip.num_frames >= self.span:
            start = int(u_t * (clip.num_frames - self.span + 1)) if self.random_offset else 0
            wanted = [start + k * self.frame_stride for k in range(self.frames)]
        else:  # short_clips == "loop"
            wanted = [(k * self.frame_stride) % clip.num_frames for k in range(self.frames)]
        loaded = self._read(clip, sorted(set(wanted)), float(u_y), float(u_x))
        return torch.stack([loaded[i] for i in wanted], dim=1)  # T x (3, H, W) -> (3, T, H, W)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.clip(index, self.epoch)

    def _read(self, clip: _Clip, indices: Sequence[int], u_y: float, u_x: float) -> dict[int, torch.Tensor]:
        """``{frame index: (3, H, W)}`` for the sorted ``indices``, each resized and cropped as soon as it is
        decoded, so memory scales with the target size rather than the source resolution."""
        import imageio.v2 as iio2
        import imageio.v3 as iio

        out = {}
        if clip.frame_files:
            for i in indices:
                try:
                    frame = iio.imread(clip.frame_files[i])
                except Exception as e:  # imageio raises many types for broken files
                    raise InputError(f"cannot read frame {clip.frame_files[i]}: {_error_text(e)}") from e
                out[i] = _resize_crop(frame, self.height, self.width, u_y, u_x)
            return out
        try:
            # the v2 reader seeks (ffmpeg -ss, accurate) instead of decoding everything before a late offset
            with iio2.get_reader(clip.path) as reader:
                for i in indices:
                    out[i] = _resize_crop(reader.get_data(i), self.height, self.width, u_y, u_x)
        except (IndexError, EOFError) as e:
            raise InputError(
                f"video {clip.path} ended before frame {i} although its header reports {clip.num_frames} frames "
                f"(truncated or variable frame rate?); re-encode or remove it"
            ) from e
        except Exception as e:
            raise InputError(f"cannot read video {clip.path}: {_error_text(e)}") from e
        return out


def _probe_or_error(entry: tuple[str, tuple[str, ...]]):
    """:func:`_probe`, returning the error text instead of raising (for the thread pool)."""
    try:
        return _probe(entry)
    except Exception as e:  # imageio / ffmpeg raise many types for unreadable files
        return _error_text(e)


def _error_text(error: Exception) -> str:
    """One line for an error: ffmpeg's errors carry its whole banner, and the cause is the last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__


def _summarize(skipped: dict[str, str], limit: int = 5) -> str:
    items = [f"{path}: {reason}" for path, reason in list(skipped.items())[:limit]]
    more = f"; ... and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return "; ".join(items) + more


# ---------------------------------------------------------------------------------------------------------------------
# Choosing a dataset, and sharding it over data-parallel replicas
# ---------------------------------------------------------------------------------------------------------------------


def make_dataset(
    spec: str,
    frames: int,
    height: int,
    width: int,
    spatial_factor: int,
    seed: int = 0,
    temporal_factor: int = 4,
    **folder_options,
) -> Dataset:
    """``"synthetic"`` (:data:`DEFAULT_SYNTHETIC_CLIPS` clips), ``"synthetic:N"`` (N clips) or a folder path ->
    :class:`SyntheticVideoDataset` / :class:`VideoFolderDataset` of (3, frames, height, width) clips.

    The shape is checked against ``spatial_factor`` for both kinds, so a bad size fails before any file is read.
    ``folder_options`` (``random_offset``, ``random_crop``, ``frame_stride``, ``short_clips``, ...) go to
    :class:`VideoFolderDataset`. A folder actually named ``synthetic`` is reached as ``./synthetic``.
    """
    validate_clip_shape(frames, height, width, spatial_factor, temporal_factor)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        if folder_options:
            raise InputError(f"options {sorted(folder_options)} apply to folder datasets, not {spec!r}")
        count = spec.partition(":")[2]
        if count and not (count.isdigit() and int(count) > 0):
            raise InputError(f"dataset {spec!r}: expected 'synthetic:N' with N a positive integer")
        num_clips = int(count) if count else DEFAULT_SYNTHETIC_CLIPS
        return SyntheticVideoDataset(num_clips, frames, height, width, seed=seed, temporal_factor=temporal_factor)
    if os.path.isdir(spec):
        return VideoFolderDataset(
            spec, frames, height, width, spatial_factor, seed=seed, temporal_factor=temporal_factor, **folder_options
        )
    raise InputError(f"dataset {spec!r} is neither 'synthetic', 'synthetic:N' nor an existing folder")


def data_parallel_sampler(
    dataset, *, dp_rank: int, dp_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False
) -> DistributedSampler:
    """``torch.utils.data.DistributedSampler`` over the ``dp_size`` data-parallel replicas, as replica ``dp_rank``.

    Pass the *data-parallel* rank (``rank // sp_degree`` when spatial groups are consecutive ranks), not the
    global rank: the spatial ranks of one replica must get identical indices, and the sampler's permutation
    depends only on ``(seed, epoch)``. Every replica gets the same number of indices (padded by repeats unless
    ``drop_last``), so no replica runs out of steps before the others. Call ``set_epoch`` on it every epoch.
    """
    if not (isinstance(dp_size, int) and dp_size >= 1 and isinstance(dp_rank, int) and 0 <= dp_rank < dp_size):
        raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank!r}, dp_size={dp_size!r}")
    return DistributedSampler(
        dataset, num_replicas=dp_size, rank=dp_rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )


def shard_indices(
    dp_rank: int,
    dp_size: int,
    length: int,
    epoch: int = 0,
    seed: int = 0,
    *,
    shuffle: bool = True,
    drop_last: bool = False,
) -> list[int]:
    """The dataset indices replica ``dp_rank`` of ``dp_size`` consumes in ``epoch``: exactly what
    :func:`data_parallel_sampler` yields, as a list (for loops that index the dataset themselves)."""
    sampler = data_parallel_sampler(
        range(length), dp_rank=dp_rank, dp_size=dp_size, seed=seed, shuffle=shuffle, drop_last=drop_last
    )
    sampler.set_epoch(epoch)
    return list(sampler)

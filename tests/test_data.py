"""parallel_vae.jobs.data: deterministic clips of the right shape, folder decoding/resizing, and data-parallel sharding."""

from __future__ import annotations

import os
import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from parallel_vae.jobs.data import (
    DEFAULT_SYNTHETIC_CLIPS,
    SyntheticVideoDataset,
    VideoFolderDataset,
    data_parallel_sampler,
    make_dataset,
    shard_indices,
    validate_clip_shape,
)
from parallel_vae.errors import InputError
from parallel_vae.jobs.video import write_video


@pytest.fixture(autouse=True)
def _one_thread():
    """Run as DataLoader workers do (one intra-op thread): multi-threading these small ops only adds sync cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_clip(clip: torch.Tensor, frames: int, height: int, width: int) -> None:
    assert clip.shape == (3, frames, height, width)
    assert clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1
    assert torch.isfinite(clip).all()


def _gray_frames(values, height: int, width: int) -> torch.Tensor:
    """A video (3, T, H, W) whose frame t is flat gray ``values[t]`` (uint8 levels): lossy codecs keep flat frames
    almost exact, so a decoded frame's mean tells which source frame it was."""
    levels = torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1) / 127.5 - 1
    return levels.expand(3, len(values), height, width).contiguous()


def _level(clip: torch.Tensor) -> np.ndarray:
    """Per-frame mean as a uint8 level, (T,)."""
    return ((clip.mean(dim=(0, 2, 3)) + 1) * 127.5).numpy()


def _write_pngs(folder, frames: np.ndarray) -> None:
    """(T, H, W, 3) uint8 -> folder/frame_<t>.png, unpadded numbers so name order != natural order."""
    os.makedirs(folder, exist_ok=True)
    for t, frame in enumerate(frames):
        iio.imwrite(os.path.join(folder, f"frame_{t}.png"), frame)


# ---------------------------------------------------------------------------------------------------------------------
# shape validation
# ---------------------------------------------------------------------------------------------------------------------


def test_validate_clip_shape_names_nearest_valid_values():
    validate_clip_shape(1, 16, 32, 16)
    validate_clip_shape(17, 64, 96, 8)
    with pytest.raises(ValueError, match=r"frames=16 is not 1 \+ 4k.*nearest valid: 13 or 17"):
        validate_clip_shape(16, 64, 64, 8)
    with pytest.raises(ValueError, match=r"frames=0 .*nearest valid: 1"):
        validate_clip_shape(0, 64, 64, 8)
    validate_clip_shape(13, 64, 64, 8, temporal_factor=6)  # Mochi: 1 + 6k
    with pytest.raises(ValueError, match=r"frames=9 is not 1 \+ 6k.*nearest valid: 7 or 13"):
        validate_clip_shape(9, 64, 64, 8, temporal_factor=6)
    with pytest.raises(ValueError, match=r"height=72 .*spatial_factor=16.*nearest valid: 64 or 80"):
        validate_clip_shape(17, 72, 64, 16)
    with pytest.raises(ValueError, match=r"width=12 .*spatial_factor=16.*nearest valid: 16$"):
        validate_clip_shape(17, 64, 12, 16)
    with pytest.raises(InputError):  # the recipes' error type for bad user input
        validate_clip_shape(17, 64, 65, 8)


# ---------------------------------------------------------------------------------------------------------------------
# SyntheticVideoDataset
# ---------------------------------------------------------------------------------------------------------------------


def test_synthetic_shape_dtype_range_and_length():
    ds = SyntheticVideoDataset(6, 17, 32, 48, seed=0)
    assert len(ds) == 6
    for i in range(len(ds)):
        _check_clip(ds[i], 17, 32, 48)
    _check_clip(SyntheticVideoDataset(1, 1, 24, 40)[0], 1, 24, 40)  # a single frame, odd sizes
    with pytest.raises(IndexError):
        ds[6]
    assert torch.equal(ds[-1], ds[5])


def test_synthetic_is_deterministic_and_ignores_global_rng():
    a = SyntheticVideoDataset(8, 9, 32, 48, seed=7)
    torch.manual_seed(1)
    np.random.seed(1)
    first = [a[i] for i in (0, 3, 7)]
    torch.manual_seed(2)
    np.random.seed(2)
    b = SyntheticVideoDataset(8, 9, 32, 48, seed=7)  # a fresh object, as in another process
    for x, i in zip(first, (0, 3, 7)):
        assert torch.equal(x, a[i])
        assert torch.equal(x, b[i])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], SyntheticVideoDataset(8, 9, 32, 48, seed=8)[0])


def test_synthetic_clips_move_and_are_not_flat():
    ds = SyntheticVideoDataset(48, 17, 32, 48, seed=0)
    for i in range(len(ds)):
        clip = ds[i]
        step = (clip[:, 1:] - clip[:, :-1]).abs().mean(dim=(0, 2, 3))  # (T-1,) mean change per frame step
        assert (step > 1e-4).all(), f"clip {i} has a still frame step: {step.min():.2e}"
        assert clip.std() > 0.05, f"clip {i} is nearly flat"
        assert clip[:, 0].std(dim=(1, 2)).max() > 0.05, f"clip {i}'s first frame has no spatial structure"


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="13 or 17"):
        SyntheticVideoDataset(4, 16, 32, 32)
    with pytest.raises(ValueError, match="num_clips"):
        SyntheticVideoDataset(0, 17, 32, 32)
    with pytest.raises(ValueError, match="seed"):
        SyntheticVideoDataset(4, 17, 32, 32, seed=-1)


# ---------------------------------------------------------------------------------------------------------------------
# VideoFolderDataset
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/ramp.mp4 (25 frames, levels 20, 28, ...), root/short.mp4 (9 frames), root/broken.mp4 (not a video),
    root/seq/ (12 PNGs, levels 40, 50, ...), root/anim.gif (17 frames), all 40x60."""
    root = tmp_path_factory.mktemp("videos")
    write_video(_gray_frames([20 + 8 * t for t in range(25)], 40, 60), str(root / "ramp.mp4"))
    write_video(_gray_frames([30 + 20 * t for t in range(9)], 40, 60), str(root / "short.mp4"))
    (root / "broken.mp4").write_bytes(b"this is not a video")
    seq = np.stack([np.full((40, 60, 3), 40 + 10 * t, np.uint8) for t in range(12)])
    _write_pngs(root / "seq", seq)
    gif = SyntheticVideoDataset(1, 17, 40, 60)[0]
    iio.imwrite(root / "anim.gif", ((gif.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy())
    return root


def _quiet(*args, **kwargs) -> VideoFolderDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VideoFolderDataset(*args, **kwargs)


def test_folder_discovers_clips_and_skips_short_and_unreadable(folder):
    with pytest.warns(UserWarning, match=r"using 2 clips, skipped 3") as record:
        ds = VideoFolderDataset(str(folder), 17, 32, 48, 16)
    message = str(record[0].message)
    assert "broken.mp4: unreadable" in message
    assert "short.mp4: too short (9 frames, need 17)" in message and "seq: too short (12 frames" in message
    assert [os.path.basename(c.path) for c in ds.clips] == ["anim.gif", "ramp.mp4"]
    assert set(map(os.path.basename, ds.skipped)) == {"broken.mp4", "short.mp4", "seq"}
    for i in range(len(ds)):
        _check_clip(ds[i], 17, 32, 48)


def test_folder_image_sequence_in_natural_order(folder):
    ds = _quiet(str(folder), 9, 16, 32, 16, random_offset=False)
    seq = next(i for i, c in enumerate(ds.clips) if c.path.endswith("seq"))
    # frame_10.png sorts before frame_2.png by plain name; natural order keeps 0, 1, 2, ..., 8
    np.testing.assert_allclose(_level(ds[seq]), [40 + 10 * t for t in range(9)], atol=0.6)


def test_folder_temporal_offset_stride_and_determinism(folder):
    kwargs = dict(seed=3, random_offset=True, random_crop=True)
    ds = _quiet(str(folder), 9, 32, 48, 16, **kwargs)
    ramp = next(i for i, c in enumerate(ds.clips) if c.path.endswith("ramp.mp4"))
    other_rank = _quiet(str(folder), 9, 32, 48, 16, **kwargs)  # a fresh object, as on another rank
    starts = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        clip = ds[ramp]
        other_rank.set_epoch(epoch)
        assert torch.equal(clip, other_rank[ramp])
        assert torch.equal(clip, ds.clip(ramp, epoch))
        levels = _level(clip)
        np.testing.assert_allclose(np.diff(levels), 8, atol=1.5)  # consecutive source frames
        start = round((levels[0] - 20) / 8)
        assert 0 <= start <= 25 - 9
        starts.add(start)
    assert len(starts) > 1, "the random temporal offset never changed across epochs"

    fixed = _quiet(str(folder), 5, 32, 48, 16, random_offset=False, frame_stride=3)
    np.testing.assert_allclose(_level(fixed[ramp]), [20 + 8 * 3 * k for k in range(5)], atol=1.5)


def test_folder_loops_short_clips_when_asked(folder):
    ds = _quiet(str(folder), 17, 32, 48, 16, short_clips="loop", random_offset=False)
    short = next(i for i, c in enumerate(ds.clips) if c.path.endswith("short.mp4"))
    expected = [30 + 20 * (k % 9) for k in range(17)]
    np.testing.assert_allclose(_level(ds[short]), expected, atol=1.5)
    with pytest.raises(ValueError, match="short_clips"):
        VideoFolderDataset(str(folder), 17, 32, 48, 16, short_clips="pad")


def test_folder_resize_preserves_aspect_and_center_crops(tmp_path):
    # 20 x 40 frames with a red vertical band over columns 15..24; target 32 x 32 scales by 1.6 to 32 x 64 and
    # crops columns 16..47, so the band lands on output columns 8..23 (16 wide). Squashing would make it 8 wide.
    frame = np.zeros((20, 40, 3), np.uint8)
    frame[..., 2] = 255
    frame[:, 15:25] = (255, 0, 0)
    _write_pngs(tmp_path / "band", np.stack([frame] * 5))
    clip = VideoFolderDataset(str(tmp_path), 5, 32, 32, 16)[0]
    _check_clip(clip, 5, 32, 32)
    red = (clip[0, 0] > 0.5) & (clip[2, 0] < -0.5)  # (H, W)
    columns = red.all(dim=0).nonzero().flatten().tolist()
    assert columns[0] in (8, 9) and columns[-1] in (22, 23) and len(columns) >= 14
    assert not red[:, :6].any() and not red[:, 26:].any()


def test_folder_random_crop_is_a_window_of_the_source(tmp_path):
    # a 16 x 96 gradient and a 16 x 32 target: no resize, so each crop is an exact window of the source
    ramp = np.broadcast_to(np.arange(96, dtype=np.uint8)[None, :, None] * 2, (16, 96, 3)).copy()
    _write_pngs(tmp_path / "wide", np.stack([ramp] * 5))
    center = VideoFolderDataset(str(tmp_path), 5, 16, 32, 16, random_crop=False)[0]
    source = torch.from_numpy(ramp).float().div(127.5).sub(1).permute(2, 0, 1)  # (3, H, W)
    assert torch.allclose(center[:, 0], source[:, :, 32:64])
    ds = VideoFolderDataset(str(tmp_path), 5, 16, 32, 16, random_crop=True, seed=0)
    lefts = set()
    for epoch in range(8):
        first = ds.clip(0, epoch)[:, 0]
        left = round(float((first[0, 0, 0] + 1) * 127.5) / 2)
        assert torch.allclose(first, source[:, :, left : left + 32])
        lefts.add(left)
    assert len(lefts) > 1


def test_folder_rejects_invalid_sizes_empty_and_unusable_folders(folder, tmp_path):
    with pytest.raises(ValueError, match=r"height=40 is not a positive multiple of spatial_factor=16.*32 or 48"):
        VideoFolderDataset(str(folder), 17, 40, 48, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no usable clips in .*empty.*\.mp4.*\.png"):
        VideoFolderDataset(str(tmp_path / "empty"), 17, 32, 32, 16)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.mp4").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"no usable clips in .*bad.*x\.mp4: unreadable"):
        VideoFolderDataset(str(tmp_path / "bad"), 17, 32, 32, 16)
    with pytest.raises(ValueError, match="not found"):
        VideoFolderDataset(str(tmp_path / "missing"), 17, 32, 32, 16)


def test_folder_decode_failure_after_construction_names_the_file(tmp_path):
    write_video(_gray_frames([100] * 5, 16, 16), str(tmp_path / "clip.mp4"))
    _write_pngs(tmp_path / "seq", np.full((5, 16, 16, 3), 50, np.uint8))
    ds = VideoFolderDataset(str(tmp_path), 5, 16, 16, 16)
    (tmp_path / "clip.mp4").write_bytes(b"truncated")
    (tmp_path / "seq" / "frame_3.png").write_bytes(b"truncated")
    names = [os.path.basename(c.path) for c in ds.clips]
    with pytest.raises(InputError, match=r"clip\.mp4"):
        ds[names.index("clip.mp4")]
    with pytest.raises(InputError, match=r"frame_3\.png"):
        ds[names.index("seq")]


# ---------------------------------------------------------------------------------------------------------------------
# make_dataset
# ---------------------------------------------------------------------------------------------------------------------


def test_make_dataset_specs(folder):
    ds = make_dataset("synthetic", 17, 32, 32, 16, seed=1)
    assert isinstance(ds, SyntheticVideoDataset) and len(ds) == DEFAULT_SYNTHETIC_CLIPS
    small = make_dataset("synthetic:5", 5, 16, 32, 8, seed=1)
    assert len(small) == 5
    _check_clip(small[4], 5, 16, 32)
    assert torch.equal(small[2], SyntheticVideoDataset(5, 5, 16, 32, seed=1)[2])
    fds = make_dataset(str(folder), 9, 32, 48, 16, seed=1, short_clips="loop")
    assert isinstance(fds, VideoFolderDataset) and len(fds) == 4

    with pytest.raises(ValueError, match=r"height=20 .*spatial_factor=16.*nearest valid: 16 or 32"):
        make_dataset("synthetic", 17, 20, 32, 16)
    with pytest.raises(ValueError, match="synthetic:N"):
        make_dataset("synthetic:many", 17, 32, 32, 16)
    with pytest.raises(ValueError, match="folder datasets"):
        make_dataset("synthetic:4", 17, 32, 32, 16, random_crop=True)
    with pytest.raises(ValueError, match="neither 'synthetic'"):
        make_dataset(str(folder / "nowhere"), 17, 32, 32, 16)


# ---------------------------------------------------------------------------------------------------------------------
# data-parallel sharding with spatial groups
# ---------------------------------------------------------------------------------------------------------------------


def test_sampler_keyed_on_data_parallel_rank():
    # world of 6 ranks = 3 replicas x 2 spatial ranks (consecutive ranks form a spatial group)
    sp, dp, length = 2, 3, 20
    for epoch in (0, 1):
        per_rank = [shard_indices(rank // sp, dp, length, epoch=epoch, seed=5) for rank in range(sp * dp)]
        for d in range(dp):
            assert per_rank[d * sp] == per_rank[d * sp + 1], "spatial ranks of one replica must read the same clips"
        replicas = [set(per_rank[d * sp]) for d in range(dp)]
        assert len({len(per_rank[d * sp]) for d in range(dp)}) == 1  # equal step counts
        assert set().union(*replicas) == set(range(length))
    no_pad = [shard_indices(d, dp, length, epoch=0, seed=5, drop_last=True) for d in range(dp)]
    assert all(len(x) == length // dp for x in no_pad)
    assert not (set(no_pad[0]) & set(no_pad[1])) and not (set(no_pad[1]) & set(no_pad[2]))
    assert shard_indices(0, dp, length, epoch=0, seed=5) != shard_indices(0, dp, length, epoch=1, seed=5)
    with pytest.raises(ValueError, match="dp_rank"):
        shard_indices(3, 3, length)


def test_sampler_and_loader_give_spatial_ranks_identical_batches():
    ds = SyntheticVideoDataset(8, 5, 16, 16, seed=0)

    def batches(dp_rank: int) -> list[torch.Tensor]:
        sampler = data_parallel_sampler(ds, dp_rank=dp_rank, dp_size=2, seed=1)
        sampler.set_epoch(1)
        return list(DataLoader(ds, batch_size=2, sampler=sampler))

    rank0, rank1, rank2 = batches(0), batches(0), batches(1)  # global ranks 0, 1 (replica 0) and 2 (replica 1)
    assert len(rank0) == 2 and rank0[0].shape == (2, 3, 5, 16, 16)
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))
    seen0 = {tuple(x.flatten()[:8].tolist()) for b in rank0 for x in b}
    seen2 = {tuple(x.flatten()[:8].tolist()) for b in rank2 for x in b}
    assert not seen0 & seen2

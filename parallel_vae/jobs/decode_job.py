"""The decode job behind ``recipes/decode.py``: load the model (any supported family) and the input, decide
whether to shard, encode and decode through the shared path (:func:`parallel_vae.decode_video` /
:func:`parallel_vae.encode_video`), and write ``video.mp4`` (video families) or ``image.png`` and, for a batch,
``contact_sheet.png`` (image families), and ``metrics.json``.

Every step that can fail on bad input runs inside :meth:`Runtime.agreed`, so all ranks stop together with one
message, before any model collective, and before anything is written. Outputs are written by the main rank only,
into a temporary folder, then moved into place with ``metrics.json`` last (:func:`_commit`): a failed or killed
run never leaves a partial ``video.mp4``, nor new outputs beside an old ``metrics.json``. A round trip also writes
``comparison.mp4`` (input above reconstruction).

``--parallel``:

* ``on``: rows are split over all ranks (needs at least one latent row per rank).
* ``off``: no communication; every rank decodes the whole input with the unmodified model (identical results),
  the main rank writes. On GPUs this costs no wall time (each rank has its own device) and needs no rank to sit
  in a collective for the whole decode. On one shared CPU it multiplies the CPU work: use a 1-process launch.
* ``auto``: ``on`` when the busiest rank's share of the decode is at least ``auto_threshold`` GFLOP (counted from
  the model and the shape on fake tensors; see :data:`AUTO_MIN_GFLOP_PER_RANK` for the measurement), and the rows
  can be split; else ``off``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ._files import TMP_PREFIX, atomic_path, clear_stale
from ..api import enable_spatial_parallelism
from ..errors import InputError
from .loading import denormalize_latents, describe_vae, load_latents, load_vae, parse_dtype, parse_seeded
from .metrics import peak_memory_bytes, psnr, reset_peak_memory, ssim, write_json
from ..pipeline import decode_video, encode_video
from .cli import AUTO_MIN_GFLOP_PER_RANK
from .runtime import Runtime, UsageError, start_tracking
from ..core.sharding import nearest_valid, row_split
from .fake_run import decode_flops_per_rank
from .models import build_seeded_vae
from .video import check_video_size, contact_sheet, demo_video, read_image, read_video, write_image, write_video
from ..families import adapter_for, latent_channels, pixel_channels, spatial_factor

__all__ = ["AUTO_MIN_GFLOP_PER_RANK", "ParallelPlan", "plan_parallel", "DecodeInput", "read_input", "run_decode"]


DEMO_SHAPE = dict(frames=17, height=64, width=96)
# Image families round-trip 4 frames of the demo clip as a batch of images (and so write a contact sheet).
DEMO_IMAGE_FRAMES = (0, 5, 10, 15)


@dataclass(frozen=True)
class ParallelPlan:
    """What ``--parallel`` resolved to, and why (recorded in metrics.json)."""

    requested: str
    shard: bool
    reason: str
    gflop_per_rank: float
    threshold_gflop: float


def plan_parallel(
    mode: str,
    latent_shape: tuple,
    world: int,
    threshold_gflop: float = AUTO_MIN_GFLOP_PER_RANK,
    factor: int = 8,
    gflop_per_rank: float = 0.0,
    min_rows: int = 1,
) -> ParallelPlan:
    """Decide whether to shard latents of ``latent_shape`` (B, C, T, h, w) or (B, C, h, w) over ``world`` ranks.

    ``auto`` weighs ``gflop_per_rank``, the busiest rank's share of the decode's FLOPs (from the model and the
    shape: :func:`parallel_vae.jobs.fake_run.decode_flops_per_rank`), against ``threshold_gflop``: per-layer
    exchange costs are fixed, so what pays for them is compute per rank, and a wide model pays at fewer latent
    elements than a narrow one. Pure arithmetic on values every rank agrees on, so every rank reaches the same
    decision. ``factor`` (pixel rows per latent row) only appears in messages. Raises :class:`InputError` for
    ``on`` when there are fewer than ``min_rows`` latent rows per rank (the family adapter's ``min_latent_rows``,
    1 for most).
    """
    if mode not in ("auto", "on", "off"):
        raise InputError(f"unknown --parallel {mode!r}; choose auto, on or off")
    h = latent_shape[-2]

    def plan(shard: bool, reason: str) -> ParallelPlan:
        return ParallelPlan(mode, shard, reason, gflop_per_rank, threshold_gflop)

    if world == 1:
        return plan(False, "a single process: nothing to shard")
    if mode == "off":
        return plan(False, "--parallel off: every rank decodes the whole input, rank 0 writes")
    if h < world * min_rows:
        if mode == "on":
            need = "one latent row" if min_rows == 1 else f"{min_rows} latent rows (this model's halos need them)"
            raise InputError(
                f"--parallel on: {h} latent rows ({h * factor} pixel rows) cannot be split over {world} ranks; "
                f"every rank needs at least {need}, so the minimum is {world * min_rows} latent rows "
                f"({world * min_rows * factor} pixel rows). Use fewer processes, or --parallel auto / off"
            )
        return plan(False, f"auto: {h} latent rows cannot be split over {world} ranks")
    if mode == "on":
        return plan(True, "--parallel on")
    limit = int(threshold_gflop) if float(threshold_gflop).is_integer() else threshold_gflop  # as the user wrote it
    if gflop_per_rank >= threshold_gflop:
        return plan(True, f"auto: {gflop_per_rank:.3g} GFLOP per rank >= threshold {limit}")
    return plan(False, f"auto: {gflop_per_rank:.3g} GFLOP per rank < threshold {limit}")


@dataclass
class DecodeInput:
    """The input of one run: latents to decode, or a video to round-trip (encode then decode)."""

    kind: str  # "latents", "video", "images" or "demo"
    path: Optional[str]
    latents: Optional[torch.Tensor] = None  # (B, C, T, h, w) or (B, C, h, w), un-normalized
    video: Optional[torch.Tensor] = None  # (B, C, T, H, W) or (B, C, H, W) in [-1, 1]
    notes: tuple = ()
    paths: tuple = ()  # each image's file (--image), for the output names

    @property
    def shape(self) -> tuple:
        return tuple((self.latents if self.latents is not None else self.video).shape)

    def latent_shape(self, vae) -> tuple:
        if self.latents is not None:
            return self.shape
        adapter = adapter_for(vae)
        f = spatial_factor(vae)
        b, hh, ww = self.shape[0], self.shape[-2], self.shape[-1]
        if not adapter.video:
            return (b, latent_channels(vae), hh // f, ww // f)
        return (b, latent_channels(vae), adapter.latent_frames(vae, self.shape[2]), hh // f, ww // f)


def _sizes_that_work(pixels: int, factor: int, world: int) -> str:
    return " or ".join(str(c) for c in nearest_valid(pixels, factor, world))


def check_video_shape(video: torch.Tensor, vae, path: str) -> None:
    """Height and width must be multiples of the spatial factor (the encoder's stride-2 steps must divide them)."""
    c, h, w = video.shape[1], video.shape[-2], video.shape[-1]
    f = spatial_factor(vae)
    what = "video" if video.dim() == 5 else "image"
    if c != pixel_channels(vae):
        raise InputError(f"{what} {path} has {c} channels; the model encodes {pixel_channels(vae)}")
    if h % f or w % f:
        raise InputError(
            f"{what} {path} is {h}x{w} (height x width); both must be multiples of the model's spatial factor {f}. "
            f"Crop or resize to a height of {_sizes_that_work(h, f, 1)} and a width of {_sizes_that_work(w, f, 1)}"
        )


def read_input(args: argparse.Namespace, vae) -> DecodeInput:
    """Read and validate the input named by ``args`` (``--latents``, ``--video``, ``--image`` or neither: the demo
    clip, or for an image family 4 of its frames as a batch of images)."""
    adapter = adapter_for(vae)
    if args.latents:
        z = load_latents(args.latents, key=args.latents_key, ndim=adapter.ndim)
        notes = ()
        if args.latents_normalized:
            z = denormalize_latents(z, vae)  # Flux.2's pipeline latents are patchified: check channels after this
            notes = (f"latents were denormalized the {adapter.name} pipelines' way",)
        if z.shape[1] != latent_channels(vae):
            raise InputError(
                f"latents in {args.latents} have {z.shape[1]} channels (dim 1 of {tuple(z.shape)}), but the model's "
                f"latent channels are {latent_channels(vae)}: they were made for a different VAE"
            )
        return DecodeInput("latents", args.latents, latents=z, notes=notes)
    if not adapter.has_encoder:
        raise InputError(
            f"{type(vae).__name__} is a decoder only (it cannot encode a video for a round trip): pass --latents "
            "PATH (latents of the VAE it decodes for, e.g. AutoencoderKLLTX2Video's)"
        )
    if not adapter.video:
        if args.video:
            raise InputError(f"--video: {type(vae).__name__} is an image VAE; pass --image PATH [PATH ...]")
        if args.image:
            try:
                images = [read_image(p) for p in args.image]
            except (FileNotFoundError, ValueError) as e:
                raise InputError(str(e)) from e
            if len({tuple(i.shape) for i in images}) > 1:
                raise InputError(f"--image files differ in size: {[tuple(i.shape[1:]) for i in images]}")
            kind, path = "images", ", ".join(args.image)
            batch = torch.stack(images)
        else:
            clip = demo_video(**DEMO_SHAPE)
            batch = torch.stack([clip[:, t] for t in DEMO_IMAGE_FRAMES])
            kind, path = "demo", None
        check_video_shape(batch, vae, path or "demo")
        return DecodeInput(kind, path, video=batch.contiguous(), paths=tuple(args.image or ()))
    if args.image:
        raise InputError(f"--image: {type(vae).__name__} is a video VAE; pass --video PATH")
    if args.video:
        try:
            video = read_video(args.video, max_frames=args.max_frames)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(str(e)) from e
        kind, path = "video", args.video
    else:
        video = demo_video(**DEMO_SHAPE)
        kind, path = "demo", None
        if args.max_frames:
            video = video[:, : args.max_frames]
    video = video.unsqueeze(0)  # (C, T, H, W) -> (1, C, T, H, W)
    check_video_shape(video, vae, path or "demo")
    # Causal video VAEs encode frame chunks 1, k, k, ...: frames past the last full chunk are dropped, so drop them
    # here and compare the reconstruction with exactly the frames that were encoded.
    tf = adapter.temporal_factor(vae)
    t = video.shape[2]
    used = adapter.usable_frames(vae, t)
    notes = ()
    if used != t:
        video = video[:, :, :used]
        notes = (f"{t} frames read; encoding the first {used} (1 + {tf}k frames)",)
    return DecodeInput(kind, path, video=video.contiguous(), notes=notes)


# Output names the images may not take (the run's other outputs in the same folder).
_RESERVED = ("contact_sheet.png",)


def image_names(inp: DecodeInput, count: int) -> list[str]:
    """The file names of the ``count`` decoded images, named after their inputs.

    - ``--image A.png B.jpg``: ``A.png``, ``B.png`` (each input's stem; always PNG).
    - ``--latents z.safetensors`` (a batch from one file) and inputs without a name (the demo, stem ``image``):
      ``z.png``, ``z_1.png``, ``z_2.png``, ... as the videos are (``video.mp4``, ``video_1.mp4``).
    - Collisions (two inputs with one stem from different folders, names equal but for case, which some file
      systems do not tell apart, or a reserved name such as ``contact_sheet.png``): every image is then named
      ``<stem>_<i>.png`` with ``i`` its position in the batch, which cannot collide (two such names are equal only
      with the same ``i``).
    Leading dots are dropped from a stem (``.tmp-*`` is the prefix the next run clears; hidden files surprise)."""
    if inp.kind == "images":
        stems = [Path(p).stem for p in inp.paths]
    else:
        stem = Path(inp.path).stem if inp.kind == "latents" and inp.path else "image"
        stems = [stem] + [f"{stem}_{i}" for i in range(1, count)]
    stems = [s.lstrip(".") or "image" for s in stems]
    names = [f"{s}.png" for s in stems]
    folded = [n.lower() for n in names]
    if len(set(folded)) < len(folded) or any(n in _RESERVED for n in folded):
        names = [f"{s}_{i}.png" for i, s in enumerate(stems)]
    return names


def _save_tensors(tensors: dict, path: str) -> None:
    """safetensors file, atomically (temporary file in the same folder, then rename)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)


def _check_flags(args: argparse.Namespace) -> torch.dtype:
    dtype = parse_dtype(args.dtype)
    if sum(bool(v) for v in (args.latents, args.video, args.image)) > 1:
        raise UsageError("give one of --latents, --video or --image")
    if args.seeded and (args.pretrained or args.single_file):
        raise UsageError("give either --seeded or --pretrained / --single_file, not both")
    if args.latents_normalized and not args.latents:
        raise UsageError("--latents_normalized applies to --latents only")
    if args.latents_key and not args.latents:
        raise UsageError("--latents_key applies to --latents only")
    if args.max_frames is not None and args.latents:
        raise UsageError("--max_frames applies to --video and the demo clip, not to --latents")
    if args.max_frames is not None and args.max_frames < 1:
        raise UsageError(f"--max_frames must be at least 1, got {args.max_frames}")
    if args.fps <= 0:
        raise UsageError(f"--fps must be positive, got {args.fps}")
    if args.auto_threshold < 0:
        raise UsageError(f"--auto_threshold must be >= 0, got {args.auto_threshold}")
    return dtype


def _timed(rt: Runtime, fn):
    """Run ``fn`` with all ranks starting together; return (result, this rank's seconds)."""
    rt.barrier()
    start = time.perf_counter()
    out = fn()
    rt.synchronize()
    return out, time.perf_counter() - start


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None  # PSNR of an exact reconstruction is infinite; JSON has no inf


def _load_model(rt: Runtime, args: argparse.Namespace):
    """The flags' dtype and the model on this rank's device, both agreed: returns (vae, source)."""
    with rt.agreed():
        dtype = _check_flags(args)
    with rt.agreed():
        if args.seeded:
            spec = parse_seeded(args.seeded)
            vae = build_seeded_vae(**spec, seed=0, dtype=dtype)
            source = {"kind": "seeded", **spec}
        else:
            vae, source = load_vae(
                pretrained=args.pretrained,
                subfolder=args.subfolder,
                single_file=args.single_file,
                config=args.config,
                dtype=dtype,
            )
        return vae.to(rt.device), source


def _prepare_out_dir(rt: Runtime, args: argparse.Namespace) -> str:
    """The output folder, made and checked by the main rank (agreed), stale temporaries cleared; its path."""
    out_dir = os.path.abspath(args.output_dir)
    with rt.agreed():
        if rt.is_main:
            if os.path.exists(out_dir) and not os.path.isdir(out_dir):
                raise InputError(f"--output_dir {out_dir} is a file, not a folder")
            os.makedirs(out_dir, exist_ok=True)
            if not os.access(out_dir, os.W_OK):
                raise InputError(f"--output_dir {out_dir} is not writable")
            clear_stale(out_dir)
    return out_dir


def run_decode(rt: Runtime, args: argparse.Namespace) -> Optional[dict]:
    """The whole job; returns the metrics on the main rank (``None`` elsewhere). See the module docstring."""
    world = rt.world_size
    # step 1: flags and model. Each rank loads its own copy (same files, or the same seed).
    vae, source = _load_model(rt, args)
    # step 2: the input, then one check that every rank read the same thing (multi-node runs read per node).
    with rt.agreed():
        inp = read_input(args, vae)
    shapes = rt.gather_object(inp.shape)
    with rt.agreed():
        if any(s != shapes[0] for s in shapes):
            raise InputError(f"ranks read inputs of different shapes: {shapes}; every rank must see the same file")
        latent_shape = inp.latent_shape(vae)
        min_rows = adapter_for(vae).min_latent_rows(vae)
        gflop = 0.0
        if args.parallel == "auto" and world > 1 and latent_shape[-2] >= world * min_rows:
            gflop = decode_flops_per_rank(vae, latent_shape, world) / 1e9
        plan = plan_parallel(
            args.parallel, latent_shape, world, args.auto_threshold, spatial_factor(vae), gflop, min_rows
        )
        _check_output_size(vae, inp, latent_shape, args.output_dir)
    # step 3: the output folder (main rank), before any compute, so an unwritable folder fails in seconds; the
    # temporaries a killed run left there are cleared.
    out_dir = _prepare_out_dir(rt, args)
    start_tracking(
        rt,
        report_to=args.report_to,
        project=args.tracker_project,
        run_name=args.run_name,
        config={k: v for k, v in vars(args).items() if v is None or isinstance(v, (str, int, float, bool))},
        dir=out_dir,
    )

    # step 4: encode (round trips) and decode through the shared library path.
    if plan.shard:
        if getattr(vae, "use_tiling", False):  # MiniMax-H3 ships with tiling on: the parallel model is the untiled one
            vae.disable_tiling()
        enable_spatial_parallelism(vae, rt.group)
    reset_peak_memory(rt.device)
    progress = not args.no_progress
    encode_seconds = None
    if inp.latents is not None:
        latents, sharded = inp.latents, False
    else:
        # Sharded: keep each rank's latent rows where they are (gather=False) and decode them directly.
        posterior, encode_seconds = _timed(
            rt, lambda: encode_video(vae, inp.video, gather=not plan.shard, progress=progress)
        )
        latents, sharded = posterior.mode(), plan.shard
    decoded, decode_seconds = _timed(
        rt, lambda: decode_video(vae, latents, sharded=sharded, gather=True, progress=progress)
    )
    # Every rank holds the whole output (gathered, or decoded alone), so every rank reaches the same verdict.
    with rt.agreed():
        if not torch.isfinite(decoded).all():
            raise InputError(
                f"the decoded output contains NaN or infinite values ({str(vae.dtype).replace('torch.', '')} "
                "overflow, or non-finite latents): decode with --dtype bfloat16 or float32; nothing was written"
            )
    stats = rt.gather_object(
        {
            "rank": rt.rank,
            "host": socket.gethostname(),
            "device": str(rt.device),
            "decode_seconds": decode_seconds,
            "encode_seconds": encode_seconds,
            "peak_memory": peak_memory_bytes(rt.device),
        }
    )

    # step 5: outputs, main rank only; a failure to write is still agreed, so every rank exits non-zero.
    metrics = None
    with rt.agreed():
        if rt.is_main:
            metrics = _write_outputs(rt, args, vae, source, inp, plan, decoded, stats, out_dir)
    if rt.is_main:
        print(summary_line(metrics, out_dir), flush=True)
    return metrics


def summary_line(metrics: dict, out_dir: str) -> str:
    """The one line a successful run ends with: where the outputs went, the layout, time, memory, quality."""
    files = metrics["videos"] + metrics["images"] + [metrics[k] for k in ("contact_sheet", "comparison", "tensor_file")]
    layout = metrics["group_layout"]
    if metrics["parallel"]["shard"]:
        how = "rows split " + "+".join(map(str, layout["latent_rows_per_rank"])) + " (latent rows)"
    else:
        how = "not sharded: " + metrics["parallel"]["reason"]
    parts = [
        f"wrote {', '.join(f for f in files if f)} and metrics.json to {out_dir}",
        f"{metrics['world_size']} process{'es' if metrics['world_size'] > 1 else ''}, {how}",
        f"decode {metrics['decode_seconds']:.2f} s",
        f"peak memory {max(metrics['peak_memory_bytes']) / 2**30:.2f} GiB/rank ({metrics['peak_memory_kind']})",
    ]
    if "ssim" in metrics:
        psnr_text = "inf" if metrics["psnr"] is None else f"{metrics['psnr']:.2f}"
        parts.append(f"PSNR {psnr_text} dB, SSIM {metrics['ssim']:.4f}")
    return "decode: " + "; ".join(parts)


def _commit(stage: str, out_dir: str, names: list[str]) -> None:
    """Move a run's outputs from ``stage`` into ``out_dir`` as one unit. metrics.json marks a complete run: the old
    one goes first and the new one comes last, so a kill in between leaves outputs without a metrics.json, never
    new outputs beside the previous run's metrics."""
    marker = os.path.join(out_dir, "metrics.json")
    if os.path.lexists(marker):
        os.remove(marker)
    for name in names:
        os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
    os.replace(os.path.join(stage, "metrics.json"), marker)
    os.rmdir(stage)


def _check_output_size(vae, inp: DecodeInput, latent_shape: tuple, out_dir: str) -> None:
    """Before any compute: a video whose frames libx264 cannot encode is refused (the comparison video of a round
    trip stacks input and reconstruction, twice the height)."""
    if len(latent_shape) != 5:
        return
    f = spatial_factor(vae)
    height, width = latent_shape[-2] * f, latent_shape[-1] * f
    check_video_size(height, width, os.path.join(out_dir, "video.mp4"))
    if inp.video is not None:
        check_video_size(2 * height, width, os.path.join(out_dir, "comparison.mp4"))


def _write_outputs(rt, args, vae, source, inp, plan, decoded, stats, out_dir) -> dict:
    run_id = uuid.uuid4().hex[:12]
    stage = os.path.join(out_dir, f"{TMP_PREFIX}run-{run_id}")  # cleared by the next run if this one is killed
    os.makedirs(stage)
    try:
        metrics = _write_staged(rt, args, vae, source, inp, plan, decoded, stats, stage, run_id)
    except BaseException as e:
        # A failed write (a full disk, an encoder that refused) leaves nothing behind, and says where it wrote.
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OSError):
            cause = f"[Errno {e.errno}] {e.strerror}" if e.errno else str(e)
            where = f" ({e.filename})" if e.filename else ""
            raise OSError(
                e.errno, f"cannot write the outputs to {out_dir}{where}: {cause}; the staged files ({stage}) were removed"
            ) from None
        raise
    names = metrics["videos"] + metrics["images"]
    names += [metrics[k] for k in ("contact_sheet", "comparison", "tensor_file") if metrics[k]]
    _commit(stage, out_dir, names)
    shown = (metrics["videos"] or [metrics["contact_sheet"] or metrics["images"][0]])[0]
    _log_to_tracker(rt, args, metrics, os.path.join(out_dir, shown))
    return metrics


def _write_staged(rt, args, vae, source, inp, plan, decoded, stats, out_dir, run_id) -> dict:
    # About 85 lines: the metrics record, then each output written and read back into the staging folder, in the
    # order metrics.json lists them; the writes themselves are the helpers it calls.
    world = rt.world_size
    decoded = decoded.detach().cpu()
    latent_shape = inp.latent_shape(vae)
    h = latent_shape[-2]
    f = spatial_factor(vae)
    videos, images, sheet = [], [], None
    if decoded.dim() == 5:
        for i in range(decoded.shape[0]):
            name = "video.mp4" if i == 0 else f"video_{i}.mp4"
            write_video(decoded[i], os.path.join(out_dir, name), fps=args.fps)
            videos.append(name)
    else:
        for i, name in enumerate(image_names(inp, decoded.shape[0])):
            write_image(decoded[i], os.path.join(out_dir, name))
            images.append(name)
        if decoded.shape[0] > 1:
            sheet = "contact_sheet.png"
            # a round trip shows each input above its reconstruction
            shown = decoded if inp.video is None else torch.cat([inp.video.to(decoded.dtype), decoded])
            cols = decoded.shape[0] if inp.video is not None else None
            write_image(contact_sheet(shown, columns=cols), os.path.join(out_dir, sheet))
    comparison = None
    if inp.video is not None and decoded.dim() == 5:
        comparison = "comparison.mp4"
        # (C, T, H, W): the input above its reconstruction
        side = torch.cat([inp.video[0].to(decoded.dtype), decoded[0]], dim=-2)
        write_video(side, os.path.join(out_dir, comparison), fps=args.fps)
    tensor_file = None
    if args.save_tensor:
        tensor_file = "decoded.safetensors"
        _save_tensors({"video": decoded}, os.path.join(out_dir, tensor_file))
    rows = row_split(h, world) if plan.shard else [h] * world
    metrics = {
        "run_id": run_id,
        "world_size": world,
        "backend": rt.backend,
        "device": rt.device.type,
        "group_layout": {
            # One spatial group over all ranks when sharded; otherwise every rank works alone on the whole input.
            "spatial_groups": [list(range(world))] if plan.shard else [[r] for r in range(world)],
            "spatial_size": world if plan.shard else 1,
            "latent_rows_per_rank": rows,
            "pixel_rows_per_rank": [r * f for r in rows],
        },
        "parallel": asdict(plan),
        "dtype": str(vae.dtype).replace("torch.", ""),
        "model": {**source, **describe_vae(vae)},
        "input": {
            "kind": inp.kind,
            "path": inp.path,
            "latents_normalized": bool(args.latents_normalized),
            "notes": list(inp.notes),
        },
        "input_shape": list(inp.shape),
        "latent_shape": list(latent_shape),
        "output_shape": list(decoded.shape),
        "decode_seconds": max(s["decode_seconds"] for s in stats),
        "decode_seconds_per_rank": [s["decode_seconds"] for s in stats],
        "peak_memory_bytes": [s["peak_memory"]["bytes"] for s in stats],
        "peak_memory_kind": stats[0]["peak_memory"]["kind"],
        "peak_memory_note": (
            "torch.cuda.max_memory_allocated per rank (tensor bytes), window reset before encode/decode"
            if rt.device.type == "cuda"
            else "peak resident set size (ru_maxrss) of each rank's process since it started: includes the "
            "interpreter, libraries and allocator caches; compare between runs, not with CUDA figures"
        ),
        "ranks": stats,
        "fps": args.fps,
        "videos": videos,
        "images": images,
        "contact_sheet": sheet,
        "comparison": comparison,
        "tensor_file": tensor_file,
        "versions": _versions(),
    }
    if inp.video is not None:
        metrics["encode_seconds"] = max(s["encode_seconds"] for s in stats)
        metrics["encode_seconds_per_rank"] = [s["encode_seconds"] for s in stats]
        # Against the float32 input (both are compared in float64), not a copy rounded to the model dtype.
        metrics["psnr"] = _finite(psnr(decoded, inp.video))
        metrics["ssim"] = ssim(decoded, inp.video)
    write_json(metrics, os.path.join(out_dir, "metrics.json"))
    return metrics


def _versions() -> dict:
    import diffusers

    from .. import __version__

    return {"parallel_vae": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def _log_to_tracker(rt: Runtime, args, metrics: dict, video_path: str) -> None:
    if not rt.trackers_started:
        return
    scalars = {
        k: metrics[k]
        for k in ("decode_seconds", "encode_seconds", "psnr", "ssim", "world_size")
        if isinstance(metrics.get(k), (int, float))
    }
    scalars["peak_memory_bytes_max"] = max(metrics["peak_memory_bytes"])
    scalars["sharded"] = int(metrics["parallel"]["shard"])
    rt.accelerator.log(scalars)
    if args.report_to == "wandb":
        import wandb

        run = rt.accelerator.get_tracker("wandb", unwrap=True)
        if video_path.endswith(".png"):
            run.log({"image": wandb.Image(video_path)})
        else:
            # An mp4 path, not an array: wandb encodes arrays with moviepy, which is not a dependency.
            run.log({"video": wandb.Video(video_path, format="mp4")})

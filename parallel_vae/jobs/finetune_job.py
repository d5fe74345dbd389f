"""The fine-tuning job behind ``recipes/finetune.py``: hybrid D x S layout, sharded training step, validation
through the shared decode path, checkpoints, exact resume, and a plain-diffusers export.

Exactness of the layout: the clips of a step, the posterior noise of each sample and the loss normalization are
functions of (seed, step, position in the global batch) only, so D x S ranks with batch B per replica take the same
optimizer step as one process with batch D x B (tests/test_finetune.py checks it in float64 under DDP and
DeepSpeed ZeRO-2).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import tempfile
import time
from typing import Optional

import torch

from ..api import enable_spatial_parallelism, shard_video
from ..families import adapter_for, spatial_factor
from ..checkpointing import enable_gradient_checkpointing
from ..errors import InputError
from .loading import load_vae, parse_seeded
from .metrics import peak_memory_bytes, psnr, ssim
from .reductions import sum_over_ranks
from .models import build_seeded_vae, build_wan_vae, inflate_temporal, temporal_resampling_convs
from ..pipeline import decode_video, encode_video
from .cli import add_finetune_args
from .runtime import Runtime, UsageError, start_tracking
from ..core.sharding import ShardingError
from .training import (
    ShardedAutoencoder,
    batch_indices,
    hybrid_layout,
    posterior_noise,
    sample_seeds,
    vae_loss,
)
from .loss_terms import LOSS_TRAJECTORY, add_loss_terms, build_loss_networks
from ._files import TMP_PREFIX, atomic_path, clear_stale, publish_modes
from .video import write_image, write_video

__all__ = ["run_finetune", "add_finetune_args", "latest_checkpoint"]  # add_finetune_args lives in .cli (no torch)

_SEEDED_RE = re.compile(r"^([a-z0-9.]+):(\d+):(\d+)$")
# float64 is for exactness tests (the layout equivalence test runs the recipe in float64).
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# Held-out clips are dataset items of seed ``--seed + VALIDATION_SEED_OFFSET``: never the training clips, and the
# same in every run with that --seed (benchmarks/eval_vae_quality.py reads the same clips).
VALIDATION_SEED_OFFSET = 7919

# A checkpoint is written to CHECKPOINTS/.tmp-step_N and renamed to CHECKPOINTS/step_N once every rank has written
# its part and the main rank has added trainer_state.json: the rename is the marker of completeness.
_STEP_RE = re.compile(r"step_(\d+)")
TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "run_config.json"
# What --overwrite deletes: the run's own outputs, never anything else the folder holds (nor wandb/, whose offline
# runs may not be synced yet).
_RUN_OUTPUTS = ("checkpoints", "samples", "final", "finetune_summary.json", RUN_CONFIG)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (``None`` if there is none). Temporaries of a
    run killed while saving (``.tmp-step_N``) never match, and neither does a folder without trainer_state.json (a
    partial checkpoint of a version that wrote in place)."""
    folder = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(folder):
        return None
    steps = [
        (int(m.group(1)), n)
        for n in os.listdir(folder)
        if (m := _STEP_RE.fullmatch(n)) and os.path.isfile(os.path.join(folder, n, TRAINER_STATE))
    ]
    return os.path.join(folder, max(steps)[1]) if steps else None


def check_checkpoint(path: str) -> dict:
    """Check that ``path`` is a complete, readable checkpoint of this recipe and return its trainer state.

    One :class:`InputError` naming what is missing or unreadable: the step record, the weights, a truncated
    safetensors or torch file (its header or zip directory is read, no pickle is executed)."""
    from safetensors import safe_open
    import zipfile

    if not os.path.isdir(path):
        raise InputError(f"--resume {path}: no such checkpoint folder")
    names = set(os.listdir(path))
    missing = []
    if TRAINER_STATE not in names:
        missing.append(TRAINER_STATE)
    if not any(n.startswith(("model", "pytorch_model")) for n in names):
        missing.append("the model weights (model.safetensors, pytorch_model.bin or pytorch_model/)")
    if missing:
        raise InputError(
            f"--resume {path} is not a complete checkpoint of finetune.py: missing {' and '.join(missing)} "
            "(an interrupted save, or another program's folder)"
        )
    for root, _, files in os.walk(path):
        for name in sorted(files):
            file = os.path.join(root, name)
            try:
                if name.endswith(".safetensors"):
                    with safe_open(file, framework="pt"):
                        pass
                elif name.endswith((".bin", ".pkl", ".pt", ".pth")):
                    # torch.save writes a zip; a truncated one has lost its directory at the end
                    zipfile.ZipFile(file).close()
            except Exception as e:  # SafetensorError, BadZipFile, OSError
                raise InputError(f"checkpoint file {file} is truncated or corrupt ({type(e).__name__}: {e})") from e
    state_file = os.path.join(path, TRAINER_STATE)
    try:
        with open(state_file) as f:
            state = json.load(f)
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"checkpoint file {state_file} is unreadable ({type(e).__name__}: {e})") from e
    return state


def run_config(args: argparse.Namespace, dp_degree: int, source: dict) -> dict:
    """What a run folder records about its run (run_config.json, and each checkpoint's trainer_state.json)."""
    recorded = {k: v for k, v in vars(args).items() if v is None or isinstance(v, (str, int, float, bool))}
    recorded |= {
        "world_size": dp_degree * args.sp_degree,
        "dp_degree": dp_degree,
        "global_batch_size": dp_degree * args.batch_size,
        "model_source": source,
    }
    return recorded


# Settings that decide the optimizer steps. The layout enters only through the global batch D x --batch_size (clips,
# noise and loss normalization are functions of positions in the global batch), so a new --sp_degree or world size
# with the same D is a valid resume; --max_steps only lays out a decaying schedule.
_TRAJECTORY = (
    "model_source", "dtype", "mixed_precision", "train", "global_batch_size", "data", "frames", "height", "width",
    "seed", "optimizer", "lr", "weight_decay", "warmup_steps", "lr_scheduler", "max_grad_norm", "l1", "mse", "kl",
    "sample_posterior",
) + LOSS_TRAJECTORY  # fmt: skip


def trajectory_changes(before: dict, now: dict) -> list[str]:
    """``"name: old -> new"`` for every setting that differs and changes the training trajectory."""
    keys = list(_TRAJECTORY) + (["max_steps"] if now.get("lr_scheduler") != "constant" else [])
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys if k in before and before[k] != now.get(k)]


def _check_output_paths(args: argparse.Namespace) -> None:
    """On every rank, before anything is loaded: the run folder and the export folder can be written. A folder
    that is a file, or cannot be created or written, would otherwise be found after the last training step."""
    for flag, folder in (("--output_dir", args.output_dir), ("--export_dir", args.export_dir)):
        if folder is None:
            continue
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise InputError(f"{flag} {folder} is a file, not a folder")
        try:
            os.makedirs(folder, exist_ok=True)
            # a real write: os.access says yes to root on a read-only mount
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise InputError(f"{flag} {folder} cannot be written: {e.strerror or e}") from e


def _used(output_dir: str) -> list[str]:
    """What in ``output_dir`` belongs to an earlier run (anything but this package's temporaries)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if not n.startswith(TMP_PREFIX))


def _load_model(args, dtype: torch.dtype):
    sources = [s for s in (args.pretrained, args.single_file, args.seeded) if s]
    if len(sources) > 1:
        raise UsageError("give at most one of --pretrained, --single_file, --seeded")
    if args.seeded:
        spec = parse_seeded(args.seeded)  # the decode recipe's parser: LAYOUT[:WIDTH[:LATENT]]
        layout, base, z = spec["layout"], spec["width"], spec.get("latent")
        if layout.startswith("wan"):
            vae = build_wan_vae(layout, base_dim=base, z_dim=z, seed=args.seed, dtype=dtype, init=args.seeded_init)
        elif args.seeded_init != "pytorch":
            raise UsageError(f"--seeded_init {args.seeded_init} is for Wan layouts only")
        else:
            vae = build_seeded_vae(layout, width=base, latent=z, seed=args.seed, dtype=dtype)
        source = {"kind": "seeded", "layout": layout, "base_dim": base, "z_dim": z, "seed": args.seed,
                  "init": args.seeded_init}  # fmt: skip
    else:
        vae, source = load_vae(
            pretrained=args.pretrained, subfolder=args.subfolder, single_file=args.single_file, dtype=dtype
        )
    if args.inflate:
        try:
            inflate_temporal(vae)
        except ValueError as e:
            raise InputError(f"--inflate: {e}") from e
        source = {**source, "inflated": True}
    return vae, source


def _check_args(args, world: int) -> None:
    if args.sp_degree is None:
        args.sp_degree = world
    if args.sp_degree < 1 or world % args.sp_degree:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise UsageError(f"--sp_degree {args.sp_degree} does not divide the world size {world}; use one of {divisors}")
    if args.frames < 1:
        raise UsageError(f"--frames must be positive, got {args.frames}")
    if args.max_steps < 0:
        raise UsageError("--max_steps must be >= 0 (0: validate and export the starting model only)")
    if args.batch_size < 1:
        raise UsageError("--batch_size must be positive")
    if args.seeded_init != "pytorch" and not args.seeded:
        raise UsageError("--seeded_init applies to a --seeded model only (a loaded model keeps its weights)")
    if args.checkpoint_every < 0 or args.checkpoints_total_limit < 0:
        raise UsageError("--checkpoint_every and --checkpoints_total_limit must be >= 0 (0: off / keep all)")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --output_dir and --overwrite deletes it: give one of them")


def _make_data(spec: str, args, factor: int, seed: int, temporal: int):
    from .data import make_dataset

    try:
        return make_dataset(
            spec, frames=args.frames, height=args.height, width=args.width, spatial_factor=factor, seed=seed,
            temporal_factor=temporal,
        )
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from e


def _stack(dataset, indices, epoch: int, device, dtype, video: bool = True) -> torch.Tensor:
    # clip(i, epoch) is a pure function: a new temporal offset / crop each epoch for folder data, the same clips
    # after a resume, and the same clip on every spatial rank of a replica.
    batch = torch.stack([dataset.clip(i, epoch) for i in indices]).to(device=device, dtype=dtype)
    return batch if video else batch[:, :, 0]  # image VAEs: (B, C, 1, H, W) single frames -> (B, C, H, W)


def accelerator_kwargs(args: argparse.Namespace) -> dict:
    """The Accelerator settings :func:`run_finetune` relies on (``run_recipe(..., accelerator_kwargs=...)``).

    The learning-rate schedule counts optimizer steps, so the scheduler steps once per optimizer step on any launch
    (see :func:`lr_factor`). ``--mixed_precision`` overrides the launch config's setting; unset leaves accelerate's
    own choice."""
    kwargs = {"step_scheduler_with_optimizer": False}
    if args.mixed_precision:
        kwargs["mixed_precision"] = args.mixed_precision
    return kwargs


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """The learning-rate multiplier for optimizer step ``step`` (0-based): a linear warm-up over ``warmup`` steps,
    then constant or a cosine / linear decay that reaches 0 after ``total`` steps. One call per optimizer step: the
    recipe builds its Accelerator with :func:`accelerator_kwargs` (``step_scheduler_with_optimizer=False``).
    Otherwise accelerate steps a prepared scheduler once per *process* per step (its data loader convention), which
    would finish a warm-up of ``warmup`` steps after ``warmup / world_size`` steps and make the schedule depend on
    the launch."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def _checked_run(rt: Runtime, args: argparse.Namespace):
    """Every check of the run that needs the model and the data, agreed over the ranks before anything is
    written: returns (vae, source, adapter, dtype, factor, train_data, val_data, resume, config)."""
    with rt.agreed():
        _check_args(args, rt.world_size)
        used = _used(args.output_dir)
        _check_output_paths(args)
        if used and not args.resume and not args.overwrite:
            shown = ", ".join(used[:4]) + (", ..." if len(used) > 4 else "")
            raise UsageError(
                f"--output_dir {args.output_dir} holds an earlier run ({shown}): continue it with --resume latest, "
                "start afresh there with --overwrite, or choose a new --output_dir"
            )
    with rt.agreed():
        dtype = parse_dtype(args.dtype)
        vae, source = _load_model(args, dtype)
        adapter = adapter_for(vae)
        if not adapter.video and args.frames != 1:
            raise UsageError(f"{type(vae).__name__} is an image VAE: train it with --frames 1 (single frames)")
        if adapter.video and args.frames == 1 and adapter.name != "wan":
            # Only Wan's single-frame path is known to leave exactly its temporal resampling convs unused (frozen
            # below); for other video families DDP would wait for gradients that never come.
            raise UsageError(
                f"--frames 1 (single-frame training) is supported for Wan layouts; {adapter.name} needs "
                f">= {1 + adapter.temporal_factor(vae)}"
            )
        if adapter.video and adapter.usable_frames(vae, args.frames) != args.frames:
            # A causal video VAE reconstructs 1 + k x (temporal factor) frames: the rest would not match the clip.
            tf, lo = adapter.temporal_factor(vae), adapter.usable_frames(vae, args.frames)
            raise UsageError(
                f"--frames must be 1 + {tf}k ({adapter.name}'s temporal chunks), got {args.frames}; "
                f"e.g. {lo} or {lo + tf}"
            )
        factor = spatial_factor(vae)
        for name in ("height", "width"):
            size = getattr(args, name)
            if size % factor or size < factor:
                lo = max(factor, size // factor * factor)
                raise InputError(
                    f"--{name} {size} is not a positive multiple of the spatial factor {factor}; "
                    f"sizes that work: {lo}, {lo + factor}"
                )
        least = adapter.min_latent_rows(vae)  # latent rows per rank (2 for DC-AE, 1 for most)
        if args.height // factor < args.sp_degree * least:
            raise ShardingError(
                f"clips of height {args.height} have {args.height // factor} latent rows, too few to shard over "
                f"--sp_degree {args.sp_degree}: use --height >= {args.sp_degree * least * factor} or a smaller "
                "--sp_degree"
            )
        temporal = adapter.temporal_factor(vae) or 1  # image VAEs train on single frames
        train_data = _make_data(args.data, args, factor, args.seed, temporal)
        val_data = _make_data(args.val_data, args, factor, args.seed + VALIDATION_SEED_OFFSET, temporal)
        dp = rt.world_size // args.sp_degree
        if dp * args.batch_size > len(train_data):
            raise InputError(
                f"a global batch of {dp * args.batch_size} clips (D={dp} x --batch_size {args.batch_size}) needs at "
                f"least that many training clips; {args.data} has {len(train_data)}"
            )
        resume = latest_checkpoint(args.output_dir) if args.resume == "latest" else args.resume
        if args.resume == "latest" and resume is None:
            raise InputError(
                f"--resume latest: no complete checkpoint under {os.path.join(args.output_dir, 'checkpoints')}"
            )
        config = run_config(args, dp, source)
        if resume:
            before = check_checkpoint(resume).get("config")
            changes = trajectory_changes(before, config) if before else []
            if changes:
                raise UsageError(
                    f"--resume {resume}: this run's settings would change the training trajectory ("
                    + "; ".join(changes)
                    + "); resume with the checkpoint's settings, or start a new --output_dir"
                )
    return vae, source, adapter, dtype, factor, train_data, val_data, resume, config


def _prepare_output(rt: Runtime, args: argparse.Namespace, config: dict) -> None:
    """After the agreed checks: the main rank clears what --overwrite and a killed save left, and writes the
    run configuration; every rank waits for it."""
    if rt.is_main:
        if args.overwrite:
            for name in _RUN_OUTPUTS:
                path = os.path.join(args.output_dir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.remove(path)
        clear_stale(args.output_dir)
        clear_stale(os.path.join(args.output_dir, "checkpoints"))  # a kill during save_state
        _write_json(os.path.join(args.output_dir, RUN_CONFIG), config)
    rt.barrier()


def _build_training(rt: Runtime, args: argparse.Namespace, vae, adapter, dtype):
    """The parallel model, its frozen parts, the optimizer and schedule (prepared by accelerate) and the loss
    networks: returns (layout, module, optimizer, scheduler, params, loss_nets)."""
    acc = rt.accelerator
    layout = hybrid_layout(args.sp_degree)
    vae = vae.to(rt.device)
    if getattr(vae, "use_tiling", False):  # MiniMax-H3 ships with tiling on: the parallel model is the untiled one
        vae.disable_tiling()
    enable_spatial_parallelism(vae, layout.spatial_group)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(vae, offload=args.offload_checkpoints)
    train_encoder = args.train == "all"
    if not train_encoder:
        # the encoder and its quant conv (HunyuanVideo-1.5, Mochi and DC-AE have none: the encoder emits the moments)
        quant = getattr(vae, "quant_conv", None)
        for p in list(vae.encoder.parameters()) + (list(quant.parameters()) if quant is not None else []):
            p.requires_grad_(False)
    if args.frames == 1 and adapter.video:
        # Single frames never reach the temporal resampling convolutions (Wan resamples time only from the second
        # chunk on): freeze them, so DDP does not wait for gradients that never come and the optimizer leaves them
        # as they are (``--inflate`` sets them when training moves on to video).
        for conv in temporal_resampling_convs(vae):
            conv.requires_grad_(False)
    vae.train()
    module = ShardedAutoencoder(vae, train_encoder=train_encoder)
    params = [p for p in module.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(lr_factor, warmup=args.warmup_steps, total=args.max_steps, schedule=args.lr_scheduler),
    )
    if acc.state.deepspeed_plugin is not None:
        # DeepSpeed wants the micro-batch size and cannot read it from a DataLoader here (we index the dataset).
        ds_config = acc.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = args.batch_size
        # One flag decides clipping under DDP and DeepSpeed alike (DeepSpeed clips inside its step).
        ds_config["gradient_clipping"] = args.max_grad_norm
    module, optimizer, scheduler = acc.prepare(module, optimizer, scheduler)
    loss_nets = build_loss_networks(rt, args, vae, layout, dtype)  # perceptual / adversarial terms (or None)
    return layout, module, optimizer, scheduler, params, loss_nets


def _train_step(rt, args, step, ctx) -> dict:
    """One optimizer step on this rank's rows; returns the logged record (replica means, averaged over
    replicas). ``ctx``: the run's fixed pieces (see run_finetune)."""
    acc, layout, vae, adapter, module, optimizer, scheduler, params, loss_nets = (
        rt.accelerator, ctx["layout"], ctx["vae"], ctx["adapter"], ctx["module"], ctx["optimizer"],
        ctx["scheduler"], ctx["params"], ctx["loss_nets"],
    )
    train_data, dtype, latent_shape, numel, step_times = (
        ctx["train_data"], ctx["dtype"], ctx["latent_shape"], ctx["numel"], ctx["step_times"],
    )
    t0 = time.perf_counter()
    idx = batch_indices(step, layout.dp_rank, layout.dp_degree, args.batch_size, len(train_data), args.seed)
    epoch = step // (len(train_data) // (layout.dp_degree * args.batch_size))
    video = _stack(train_data, idx, epoch, rt.device, dtype, adapter.video)
    x_local = shard_video(vae, video)
    noise = None
    if args.sample_posterior:
        positions = list(range(layout.dp_rank * args.batch_size, (layout.dp_rank + 1) * args.batch_size))
        noise = posterior_noise(vae, latent_shape, sample_seeds(step, positions, args.seed), dtype, rt.device)
    with acc.autocast():
        recon_local, moments = module(x_local, noise)
    loss, parts = vae_loss(
        recon_local.to(dtype),
        x_local,
        moments.to(dtype),
        numel=numel,
        group=layout.spatial_group,
        l1=args.l1,
        mse=args.mse,
        kl=args.kl,
        deterministic=adapter.deterministic,
    )
    loss, extra_logs = add_loss_terms(loss_nets, step, loss, recon_local.to(dtype), x_local, numel=numel, acc=acc)
    acc.backward(loss)
    if args.max_grad_norm > 0 and acc.state.deepspeed_plugin is None:
        acc.clip_grad_norm_(params, args.max_grad_norm)
    lr = optimizer.param_groups[0]["lr"]  # the rate this step used
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    step_times.append(time.perf_counter() - t0)

    # The replica means, averaged over replicas (for logging; no gradient).
    # On the activations' device (NCCL has no CPU backend), one host read for the three.
    l1_sum, mse_sum, kl_sum = sum_over_ranks([parts["l1_sum"], parts["mse_sum"], parts["kl_sum"]], rt.device)
    l1_mean, mse_mean = l1_sum / (numel * layout.dp_degree), mse_sum / (numel * layout.dp_degree)
    kl_mean = kl_sum / (args.batch_size * layout.dp_degree)  # per sample
    total = args.l1 * l1_mean + args.mse * mse_mean + args.kl * kl_sum / (numel * layout.dp_degree)
    record = {"step": step + 1, "loss": total, "l1": l1_mean, "mse": mse_mean, "kl": kl_mean, "lr": lr, "step_seconds": step_times[-1]}
    return record | extra_logs


def run_finetune(rt: Runtime, args: argparse.Namespace) -> dict:
    acc = rt.accelerator
    vae, source, adapter, dtype, factor, train_data, val_data, resume, config = _checked_run(rt, args)
    _prepare_output(rt, args, config)
    layout, module, optimizer, scheduler, params, loss_nets = _build_training(rt, args, vae, adapter, dtype)

    start_step = 0
    history, val_history = [], []
    if resume:
        with rt.agreed():
            try:
                acc.load_state(resume)
            except Exception as e:  # a file that passed check_checkpoint but still does not load
                raise InputError(f"cannot load checkpoint {resume}: {type(e).__name__}: {e}") from e
            with open(os.path.join(resume, TRAINER_STATE)) as f:
                state = json.load(f)
            start_step = int(state["step"])
            # The summary's records of the steps before the checkpoint, saved with it (a checkpoint of an older
            # version has none: its summary then starts at the resume).
            history, val_history = list(state.get("history", [])), list(state.get("validation", []))

    start_tracking(rt, report_to=args.report_to, project=args.tracker_project, run_name=args.run_name, config=config | layout.describe(), dir=args.output_dir)

    frames = (adapter.latent_frames(vae, args.frames),) if adapter.video else ()
    latent_shape = (adapter.latent_channels(vae),) + frames + (args.height // factor, args.width // factor)
    numel = args.batch_size * adapter.pixel_channels(vae) * args.frames * args.height * args.width
    progress = None
    if rt.is_main and not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=args.max_steps, initial=start_step, desc="finetune", unit="step")
    step_times = []
    ctx = dict(layout=layout, vae=vae, adapter=adapter, module=module, optimizer=optimizer, scheduler=scheduler,
               params=params, loss_nets=loss_nets, train_data=train_data, dtype=dtype, latent_shape=latent_shape,
               numel=numel, step_times=step_times)
    for step in range(start_step, args.max_steps):
        record = _train_step(rt, args, step, ctx)
        history.append(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
        if rt.trackers_started and ((step + 1) % args.log_every == 0 or step + 1 == args.max_steps):
            acc.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step + 1)

        last = step + 1 == args.max_steps
        if (args.validate_every and (step + 1) % args.validate_every == 0) or last:
            val_history.append(_validate(rt, layout, vae, val_data, step + 1, args, dtype, step_times))
        if args.checkpoint_every and ((step + 1) % args.checkpoint_every == 0 or last):
            records = {"history": history, "validation": val_history}
            _save_checkpoint(rt, args.output_dir, step + 1, config, keep=args.checkpoints_total_limit, records=records)
    if progress is not None:
        progress.close()
    if not val_history or val_history[-1]["step"] != max(start_step, args.max_steps):
        # --max_steps 0, or resumed at the end of a run whose last validation is older: validate what is exported
        val_history.append(_validate(rt, layout, vae, val_data, start_step, args, dtype, step_times))

    export_dir = args.export_dir or os.path.join(args.output_dir, "final")
    _export(rt, module, vae, export_dir, parse_dtype(args.export_dtype) if args.export_dtype else dtype)
    summary = {
        "layout": layout.describe(),
        "start_step": start_step,  # the resumed checkpoint's step; "history" also holds the steps before it
        "history": history,
        "validation": val_history,
        "export_dir": export_dir,
        "model_source": source,
    }
    if rt.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        _write_json(os.path.join(args.output_dir, "finetune_summary.json"), summary)
        last = val_history[-1]
        print(
            f"finetune: final model in {os.path.abspath(export_dir)} (diffusers from_pretrained loads it); "
            f"{max(args.max_steps - start_step, 0)} steps on {layout.world} process{'es' if layout.world > 1 else ''} (D={layout.dp_degree} "
            f"x S={layout.sp_degree}); validation PSNR {last['psnr']:.2f} dB, SSIM {last['ssim']:.4f} at step "
            f"{last['step']}; summary in {os.path.join(os.path.abspath(args.output_dir), 'finetune_summary.json')}",
            flush=True,
        )
    return summary


def _write_json(path: str, obj) -> None:
    with atomic_path(path) as tmp:  # atomic, with the modes a plain open() gives
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)


@torch.no_grad()
def _validate(rt: Runtime, layout, vae, val_data, step: int, args, dtype, step_times) -> dict:
    """Encode + decode held-out clips through the shared path (parallel_vae.decode_video, as recipes/decode.py);
    replica d takes clips d, d + D, ...; metrics are averaged over all clips."""
    acc = rt.accelerator
    t0 = time.perf_counter()
    totals = [0.0, 0.0, 0.0]  # psnr sum, ssim sum, clips (summed over ranks on the device below)
    sample_path = None
    video = adapter_for(vae).video
    for i in range(layout.dp_rank, len(val_data), layout.dp_degree):
        clip = val_data[i][None].to(device=rt.device, dtype=dtype)
        if not video:
            clip = clip[:, :, 0]  # (1, C, 1, H, W) -> (1, C, H, W): image VAEs train and validate on frames
        with acc.autocast():
            posterior = encode_video(vae, clip, gather=False)
            recon = decode_video(vae, posterior.mode(), sharded=True, gather=True)
        if layout.sp_rank == 0:  # metrics at the model's own precision (psnr/ssim compute in float64)
            totals = [totals[0] + psnr(recon, clip), totals[1] + ssim(recon, clip), totals[2] + 1.0]
        if rt.is_main and sample_path is None:
            # input | reconstruction, side by side
            side = torch.cat([clip[0].float().cpu(), recon[0].float().cpu()], dim=-1)
            name = os.path.join(args.output_dir, "samples", f"step_{step:06d}")
            if video:
                sample_path = write_video(side, name + ".mp4", fps=8)
            else:
                os.makedirs(os.path.dirname(name), exist_ok=True)
                sample_path = write_image(side, name + ".png")
    # NCCL has no CPU backend: the sums travel on the activations' device (jobs/reductions.py).
    totals = sum_over_ranks(totals, rt.device)
    mem = rt.gather_object(peak_memory_bytes(rt.device)["bytes"])
    times = rt.gather_object(sum(step_times[-10:]) / max(1, len(step_times[-10:])))
    result = {
        "step": step,
        "psnr": totals[0] / totals[2],
        "ssim": totals[1] / totals[2],
        "clips": int(totals[2]),
        "validation_seconds": time.perf_counter() - t0,
        "peak_memory_bytes_per_rank": mem,
        "memory_kind": peak_memory_bytes(rt.device)["kind"],
        "step_seconds_per_rank": times,
    }
    if rt.is_main:  # one line per validation in the console log (tqdm's bar only shows the training loss)
        print(
            f"validation at step {step}: PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f} "
            f"({result['clips']} clips, {result['validation_seconds']:.1f} s)",
            flush=True,
        )
    if rt.trackers_started:
        log = {"val/psnr": result["psnr"], "val/ssim": result["ssim"], "val/seconds": result["validation_seconds"]}
        log |= {f"memory/peak_bytes_rank{r}": b for r, b in enumerate(mem)}
        log |= {f"time/step_seconds_rank{r}": t for r, t in enumerate(times)}
        if rt.is_main and sample_path and args.report_to == "wandb":
            import wandb

            if sample_path.endswith(".png"):
                log["val/sample"] = wandb.Image(sample_path)
            else:
                log["val/sample"] = wandb.Video(sample_path, format="mp4")
        acc.log(log, step=step)
    return result


def _save_checkpoint(
    rt: Runtime, output_dir: str, step: int, config: dict, keep: int = 0, records: Optional[dict] = None
) -> None:
    """accelerate save_state (every rank: collective under DeepSpeed) into a temporary folder; the main rank adds
    trainer_state.json (the step, the run configuration and ``records``: the summary's training and validation
    records up to this step, which a resume carries on) and renames the folder into place once every rank has
    finished, then deletes all but the newest ``keep`` checkpoints (0: keep all). A kill at any point leaves the
    previous checkpoints as they were, and only a stale temporary."""
    folder = os.path.join(output_dir, "checkpoints")
    path = os.path.join(folder, f"step_{step:06d}")
    tmp = os.path.join(folder, f"{TMP_PREFIX}step_{step:06d}")  # the same name on every rank
    if rt.is_main and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    rt.barrier()
    rt.accelerator.save_state(tmp)
    rt.barrier()
    if rt.is_main:
        _write_json(os.path.join(tmp, TRAINER_STATE), {"step": step, "config": config, **(records or {})})
        publish_modes(tmp)
        if os.path.isdir(path):  # the same step saved again (a resumed run): replace it whole
            shutil.rmtree(path)
        os.replace(tmp, path)
        steps = sorted(n for n in os.listdir(folder) if re.fullmatch(r"step_\d+", n))
        for old in steps[: max(len(steps) - keep, 0)] if keep > 0 else []:
            shutil.rmtree(os.path.join(folder, old))
    rt.barrier()


def _export(rt: Runtime, module, vae, export_dir: str, dtype: torch.dtype) -> None:
    """Save the trained weights as a plain diffusers folder (no parallel_vae needed to load it)."""
    state = rt.accelerator.get_state_dict(module)  # every rank: gathers ZeRO-3 partitions
    if rt.is_main:
        from .models import cast_quietly

        # Cast before loading: load_state_dict copies into the existing parameters, so loading float64 weights
        # into the float32 model from_config builds would round them.
        plain = cast_quietly(type(vae).from_config(vae.config), dtype)
        prefix = "vae."
        plain.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        parent = os.path.dirname(os.path.abspath(export_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
        plain.save_pretrained(tmp)
        publish_modes(tmp)  # mkdtemp made it 0700 and safetensors 0600
        if os.path.isdir(export_dir):
            shutil.rmtree(export_dir)
        os.replace(tmp, export_dir)
    rt.barrier()

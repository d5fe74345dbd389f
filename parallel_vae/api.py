"""Public API: enable/disable spatial parallelism on an unmodified diffusers VAE of a supported family.

Two ways to run a parallelized model:

* replicated mode (drop-in for pipelines): every rank calls ``vae.encode(x)`` / ``vae.decode(z)`` with the same
  full input and receives the same full output as the unmodified model. Internally the input is sharded by rows,
  each rank runs the model on its rows, and the output is all-gathered. Gradients: every rank computes the same
  loss of the full output; parameter gradients summed over the group equal the single-process gradients.
* sharded mode (training): ``sharded_encode`` / ``sharded_decode`` take and return this rank's rows only, so a
  training step never materializes the full video on any rank. Each rank's loss is a part of the total; parameter
  gradients summed over the group equal the single-process gradients of the summed loss (see
  :func:`parallel_vae.loss.sharded_loss` for DDP / DeepSpeed averaging).

While enabled, the model's ``encoder`` and ``decoder`` operate on row shards of the spatial group. Everything here
is the same for every family; what differs (the module table, rows per latent row, channels, 4-D or 5-D, how the
class's own ``_encode``/``_decode`` are called) comes from the family's adapter (:mod:`parallel_vae.families`).
Rows are always dim -2.
"""

from __future__ import annotations

import datetime
import os
import types
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ._deps import check_diffusers
from .core.comm import _all_gather_single, gather_rows, group_rank, group_size, scatter_rows
from .core.failure import PeerFailure, fail_fast
from .core.fake import group_split, no_values, record_split
from .core.fingerprint import WORDS as _FP_WORDS, fingerprint_words, fingerprints_differ
from .core.hooks import check_hooks, execution_device as hook_device, follow_class, restore_hooks, verify as verify_hooks
from .core.plan import SpatialState, apply_plan, remove_plan
from .core.sharding import ShardingError, check_latent_height, check_pixel_height, nearest_valid, row_split, scale_sizes
from .families import FamilyAdapter, adapter_for

__all__ = [
    "enable_spatial_parallelism",
    "disable_spatial_parallelism",
    "is_spatially_parallel",
    "spatial_group",
    "spatial_size",
    "sharded_encode",
    "sharded_decode",
    "shard_video",
    "shard_latents",
    "gather_shards",
    "local_rows",
    "SpatialTimeoutError",
    "PeerFailure",
]

_STATE_ATTR = "_pv_state"

# Codes for the agreement collective. Order is part of the wire format between ranks of one run only.
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_OPS = ["encode", "decode", "sharded_encode", "sharded_decode"]


# --------------------------------------------------------------------------------------------------------------
# enable / disable
# --------------------------------------------------------------------------------------------------------------


def enable_spatial_parallelism(
    vae,
    group: Optional[dist.ProcessGroup] = None,
    *,
    timeout: Optional[float] = None,
    check_inputs: bool = True,
    attention: str = "auto",
):
    """Parallelize ``vae`` over the ranks of ``group`` by rows, in place, and return it.

    Arguments:
        vae: a diffusers VAE of a supported family (``parallel_vae.families.FAMILIES``): ``AutoencoderKLWan``
            (Wan2.1/2.2), ``AutoencoderKL`` (SD/SDXL/SD3/Flux.1), ``AutoencoderKLFlux2``, ... Its parameters and
            ``state_dict`` keys are unchanged, so a model saved while enabled loads in plain diffusers.
        group: the spatial process group. ``None`` means the default (world) group. Every rank of the group must
            call this, and then call the same encode/decode methods in the same order.
        timeout: seconds every rank of the group waits for the others at the start of each encode/decode (the
            shape agreement) before it fails with a ``SpatialTimeoutError`` naming the operation and, on gloo, the
            ranks that did not arrive. ``None``: the process group's own timeout (``init_process_group(timeout=)``,
            whose default is 30 minutes on gloo and 10 on NCCL; set it, e.g. ``datetime.timedelta(minutes=5)``).
        check_inputs: in replicated mode (``vae.encode`` / ``vae.decode``), check that every rank holds the same
            input: a fingerprint of a fixed sample of the input (``core/fingerprint.py``) travels in the shape
            agreement, and a mismatch (typically an unseeded ``torch.randn`` per rank) raises a ``ShardingError``
            on every rank. It costs three float64 sums over at most 65536 elements; ``False`` skips it.
        attention: how sequence-parallel attention over all latent tokens (MiniMax-H3's ViT decoder) meets the other
            ranks' keys and values: ``"gather"`` all-gathers them (each rank's own queries against the whole
            sequence's keys and values), ``"ring"`` passes them around the group in blocks merged by an online
            softmax (no rank holds the whole sequence's keys and values), ``"auto"`` (default) takes the gather
            while one call's whole keys and values fit in ``parallel_vae.core.attention.RING_AUTO_BYTES`` (1 GiB)
            and the ring beyond. Both are exact, forward and backward. The pixel attention of the other families'
            mid blocks always gathers.

    Returns:
        ``vae`` itself. With a group of one rank nothing is changed (the cheap no-op path).

    All ranks of ``group`` must already have called ``torch.distributed.init_process_group``. Call
    :func:`disable_spatial_parallelism` to restore the original behaviour.
    """
    adapter = adapter_for(vae)  # a TypeError naming the supported classes
    check_diffusers()  # a warning outside the tested diffusers range
    _refuse_compiled(vae)
    if is_spatially_parallel(vae):
        raise RuntimeError("spatial parallelism is already enabled on this model; disable it first")
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    elif group is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Launched as one of several processes, but no group: a group of one would make every rank decode the
        # whole input, silently.
        raise RuntimeError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but torch.distributed is not initialized, so each process "
            "would work alone. Before enable_spatial_parallelism, call\n"
            "    torch.distributed.init_process_group(backend='nccl' or 'gloo', timeout=datetime.timedelta(minutes=5))"
            "\n    (or create accelerate's Accelerator(), which does it), then pass group= or leave it None for the world"
        )
    if group is not None and group is not dist.GroupMember.WORLD and dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of the given group; only members may enable it")
    size = group_size(group)
    if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    from .core.attention import ATTENTION_MODES

    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    state = SpatialState(group, size, adapter.spatial_factor(vae), adapter)
    state.attention = attention
    state.timeout = timeout
    state.check_inputs = bool(check_inputs)
    if size > 1:
        plan = adapter.plan(vae)  # raises before anything is changed if the model holds an unknown module
        check_hooks(vae, plan)  # likewise for a diffusers/accelerate hook that cannot compose (core/hooks.py)
        apply_plan(vae, plan, state)
        follow_class(vae)  # hooks stacked before enabling now call the sharded forwards
        # Instance attributes take precedence over the class methods that encode()/decode() call.
        vae._encode = types.MethodType(_replicated_encode, vae)
        setattr(vae, adapter.decode_method, types.MethodType(_replicated_decode, vae))
    setattr(vae, _STATE_ATTR, state)
    return vae


def _refuse_compiled(vae) -> None:
    # A compiled submodule (torch.compile's OptimizedModule) holds a graph traced from the unsharded forwards, and
    # its wrapper is no diffusers class the plan knows: say so before the plan reports an unknown module.
    for name, m in vae.named_modules():
        if type(m).__name__ == "OptimizedModule" and type(m).__module__.startswith("torch._dynamo"):  # no dynamo import
            raise TypeError(
                f"vae.{name} is a torch.compile OptimizedModule: compiled before enable_spatial_parallelism. Enable "
                f"first, then compile (vae.{name} = torch.compile(vae.{name}))"
            )


def disable_spatial_parallelism(vae):
    """Undo :func:`enable_spatial_parallelism` in place and return ``vae``.

    Hooks (diffusers, accelerate) stay as they are, including those added while enabled, and call the original
    forwards again (``parallel_vae.core.hooks``)."""
    restore_hooks(vae)
    remove_plan(vae)
    state = vae.__dict__.get(_STATE_ATTR)
    entry = state.adapter.decode_method if state is not None and state.adapter is not None else "_decode"
    for name in ("_encode", "_decode", entry, _STATE_ATTR):
        vae.__dict__.pop(name, None)
    return vae


def is_spatially_parallel(vae) -> bool:
    """Whether :func:`enable_spatial_parallelism` is in effect on ``vae``."""
    return _STATE_ATTR in vae.__dict__


def spatial_group(vae):
    """The process group ``vae`` was parallelized over."""
    return _state(vae).group


def spatial_size(vae) -> int:
    """Number of ranks ``vae``'s rows are split over (1 for the no-op path)."""
    return _state(vae).size


def _state(vae) -> SpatialState:
    state = vae.__dict__.get(_STATE_ATTR)
    if state is None:
        raise RuntimeError("spatial parallelism is not enabled on this model; call enable_spatial_parallelism first")
    return state


# --------------------------------------------------------------------------------------------------------------
# agreement: before any work, all ranks check they are about to do the same thing
# --------------------------------------------------------------------------------------------------------------


def _adapter(state: SpatialState) -> FamilyAdapter:
    return state.adapter


def _describe(row: list[int]) -> str:
    op, dtype, ndim = row[0], row[1], row[2]
    shape = tuple(row[3 : 3 + ndim])
    dname = str(_DTYPES[dtype]).replace("torch.", "") if 0 <= dtype < len(_DTYPES) else "unsupported dtype"
    return f"{_OPS[op]} of {dname} {shape}"


def _agree(vae, op: str, x: torch.Tensor, state: SpatialState) -> list[int]:
    """All-gather (op, dtype, shape, device check) from every rank, validate, and return each rank's row count of
    ``x``; record the group's split in latent rows on ``state`` for the layers (``SpatialState.level_sizes``).

    In replicated mode the shapes must be identical and the returned split is the balanced one; in sharded mode
    the heights may differ and are returned as given. Every rank sees the same table, so every rank raises the
    same error (no rank proceeds to a collective that the others skip), and every rank records the same split.
    This is the one host read of an encode/decode: no layer reads a value afterwards.

    On tensors without values (``FakeTensor``, ``meta``: ``core/fake.py``) the collective still runs, but the table
    is built from this rank's row and the row arithmetic, and the split is recorded for the op's gathers.
    """
    state.split = None  # a failed agreement leaves no split behind
    sizes = _agree_sizes(vae, op, x, state)
    latent_rows = [s // (1 if op.endswith("decode") else state.factor) for s in sizes]
    if no_values(x):
        record_split(latent_rows)
    state.split = tuple(latent_rows)
    return sizes


def _model_device(vae) -> Optional[torch.device]:
    """The device of the model's activations, and so of every collective tensor: an offloading hook's execution
    device, else the parameters'."""
    hooked = hook_device(vae)
    if hooked is not None:
        return hooked
    for p in vae.parameters():
        return p.device
    return None


def _agree_sizes(vae, op: str, x: torch.Tensor, state: SpatialState) -> list[int]:
    adapter = _adapter(state)
    sharded = op.startswith("sharded")
    latent = op.endswith("decode")
    unit = 1 if latent else state.factor
    dims = list(x.shape) + [0] * (6 - x.dim()) if x.dim() <= 6 else list(x.shape[:6])
    dtype_code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else -1
    # The agreement runs on the model's device, not the input's: an input on the wrong device (a CPU tensor
    # handed to a CUDA model, which NCCL cannot even carry) is then reported by the table on every rank.
    device = state_device(vae, x)
    on_device = int(x.device == device)
    mine = [_OPS.index(op), dtype_code, x.dim()] + dims + [_compute_dtype_code(vae, x), on_device]
    meta = torch.tensor(mine, dtype=torch.int64, device=device)
    # the last _FP_WORDS words of each row: the input's fingerprint (replicated mode)
    meta = torch.cat([meta, _input_fingerprint(x, sharded, state, on_device).to(device)])
    table = torch.empty((state.size, meta.numel()), dtype=torch.int64, device=device)
    timeout = getattr(state, "timeout", None)
    if timeout is not None:
        _arrive_within(state, op, timeout, device)
    _all_gather_single(table, meta.unsqueeze(0), state.group)
    if no_values(meta):
        rows = _fake_table(mine, state, op.startswith("sharded"), unit)
    else:
        rows = [[int(v) for v in r] for r in table.tolist()]  # the one host read of the call
    prints = [row[len(mine) :] for row in rows]
    rows = [row[: len(mine)] for row in rows]

    def fail(msg: str):
        listing = "; ".join(f"rank {r}: {_describe(row)}" for r, row in enumerate(rows))
        raise ShardingError(f"{msg} [{listing}]")

    off_device = [r for r, row in enumerate(rows) if not row[-1]]
    if off_device:
        here = f"here: input on {x.device}, model on {device}" if not on_device else f"model on {device} here"
        fail(
            f"{op}: ranks {off_device} pass an input on another device than the model's ({here}); move it with "
            "x.to(vae.device) (under NCCL, call torch.cuda.set_device(local_rank) before creating the model)"
        )
    # Same op, dtype and rank count everywhere; in sharded mode every dim but the height must match.
    ndim = rows[0][2]
    height_dim = 3 + min(max(ndim - 2, 0), 5)  # offset 3 in the table, then dim -2 of the input
    for r, row in enumerate(rows):
        a, b = list(rows[0]), list(row)
        if sharded:
            a[height_dim] = b[height_dim] = 0
        a[-2] = b[-2] = 0  # the model's compute dtype: its own check below
        if a != b:
            fail(f"ranks of the spatial group disagree on the input (rank 0 vs rank {r})")
    _check_compute_dtype(rows, op, x, fail)
    op_name = "decode" if latent else "encode"
    _check_same_input(prints, op_name, fail)
    if ndim != adapter.ndim:
        layout = "(batch, channels, frames, height, width)" if adapter.video else "(batch, channels, height, width)"
        fail(f"{op_name} expects a {adapter.ndim}-D {layout} tensor, got {ndim}-D")
    if dtype_code < 0:
        fail(f"unsupported dtype {x.dtype}")
    if adapter.video:
        problem = adapter.check_frames(vae, rows[0][5], latent)
        if problem:
            fail(problem)
    channels = adapter.latent_channels(vae) if latent else adapter.pixel_channels(vae)
    if rows[0][4] != channels:
        what = "latent" if latent else "pixel"
        fail(f"{op_name} expects {channels} {what} channels (dim 1), got {rows[0][4]}")
    heights = [row[height_dim] for row in rows]
    world, factor = state.size, state.factor
    least = adapter.min_latent_rows(vae)
    if not sharded:
        if latent:
            check_latent_height(heights[0], world, factor, least)
            return row_split(heights[0], world)
        check_pixel_height(heights[0], world, factor, least)
        return scale_sizes(row_split(heights[0] // factor, world), factor)
    bad = [r for r, h in enumerate(heights) if h < unit * least or h % unit]
    if bad:
        need = f"at least {least} latent row{'s' if least > 1 else ''}"
        if not latent:
            need = f"a positive multiple of {factor} pixel rows" + (f", at least {factor * least}" if least > 1 else "")
        near = ", ".join(str(nearest_valid(heights[r], factor, 1, least)) for r in bad)
        hint = "" if latent else f" (nearest: {near})"
        fail(f"every rank's shard needs {need}; ranks {bad} have heights {[heights[r] for r in bad]}{hint}")
    return heights


# The compute-dtype column of the agreement table: not checked (under autocast), or not one of _DTYPES.
_UNCHECKED, _OTHER = -2, -1


def _compute_dtype_code(vae, x: torch.Tensor) -> int:
    """The dtype ``vae`` computes in, as a code of the agreement table, for :func:`_check_compute_dtype`.

    ``vae.dtype`` is diffusers' own answer: the compute dtype of a model under ``enable_layerwise_casting`` (whose
    parameters are stored in another dtype), else its first floating parameter's (``_keep_in_fp32_modules``
    skipped). Under ``torch.autocast`` for the input's device the model legitimately takes another dtype (autocast
    casts at each op, as plain diffusers runs it): not checked."""
    try:
        autocast = torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast can be on for it
        autocast = False
    if autocast:
        return _UNCHECKED
    dtype = getattr(vae, "dtype", None)
    return _DTYPES.index(dtype) if dtype in _DTYPES else _OTHER


def _check_compute_dtype(rows: list[list[int]], op: str, x: torch.Tensor, fail) -> None:
    """The input's dtype must be the model's compute dtype (outside autocast), as plain diffusers requires: its
    first convolution refuses a mismatch ("Input type (float) and bias type (c10::Half) should be the same"),
    while the sharded path would fail later and on some ranks only (oneDNN's "could not create a primitive
    descriptor"). Decided from the table, so every rank raises the same error before any work."""
    codes = [row[-2] for row in rows]
    if len(set(codes)) > 1:
        fail(f"{op}: ranks of the spatial group disagree on the model's compute dtype or on torch.autocast (codes {codes})")
    code, given = codes[0], rows[0][1]
    if code < 0 or given < 0 or code == given:  # under autocast, an unknown dtype (checked below), or a match
        return
    model, data = (str(_DTYPES[c]).replace("torch.", "") for c in (code, given))
    what = "latents" if op.endswith("decode") else "pixels"
    fail(
        f"{op}: the input is {data} but the model computes in {model} (diffusers refuses the mismatch too); cast "
        f"the {what} with x.to(vae.dtype), or the model with vae.to(torch.{data}), or run under torch.autocast"
    )


def _input_fingerprint(x: torch.Tensor, sharded: bool, state: SpatialState, on_device: bool) -> torch.Tensor:
    """This rank's input fingerprint for the agreement table (zeros where it is not checked: sharded mode, where the
    inputs differ by design, ``check_inputs=False``, fake and meta tensors, which have no values, and an input on
    another device than the model's, which the table reports instead)."""
    if sharded or not getattr(state, "check_inputs", True) or no_values(x) or not on_device:
        return torch.zeros(_FP_WORDS, dtype=torch.int64, device=x.device)
    return fingerprint_words(x)


def _check_same_input(prints: list[list[int]], op_name: str, fail) -> None:
    """Replicated mode: every rank must hold the same input; name the ranks whose fingerprint differs from rank 0's."""
    differ = [r for r, p in enumerate(prints) if fingerprints_differ(prints[0], p)]
    if differ:
        fail(
            f"{op_name}: ranks {differ} hold a different input from rank 0 (same shape, different values; replicated "
            "mode needs the same full input on every rank). Likely cause: each rank drew its input with an unseeded "
            "torch.randn: seed it the same on every rank (torch.manual_seed(0), or a torch.Generator), or "
            "broadcast it from rank 0 (dist.broadcast). Opt out with enable_spatial_parallelism(check_inputs=False)"
        )


def _fake_table(mine: list[int], state: SpatialState, sharded: bool, unit: int) -> list[list[int]]:
    """The agreement's table on fake tensors: every rank runs the same op on the same shape, except that in sharded
    mode the heights are the group's assumed split (``core/fake.py``) in units of ``unit`` rows. A height that is
    not a multiple of ``unit`` is left as it is, for the checks to reject."""
    rows = [list(mine) for _ in range(state.size)]
    height_dim = 3 + min(max(mine[2] - 2, 0), 5)
    height = mine[height_dim]
    if sharded and height % unit == 0:
        split = group_split(height // unit, state.size, group_rank(state.group))
        for row, latent_rows in zip(rows, split):
            row[height_dim] = latent_rows * unit
    return rows


class SpatialTimeoutError(TimeoutError):
    """A rank of the spatial group did not arrive at an encode/decode within ``enable_spatial_parallelism``'s
    ``timeout``."""


def _arrive_within(state: SpatialState, op: str, timeout: float, device: torch.device) -> None:
    """Every rank of the group meets here within ``timeout`` seconds, or this rank raises naming the operation.

    gloo: ``monitored_barrier`` names the ranks that did not arrive (group rank 0 sees them; the others see that
    rank 0 gave up). Other backends: a one-element all-reduce on ``device`` (the agreement's: the model's, which
    under NCCL is this rank's GPU) is awaited with the deadline."""
    deadline = datetime.timedelta(seconds=timeout)
    group = state.group
    if dist.get_backend(group) == "gloo":
        try:
            dist.monitored_barrier(group=group, timeout=deadline, wait_all_ranks=True)
        except RuntimeError as e:
            raise SpatialTimeoutError(
                f"{op}: the spatial group did not meet within {timeout:g} s ({str(e).splitlines()[0]}); a rank of "
                "the group stopped or is not calling the same encode/decode"
            ) from None
        return
    probe = torch.zeros(1, device=device)
    work = dist.all_reduce(probe, group=group, async_op=True)
    try:
        work.wait(timeout=deadline)
    except RuntimeError as e:
        raise SpatialTimeoutError(
            f"{op}: the spatial group did not meet within {timeout:g} s ({str(e).splitlines()[0]})"
        ) from None


def state_device(vae, x: Optional[torch.Tensor] = None) -> torch.device:
    """The device the collectives of an encode/decode of ``vae`` run on: the model's (which the input must share),
    else ``x``'s. Never ``torch.cuda.current_device()``: a rank that forgot ``torch.cuda.set_device`` would put its
    collectives on cuda:0 while its model sits elsewhere."""
    device = _model_device(vae)
    if device is None:
        if x is None:
            raise ValueError("the model has no parameters: pass the input to find the device")
        device = x.device
    return device


def _check_tiling(vae) -> None:
    verify_hooks(vae)  # a hook added while enabled neither bypasses the sharded forwards nor breaks the collectives
    if _adapter(_state(vae)).tiling_enabled(vae):
        raise RuntimeError(
            "spatial parallelism and diffusers tiling are exclusive (tiles would be cut from shards); "
            "call vae.disable_tiling() - the rows are already split over the group"
        )


# --------------------------------------------------------------------------------------------------------------
# replicated mode: installed as vae._encode / vae._decode
# --------------------------------------------------------------------------------------------------------------


def _replicated_encode(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    state = _state(self)
    extra, _ = _adapter(state).call_args(self, "_encode", args, kwargs)
    _check_tiling(self)
    sizes = _agree(self, "encode", x, state)
    with fail_fast(state.group, "encode"):  # a rank that raises from here on fails its peers at once
        # (.., H, W) -> (.., H_r, W): my pixel rows; backward all-gathers the input gradient.
        x_local = scatter_rows(x, state.group, dim=-2, sizes=sizes)
        h_local = _adapter(state).encode_local(self, x_local, **extra)
        return gather_rows(h_local, state.group, dim=-2, sizes=[s // state.factor for s in sizes])


def _replicated_decode(self, z: torch.Tensor, *args, **kwargs):
    """Stands in for the class's own ``_decode`` (same signature and return type, which differ by family), or for
    ``decode`` in a class without ``_decode`` (``FamilyAdapter.decode_method``)."""
    state = _state(self)
    adapter = _adapter(state)
    extra, return_dict = adapter.call_args(self, adapter.decode_method, args, kwargs)
    _check_tiling(self)
    sizes = _agree(self, "decode", z, state)
    with fail_fast(state.group, "decode"):
        z_local = scatter_rows(z, state.group, dim=-2, sizes=sizes)
        out_local = adapter.decode_local(self, z_local, **extra)
        out = gather_rows(out_local, state.group, dim=-2, sizes=scale_sizes(sizes, state.factor))
    return adapter.wrap_decoded(out, return_dict)


# --------------------------------------------------------------------------------------------------------------
# sharded mode
# --------------------------------------------------------------------------------------------------------------


def sharded_encode(vae, x_local: torch.Tensor, **kwargs) -> DiagonalGaussianDistribution:
    """Encode this rank's pixel rows; returns the posterior over this rank's latent rows (a point mass at the
    latents for a deterministic encoder, DC-AE: ``mode()`` is the latents, ``parameters`` too).

    ``x_local`` is (B, C, T, H_r, W) (videos) or (B, C, H_r, W) (images) with H_r a positive multiple of the spatial factor; the shards of the group,
    in group-rank order, are the rows of the whole video (any split; :func:`shard_video` gives the balanced one).
    ``kwargs``: the class's own further ``encode`` arguments (LTX-2: ``causal``), the same on every rank.
    """
    state = _state(vae)
    adapter = _adapter(state)
    if state.size == 1:
        return adapter.posterior_of(vae.encode(x_local, **kwargs))
    extra, _ = adapter.call_args(vae, "_encode", (), kwargs)
    _check_tiling(vae)
    _agree(vae, "sharded_encode", x_local, state)
    parts = x_local.split(1) if getattr(vae, "use_slicing", False) and x_local.shape[0] > 1 else [x_local]
    with fail_fast(state.group, "sharded_encode"):
        h = torch.cat([adapter.encode_local(vae, p, **extra) for p in parts])
    return adapter.posterior(h)


def sharded_decode(vae, z_local: torch.Tensor, **kwargs) -> torch.Tensor:
    """Decode this rank's latent rows (B, C, [T,] h_r, w) into its pixel rows (B, C', [T',] h_r x factor, w x factor).

    ``kwargs``: the class's own further ``decode`` arguments (LTX: ``temb``, the per-sample decode timestep of a
    timestep-conditioned decoder; LTX-2 also ``causal``), the same on every rank."""
    state = _state(vae)
    if state.size == 1:
        return vae.decode(z_local, **kwargs).sample
    extra, _ = _adapter(state).call_args(vae, _adapter(state).decode_method, (), kwargs)
    _check_tiling(vae)
    _agree(vae, "sharded_decode", z_local, state)
    parts = z_local.split(1) if getattr(vae, "use_slicing", False) and z_local.shape[0] > 1 else [z_local]
    with fail_fast(state.group, "sharded_decode"):
        return torch.cat([_adapter(state).decode_local(vae, p, **extra) for p in parts])


def local_rows(vae, latent_height: int) -> tuple[int, int]:
    """(first latent row, number of latent rows) of this rank under the balanced split of ``latent_height``."""
    state = _state(vae)
    check_latent_height(latent_height, state.size, state.factor, _adapter(state).min_latent_rows(vae))
    sizes = row_split(latent_height, state.size)
    rank = group_rank(state.group) if state.size > 1 else 0
    return sum(sizes[:rank]), sizes[rank]


def shard_video(vae, x: torch.Tensor) -> torch.Tensor:
    """forward: keep my pixel rows of a full video or image (balanced split in latent-row units); backward: all-gather."""
    state = _state(vae)
    check_pixel_height(x.shape[-2], state.size, state.factor, _adapter(state).min_latent_rows(vae))
    return scatter_rows(x, state.group, dim=-2, unit=state.factor)


def shard_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """forward: keep my latent rows of full latents (balanced split); backward: all-gather."""
    state = _state(vae)
    check_latent_height(z.shape[-2], state.size, state.factor, _adapter(state).min_latent_rows(vae))
    return scatter_rows(z, state.group, dim=-2)


def gather_shards(
    vae, x_local: torch.Tensor, sum_grads: bool = False, sizes: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """forward: all-gather the group's row shards (variable sizes) into the full tensor; backward: keep my rows'
    gradient (every rank computes the same loss), or reduce-scatter it with ``sum_grads=True``.

    ``sizes``: every rank's rows, when known (e.g. :func:`agreed_sizes` right after an encode/decode); by default
    one small all-gather finds them (a host read)."""
    state = _state(vae)
    return gather_rows(x_local, state.group, dim=-2, sizes=sizes, sum_grads=sum_grads)


def agreed_sizes(vae, x_local: torch.Tensor) -> Optional[list[int]]:
    """Every rank's rows of ``x_local`` (dim -2) under the split the most recent encode/decode agreed on, with no
    communication; ``None`` before any. Only for a tensor of that encode/decode (its output, or its posterior):
    shards of anything else may be split differently."""
    return _state(vae).level_sizes(x_local.shape[-2])

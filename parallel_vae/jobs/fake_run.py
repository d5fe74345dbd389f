"""Per-rank memory, FLOPs and traffic of real-scale shapes, measured on fake tensors on one CPU.

A 1280x720x81 Wan decode cannot run on two CPU cores, but what it allocates, computes and sends is a function of
shapes alone. Under ``FakeTensorMode`` every op runs its shape logic and allocates a fake storage of the real size,
and nothing is computed. One fake rank at a time, over a fake process group (``backend="fake"``: every collective
returns at once), rank r of N runs exactly the code it runs on a GPU: its shard, its halo exchanges, its
gathers. On top of that run:

* :class:`LiveBytes` (a ``TorchDispatchMode``) sees every op's outputs and when their storages die: the peak bytes
  of tensors alive at once, and the op that reached it;
* ``torch.utils.flop_counter.FlopCounterMode`` counts FLOPs from the shapes (without its module tracker, whose
  hooks keep checkpointed recomputations alive: :func:`flop_counter`);
* ``parallel_vae.core.comm.count_traffic`` counts the bytes every collective sends and receives, by kind.

The library's two value reads (the shape agreement and variable-size gathers) take their row counts from the row
arithmetic on fake tensors (``parallel_vae.core.fake``). The same functions run on real tensors and a real group,
so tests check that both give the same numbers at small shapes (``tests/test_fake_scale.py``).

Workloads (:func:`run_workload`): ``decode``, ``encode`` (inference, no autograd) and ``train``: one fine-tuning
step as the recipe runs it (``ShardedAutoencoder``, ``vae_loss`` on this rank's rows, backward) followed by an
AdamW step in mixed precision: compute weights in the model's dtype, float32 master weights and AdamW moments.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpointing import host_allocation
from ..core.fake import assume_split
from ..core.sharding import row_split

__all__ = [
    "LiveBytes",
    "register_conv_flops",
    "flop_counter",
    "fake_rank",
    "build_model",
    "local_input",
    "MixedPrecisionAdamW",
    "run_workload",
    "measure",
    "Measurement",
    "distinct_ranks",
    "measure_rank",
    "decode_flops_per_rank",
]


class LiveBytes:
    """Peak bytes of tensor storages allocated inside the ``with`` block and alive at the same time.

    Each op's outputs whose storage is not one of its inputs' are new allocations, counted until a
    ``weakref.finalize`` on the storage reports it freed. Storages are keyed by their C++ object (``_cdata``), not
    by data pointer, so fake storages (which have no data) count the same as real ones. Tensors made before the
    block (weights, inputs) are not counted; scratch memory inside one kernel is not seen. ``phase_peaks`` keeps
    the peak reached before each :meth:`mark`.
    """

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self.peak_op = ""
        self.peak_shape: tuple = ()
        self.allocations = 0
        self.phase_peaks: dict[str, int] = {}
        self._phase_peak = 0
        self._live: dict[int, int] = {}
        self._mode = None

    def mark(self, phase: str) -> None:
        """End a phase: remember its peak, and start the next phase's peak from the bytes alive now."""
        self.phase_peaks[phase] = self._phase_peak
        self._phase_peak = self.current

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _track(self, t: torch.Tensor, inputs: set, func) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # opaque tensors (e.g. mkldnn) have no storage
            return
        if host_allocation():  # an offloaded copy in host memory: not device bytes
            return
        key, nbytes = storage._cdata, storage.nbytes()
        if nbytes == 0 or key in inputs or key in self._live:
            return
        self._live[key] = nbytes
        self.current += nbytes
        self.allocations += 1
        weakref.finalize(storage, self._free, key)
        self._phase_peak = max(self._phase_peak, self.current)
        if self.current > self.peak:
            self.peak, self.peak_op, self.peak_shape = self.current, str(func), tuple(t.shape)

    def __enter__(self) -> "LiveBytes":
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = set()
                for a in tree_flatten((args, kwargs))[0]:
                    if isinstance(a, torch.Tensor):
                        with contextlib.suppress(RuntimeError, NotImplementedError):
                            inputs.add(a.untyped_storage()._cdata)
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker._track(t, inputs, func)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def register_conv_flops() -> None:
    """Teach ``FlopCounterMode`` the oneDNN convolution that the halo layers call directly for float32 on CPU
    (torch's registry knows ``aten.convolution`` and friends, not ``aten.mkldnn_convolution``)."""
    from torch.utils import flop_counter

    op = torch.ops.aten.mkldnn_convolution
    if op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _mkldnn_conv_flop(x_shape, w_shape, bias, padding, stride, dilation, groups, *args, out_shape=None, **kw):
        return flop_counter.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


class _GlobalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker: counts go to "Global" only, and no module hooks run."""

    parents = {"Global"}
    is_bw = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def flop_counter():
    """A ``FlopCounterMode`` that counts total FLOPs without tracking modules.

    Why: its module tracker hooks every module's forward and calls ``register_multi_grad_hook`` on the outputs. A
    checkpointed block's recomputation during backward runs those hooks again, on recomputed outputs whose
    gradient hooks never fire, and the hooks keep the recomputed activations alive until the counter exits. Under
    the stock counter, a checkpointed Wan training step (base_dim 8, 9x64x64) peaks at 102 MB with 93 MB still
    alive after backward; with this one at 46 MB, with 3.7 MB alive (the same as without checkpointing): that
    was the fake table's "165.6 GB alive after backward". The totals are the same: only per-module counts go."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    return counter


@contextlib.contextmanager
def fake_rank(world: int, rank: int, latent_rows: int) -> Iterator[Optional[dist.ProcessGroup]]:
    """Be rank ``rank`` of a fake process group of ``world`` ranks whose latents have ``latent_rows`` rows (balanced
    split). Yields the group (None for a world of one: no group, the unmodified model). Collectives return at once;
    ``count_traffic`` still counts them."""
    if world == 1:
        yield None
        return
    import torch.testing._internal.distributed.fake_pg as fake_pg

    if dist.is_initialized():
        raise RuntimeError("fake_rank needs a process without a process group")
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=world)
    try:
        with assume_split(row_split(latent_rows, world)):
            yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def build_model(cls_name: str, config: dict, dtype: torch.dtype) -> nn.Module:
    """The diffusers model ``cls_name(**config)`` in ``dtype``, eval mode (dropout off; training mode changes
    nothing else in these VAEs). Under ``FakeTensorMode`` its weights are fake: no memory, no initialization cost."""
    import diffusers

    # Built in the dtype (default dtype during __init__) rather than cast after: a fake model's parameters cannot be
    # swapped by .to().
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    # A class that clones a module-level constant tensor in __init__ (Cosmos's Haar wavelets) hands the active fake
    # mode a real tensor: allow that while building (the clone becomes a fake buffer).
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode()
    allowed = getattr(mode, "allow_non_fake_inputs", None)
    if mode is not None:
        mode.allow_non_fake_inputs = True
    try:
        return getattr(diffusers, cls_name)(**config).eval()
    finally:
        torch.set_default_dtype(previous)
        if mode is not None:
            mode.allow_non_fake_inputs = allowed


def local_input(vae: nn.Module, op: str, frames: Optional[int], height: int, width: int, rows: int,
                dtype: torch.dtype, batch: int = 1) -> torch.Tensor:
    """A random input of this rank's ``rows`` latent rows: latents (decode) or pixels (encode, train) of a clip of
    ``frames`` pixel frames (None: an image family) and ``height`` x ``width`` pixels."""
    from ..families import adapter_for

    adapter = adapter_for(vae)
    f = adapter.spatial_factor(vae)
    if op == "decode":
        lead = (adapter.latent_frames(vae, frames),) if adapter.video else ()
        return torch.randn((batch, adapter.latent_channels(vae)) + lead + (rows, width // f), dtype=dtype)
    lead = (adapter.usable_frames(vae, frames),) if adapter.video else ()
    return torch.rand((batch, adapter.pixel_channels(vae)) + lead + (rows * f, width), dtype=dtype) * 2 - 1


class MixedPrecisionAdamW:
    """AdamW on float32 master copies of a low-precision model's weights (what DeepSpeed's and Megatron's bf16
    training keep): after backward, the model's gradients are copied into the masters, AdamW steps them, and the
    model's weights are rewritten from them. Per parameter: compute weight + gradient (model dtype), master +
    exp_avg + exp_avg_sq (float32)."""

    def __init__(self, params: list[nn.Parameter], lr: float = 1e-5):
        self.params = params
        self.masters = [p.detach().to(torch.float32, copy=True).requires_grad_() for p in params]
        # foreach=False: the per-tensor loop, whose temporaries are one parameter's size at a time.
        self.opt = torch.optim.AdamW(self.masters, lr=lr, foreach=False)

    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)
                m.grad = None

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor) and t.dim())

    def master_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.masters)


def run_workload(vae: nn.Module, op: str, x_local: torch.Tensor, *, numel: int = 0,
                 optimizer: Optional[MixedPrecisionAdamW] = None, tracker: Optional[LiveBytes] = None):
    """Run ``op`` on this rank's rows (the model must have spatial parallelism enabled, a group of one included).

    ``decode`` / ``encode``: the sharded path without autograd; returns this rank's output rows (posterior moments
    for encode). ``reward``: ``decode_for_reward`` of latents that require grad through the frozen model, a
    pixel-space loss of this rank's rows, backward to the latents. ``train``: encode, posterior sample, decode, the recipe's loss on this rank's rows (``numel``: the
    whole clip's element count), backward, and ``optimizer``'s step; returns the loss."""
    import parallel_vae as pv

    from .training import ShardedAutoencoder, vae_loss

    if op == "decode":
        with torch.no_grad():
            return pv.sharded_decode(vae, x_local)
    if op == "encode":
        with torch.no_grad():
            return pv.sharded_encode(vae, x_local).parameters
    if op == "reward":
        # the reward use case: a frozen VAE, latents that require grad, a pixel-space loss of this rank's rows
        # (a sum of squares stands in for the reward), backward to the latents; no optimizer
        out = pv.decode_for_reward(vae, x_local)
        loss = out.float().square().sum()
        del out
        loss.backward()
        if tracker is not None:
            tracker.mark("forward_backward")
        return loss.detach()
    if op != "train":
        raise ValueError(f"unknown workload {op!r}")
    group = pv.spatial_group(vae)
    recon, moments = ShardedAutoencoder(vae)(x_local, torch.randn_like(moments_shape(vae, x_local)))
    loss, _ = vae_loss(recon, x_local, moments, numel=numel, group=group, mse=1.0)
    del recon, moments
    loss.backward()
    if tracker is not None:
        tracker.mark("forward_backward")
    if optimizer is not None:
        optimizer.step()
        if tracker is not None:
            tracker.mark("optimizer")
    return loss.detach()


def moments_shape(vae: nn.Module, x_local: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped like the posterior mean of ``x_local`` (for the sampling noise)."""
    from ..families import adapter_for

    adapter = adapter_for(vae)
    f = adapter.spatial_factor(vae)
    lead = (adapter.latent_frames(vae, x_local.shape[2]),) if adapter.video else ()
    shape = (x_local.shape[0], adapter.latent_channels(vae)) + lead + (x_local.shape[-2] // f, x_local.shape[-1] // f)
    return x_local.new_empty(shape)


@dataclass
class Measurement:
    """What one rank allocated, computed and exchanged in one workload."""

    flops: int
    peak_live_bytes: int
    peak_op: str
    peak_shape: tuple
    traffic: dict
    weight_bytes: int
    input_bytes: int
    output_bytes: int
    phases: dict = field(default_factory=dict)
    optimizer_state_bytes: int = 0
    master_bytes: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__, peak_shape=list(self.peak_shape))


def measure(vae: nn.Module, op: str, x_local: torch.Tensor, *, numel: int = 0,
            optimizer: Optional[MixedPrecisionAdamW] = None) -> Measurement:
    """Run the workload under a live-bytes tracker, a FLOP counter and the traffic counter."""
    from ..core.comm import count_traffic

    register_conv_flops()
    weight_bytes = sum(t.numel() * t.element_size() for t in list(vae.parameters()) + list(vae.buffers()))
    with count_traffic() as traffic, flop_counter() as flops, LiveBytes() as tracker:
        out = run_workload(vae, op, x_local, numel=numel, optimizer=optimizer, tracker=tracker)
    return Measurement(
        flops=int(flops.get_total_flops()),
        peak_live_bytes=tracker.peak,
        peak_op=tracker.peak_op,
        peak_shape=tracker.peak_shape,
        traffic={k: v for k, v in traffic.as_dict().items() if not k.startswith("wait_s")},  # timings differ by run
        weight_bytes=weight_bytes,
        input_bytes=x_local.numel() * x_local.element_size(),
        output_bytes=out.numel() * out.element_size() if op not in ("train", "reward") else 0,
        phases=dict(tracker.phase_peaks),
        optimizer_state_bytes=optimizer.state_bytes() if optimizer is not None else 0,
        master_bytes=optimizer.master_bytes() if optimizer is not None else 0,
    )


def distinct_ranks(latent_rows: int, world: int) -> dict[int, list[int]]:
    """Representative rank -> the ranks that run the same shapes (same shard height and the same edges: first,
    last or interior), so that their counts are identical and one run stands for all of them."""
    sizes = row_split(latent_rows, world)
    classes: dict[tuple, list[int]] = {}
    for r, s in enumerate(sizes):
        classes.setdefault((s, r == 0, r == world - 1), []).append(r)
    return {ranks[0]: ranks for ranks in classes.values()}


def measure_rank(cls_name: str, config: dict, op: str, frames: Optional[int], height: int, width: int, world: int,
                 rank: int, dtype: torch.dtype, *, fake: bool = True, checkpointing: bool = False,
                 offload: bool = False, seed: int = 0, attention: str = "auto") -> dict:
    """Build ``cls_name(**config)``, make this process rank ``rank`` of ``world`` and measure ``op`` on its shard.

    ``fake=True``: fake tensors and a fake process group (this process must have no process group). ``fake=False``:
    real tensors on the default process group, which the caller has initialized with ``world`` ranks (or none, for
    a world of one). Both run the same code, so their numbers can be compared (tests/test_fake_scale.py).
    ``attention``: ``enable_spatial_parallelism``'s sequence-attention mode. A model that ships with diffusers tiling
    on (MiniMax-H3) is measured untiled, the model parallelism runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import parallel_vae as pv

    from ..families import adapter_for

    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_model(cls_name, config, dtype)
        adapter = adapter_for(vae)
        factor = adapter.spatial_factor(vae)
        if height % factor:
            raise ValueError(f"height {height} is not a multiple of the spatial factor {factor}")
        rows_total = height // factor
        ranks = fake_rank(world, rank, rows_total) if fake else contextlib.nullcontext(
            dist.group.WORLD if world > 1 else None)
        with ranks as group:
            if getattr(vae, "use_tiling", False):
                vae.disable_tiling()
            pv.enable_spatial_parallelism(vae, group, attention=attention)
            rows = row_split(rows_total, world)[rank]
            x = local_input(vae, "decode" if op in ("decode", "reward") else "encode", frames, height, width, rows,
                            dtype)
            optimizer = None
            if op == "reward":  # a frozen model, latents with grad
                vae.requires_grad_(False)
                x.requires_grad_(True)
            if op == "train":
                vae.train()
            if checkpointing and op in ("train", "reward"):
                pv.enable_gradient_checkpointing(vae, offload=offload)
            if op == "train":
                optimizer = MixedPrecisionAdamW(list(vae.parameters()))
            m = measure(vae, op, x, numel=x.numel() // rows * rows_total, optimizer=optimizer)
    out = m.as_dict()
    out.update(params=sum(p.numel() for p in vae.parameters()), latent_rows=rows)
    return out


def decode_flops_per_rank(vae: nn.Module, latent_shape: tuple, world: int) -> float:
    """FLOPs of the busiest rank's share of decoding latents of ``latent_shape`` ((B, C, [T,] h, w)) over ``world``
    ranks: what ``--parallel auto`` weighs, since a wide model pays for sharding at fewer latent elements.

    Counted on fake tensors (no compute, well under a second): a model of ``vae``'s class and config decodes the
    largest shard's ``ceil(h / world)`` rows with the unmodified path (halos add a few % at real sizes, which the
    decision can ignore). Video families run at most two latent frames and extrapolate linearly: framewise decoders
    (Wan, Qwen-Image) spend the same on every frame after the first; for whole-clip decoders the attention grows
    faster than that, so the count is a lower bound there. Deterministic, so every rank decides the same."""
    import math

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from ..families import adapter_for

    adapter = adapter_for(vae)
    rows = math.ceil(latent_shape[-2] / world)
    frames = latent_shape[2] if adapter.video else 1
    run_frames = min(frames, 2)
    dtype = next(vae.parameters()).dtype
    counts = []
    with FakeTensorMode():
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype if dtype.is_floating_point else previous)
        try:
            model = type(vae).from_config(vae.config).eval()
        finally:
            torch.set_default_dtype(previous)
        for t in sorted({1, run_frames}):
            shape = list(latent_shape)
            shape[-2] = rows
            if adapter.video:
                shape[2] = t
            z = torch.empty(shape, dtype=dtype)
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                adapter.decode_local(model, z)
            counts.append(fc.get_total_flops())
    first = counts[0]
    per_frame = counts[-1] - first if len(counts) > 1 else 0
    return float(first + per_frame * (frames - 1))

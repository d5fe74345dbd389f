"""Device conformance on CPU: every path with the model and every tensor on ``meta``, over a ``meta``-only group.

``dist.init_process_group("meta:fake", store=FakeStore())`` registers the fake backend for the ``meta`` device
only, so a collective on a CPU tensor fails with NCCL's own error ("No backend type associated with device type
cpu"), and a host read of a meta tensor (``.item()``, ``.tolist()``, ``bool()``) raises. One run therefore catches
both GPU defect classes that gloo hides: CPU tensors in collectives, and host syncs. On top, every host-to-device
transfer (a new host tensor copied to the device, a CPU -> meta copy) is recorded with its call site: an
encode/decode may make exactly one, the shape agreement's, and no layer may make any.

The fake group needs no peers, so one process plays every rank of the group in turn (``rank=r``). Every seeded
layout (``SEEDED_LAYOUTS``) runs replicated and sharded decode and encode (``decode_video`` / ``encode_video``),
a sharded training step with backward (``vae_loss``: ``sharded_loss``), the same step under activation
checkpointing, ``gather_shards``, and the fine-tuning recipe's reductions (``jobs/reductions.py`` and
``finetune_job._validate``'s totals).
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

import parallel_vae as pv
from parallel_vae import api
from parallel_vae.core.fake import assume_split
from parallel_vae.checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing
from parallel_vae.families import adapter_for
from parallel_vae.jobs.models import SEEDED_LAYOUTS, build_seeded_vae
from parallel_vae.jobs.reductions import reduce_on_device, sum_over_ranks
from parallel_vae.jobs.training import vae_loss
from parallel_vae.pipeline import decode_video, encode_video

META = torch.device("meta")
_API = os.path.join("parallel_vae", "api.py")
# EXEMPTION (the only one; the lead removes it when the fused GroupNorm lands): the distributed GroupNorm's backward
# in core/norm.py builds its element count with torch.tensor(..., device=x.device), a host-to-device copy per
# GroupNorm layer. The GroupNorm rewrite (issue 17, item 5) removes it.
_EXEMPT = (os.path.join("parallel_vae", "core", "norm.py"),)
# Layouts that also run several frame chunks and the checkpointed step (meta kernels are slow Python: the whole
# file has a ~40 s budget). wan2.1: causal caches and the cache-aware checkpoint; sd: diffusers' own checkpoint.
_DEEP = ("wan2.1", "sd")


def _site(depth: int = 2) -> str:
    """The first frame outside torch and this file: where the transfer was asked for."""
    f = sys._getframe(depth)
    while f is not None and (
        os.sep + "torch" + os.sep in f.f_code.co_filename or f.f_code.co_filename == __file__
    ):
        f = f.f_back
    return "?" if f is None else f"{f.f_code.co_filename}:{f.f_lineno} ({f.f_code.co_name})"


class HostTraffic(TorchDispatchMode):
    """Records host reads (``_local_scalar_dense``: ``.item()``, ``.tolist()``, ``bool()``) and host<->device copies
    of the ops it sees, and, through ``torch.tensor`` / ``torch.as_tensor``, new host data sent to a device (those
    two create the device tensor without an op this mode could see)."""

    def __init__(self):
        super().__init__()
        self.reads, self.transfers = [], []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(_site(3))
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[0] if func is torch.ops.aten._to_copy.default else args[1]
            dst = kwargs.get("device") if func is torch.ops.aten._to_copy.default else args[0].device
            if isinstance(src, torch.Tensor) and dst is not None and torch.device(dst).type != src.device.type:
                self.transfers.append(_site(3))
        return func(*args, **kwargs)

    def __enter__(self):
        self._saved = torch.tensor, torch.as_tensor
        record = self.transfers

        def wrap(fn):
            def created(*a, **kw):
                device = kw.get("device")
                if device is not None and torch.device(device).type != "cpu":
                    record.append(_site(2))
                return fn(*a, **kw)

            return created

        torch.tensor, torch.as_tensor = wrap(torch.tensor), wrap(torch.as_tensor)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.tensor, torch.as_tensor = self._saved
        return super().__exit__(*exc)

    def check(self, what: str, agreements: int) -> None:
        """No host read; every transfer is an agreement's (exactly ``agreements`` of them) or the exempt one."""
        assert not self.reads, f"{what}: host reads at {self.reads}"
        other = [s for s in self.transfers if _API not in s and not any(e in s for e in _EXEMPT)]
        assert not other, f"{what}: host-to-device transfers outside the agreement at {other}"
        agreed = [s for s in self.transfers if _API in s]
        assert len(agreed) == agreements, f"{what}: {len(agreed)} agreement transfers, expected {agreements}: {agreed}"


def _traffic(what: str, agreements: int, fn):
    mode = HostTraffic()
    with mode:
        out = fn()
    mode.check(what, agreements)
    return out


def _first_valid_frames(vae, adapter, several: bool) -> int:
    """The fewest pixel frames the model takes (several chunks of a causal-cache model when ``several``)."""
    if not adapter.video:
        return 1
    for frames in ((5, 9, 17, 22) if several else (1, 5, 9, 17, 22)):
        # the clip encodes, and its latents decode (MiniMax-H3 decodes at least 3 latent frames: 22 pixel frames)
        latent = adapter.latent_frames(vae, frames)
        if not adapter.check_frames(vae, frames, False) and not adapter.check_frames(vae, latent, True):
            return frames
    raise AssertionError(f"{type(vae).__name__}: no small frame count is valid")


# Layouts built with fewer or smaller layers of the same kinds (meta kernels are slow Python): LTX-2.5's diffusion
# decoder has 24 neighbourhood-attention blocks at the released depths, whose kernels need 7 x 7 latents of 3 frames;
# Cosmos one resnet per block.
_SHALLOW = {
    "ltx2diffusion": {
        "decoder_stage_depths": [1, 1, 1, 1, 1],
        "decoder_stage_kernels": [[3, 3, 3]] * 4,
        "decoder_stage5_kernel": [1, 3, 3],
    },
    "cosmos": {"num_layers": 1},
}


def _meta_model(layout: str):
    width = 32 if layout == "mochi" else 8
    # MiniMax-H3: 2 of its 36 ViT blocks (the same layer kinds; meta kernels are slow Python)
    overrides = {"decoder_num_layers": 2} if layout == "minimax_h3" else _SHALLOW.get(layout)
    vae = build_seeded_vae(layout, width=width, latent=4 if layout != "mochi" else None, seed=0, overrides=overrides)
    if getattr(vae, "use_tiling", False):  # MiniMax-H3 ships with tiling on; the parallel model is the untiled one
        vae.disable_tiling()
    return vae.to(META)


def _stub_runtime(world: int):
    """What ``finetune_job._validate`` asks of the Runtime, with rank 1's answers (not the main rank)."""
    from contextlib import nullcontext

    return types.SimpleNamespace(
        accelerator=types.SimpleNamespace(autocast=nullcontext),
        device=META,
        is_main=False,
        trackers_started=False,
        distributed=True,
        gather_object=lambda obj: [obj] * world,  # an object collective: torch puts it on the current CUDA device
    )


def _run_rank(layout: str, vae, rank: int, world: int, validate: bool) -> None:
    dist.init_process_group("meta:fake", rank=rank, world_size=world, store=FakeStore())
    try:
        pv.enable_spatial_parallelism(vae)
        latent_h = world * adapter_for(vae).min_latent_rows(vae) + 1  # uneven: the first rank holds one row more
        # What the other ranks would report in a sharded agreement (core/fake.py): this process plays one rank.
        with assume_split(pv.row_split(latent_h, world)):
            _paths(layout, vae, rank, world, latent_h, validate)
    finally:
        pv.disable_spatial_parallelism(vae)
        dist.destroy_process_group()


def _decoder_only_paths(layout: str, vae, world: int) -> None:
    """A class without an encoder (LTX-2.5's diffusion decoder): replicated decode, and a sharded decode step with
    the sharded loss and backward, on 3 x 3 latents (3-row windows at stage 1)."""
    adapter = adapter_for(vae)
    f, zc = adapter.spatial_factor(vae), adapter.latent_channels(vae)
    frames = next(t for t in (1, 2, 3, 4) if not adapter.check_frames(vae, t, True))
    latent_h = 3
    with assume_split(pv.row_split(latent_h, world)):
        _decode_step(layout, vae, adapter, torch.empty((1, zc, frames, latent_h, 3), device=META), f)


def _decode_step(layout, vae, adapter, z, f) -> None:
    latent_h = z.shape[-2]
    out = _traffic(f"{layout} replicated decode", 1, lambda: decode_video(vae, z))
    assert out.shape[-2] == latent_h * f and out.device == META
    start, rows = pv.local_rows(vae, latent_h)
    z_local = z.narrow(-2, start, rows).requires_grad_(True)

    def step():
        recon = decode_video(vae, z_local, sharded=True, gather=False, grad=True)
        loss = pv.sharded_loss(recon.square().sum(), numel=out.numel(), group=pv.spatial_group(vae))
        loss.backward()
        return recon

    recon = _traffic(f"{layout} sharded step", 1, step)
    assert recon.shape[-2] == rows * f
    assert any(p.grad is not None for p in vae.decoder.parameters())


def _paths(layout: str, vae, rank: int, world: int, latent_h: int, validate: bool) -> None:
    if not adapter_for(vae).has_encoder:
        return _decoder_only_paths(layout, vae, world)
    if True:
        adapter = adapter_for(vae)
        f, c = adapter.spatial_factor(vae), adapter.pixel_channels(vae)
        frames = _first_valid_frames(vae, adapter, several=layout in _DEEP)
        shape = (1, c, frames, latent_h * f, 2 * f) if adapter.video else (1, c, latent_h * f, 2 * f)
        x = torch.empty(shape, device=META)

        # replicated: the whole input on every rank, the whole output back (one agreement each)
        z = _traffic(f"{layout} replicated encode", 1, lambda: encode_video(vae, x).mode())
        out = _traffic(f"{layout} replicated decode", 1, lambda: decode_video(vae, z))
        assert out.shape[-2] == shape[-2] and out.device == META

        # sharded training step: encode + decode of my rows, the sharded loss, backward
        start, rows = pv.local_rows(vae, latent_h)
        x_local = x.narrow(-2, start * f, rows * f)
        numel = x.numel()

        def step():
            posterior = encode_video(vae, x_local, sharded=True, gather=False, grad=True)
            recon = decode_video(vae, posterior.mode(), sharded=True, gather=False, grad=True)
            loss, parts = vae_loss(
                recon, x_local, posterior.parameters, numel=numel, group=pv.spatial_group(vae),
                deterministic=adapter.deterministic,
            )
            loss.backward()
            # the recipe's logging of the loss terms: summed over ranks on the device, one host read (not here:
            # a meta tensor has no values, so the reduction is checked up to the read)
            sums = reduce_on_device([parts["l1_sum"], parts["mse_sum"], parts["kl_sum"]], META)
            assert sums.device == META and sums.shape == (3,)
            return recon

        for p in vae.parameters():
            p.grad = None
        recon = _traffic(f"{layout} sharded step", 2, step)
        assert recon.shape[-2] == rows * f
        assert any(p.grad is not None for p in vae.decoder.parameters())  # the backward reached the weights

        if layout in _DEEP:  # the two checkpoint mechanisms: Wan-style cache-aware, and diffusers' own
            enable_gradient_checkpointing(vae)
            vae.train()
            try:
                _traffic(f"{layout} sharded step, checkpointed", 2, step)
            finally:
                vae.eval()
                disable_gradient_checkpointing(vae)
        # gather_shards with the agreed sizes needs no communication for them; without, it gathers them (not here:
        # that is the public default's one small all-gather and host read, not a per-layer one)
        full = _traffic(
            f"{layout} gather_shards", 0, lambda: pv.gather_shards(vae, recon.detach(), sizes=api.agreed_sizes(vae, recon))
        )
        assert full.shape[-2] == shape[-2]

        if validate:  # the recipe's validation: its totals must reach the collective on the device
            from parallel_vae.jobs import finetune_job
            from parallel_vae.jobs.training import HybridLayout

            layout_ = HybridLayout(world, world, 1, rank, rank, 0, pv.spatial_group(vae))
            args = types.SimpleNamespace(output_dir="/nonexistent")
            seen = []

            def on_device(values, device, group=None):  # the sum, up to its final host read (meta has no values)
                total = reduce_on_device(values, device, group)
                seen.append(total.device)
                return [0.0, 0.0, 1.0]

            clip = x[0] if adapter.video else x[0].unsqueeze(1)  # the data's (C, T, H, W), T = 1 for images
            saved, finetune_job.sum_over_ranks = finetune_job.sum_over_ranks, on_device
            try:
                finetune_job._validate(_stub_runtime(world), layout_, vae, [clip], 1, args, torch.float32, [1.0])
            finally:
                finetune_job.sum_over_ranks = saved
            assert seen == [META]  # the totals met the collective on the model's device


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", sorted(SEEDED_LAYOUTS))
def test_meta_conformance(layout):
    torch.set_num_threads(1)
    vae = _meta_model(layout)
    # 3 latent rows on 2 ranks: rank 0 holds 2 (top edge), rank 1 holds 1 (bottom edge); each plays its part.
    for rank in range(2):
        _run_rank(layout, vae, rank, 2, validate=(rank == 1 and layout in _DEEP))


def test_meta_group_refuses_cpu_tensors_and_host_reads():
    """The premise: this group fails exactly where NCCL would, and meta tensors cannot be read."""
    dist.init_process_group("meta:fake", rank=0, world_size=2, store=FakeStore())
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.zeros(3))
        dist.all_reduce(torch.zeros(3, device=META))
        with pytest.raises(RuntimeError):
            torch.zeros((), device=META).item()
        # and the reductions helper the recipes use goes through the device
        with pytest.raises(NotImplementedError):
            sum_over_ranks([1.0, 2.0], META)  # the final host read of a meta tensor: no values
    finally:
        dist.destroy_process_group()


def test_input_on_another_device_is_an_agreed_error():
    """A CPU input to a meta model: the agreement (run on the model's device) reports it, on every rank alike."""
    vae = _meta_model("sd")
    messages = []
    for rank in range(2):
        dist.init_process_group("meta:fake", rank=rank, world_size=2, store=FakeStore())
        try:
            pv.enable_spatial_parallelism(vae)
            with pytest.raises(pv.ShardingError, match="another device than the model") as e:
                vae.decode(torch.zeros(1, 4, 4, 2))
            messages.append(str(e.value))
        finally:
            pv.disable_spatial_parallelism(vae)
            dist.destroy_process_group()
    assert "input on cpu, model on meta" in messages[0]

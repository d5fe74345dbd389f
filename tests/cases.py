"""Shared parity cases: the same seeded model, inputs and loss run unmodified (reference) and parallel (workers).

A case is a small dict; every case of one world size runs in a single spawn of that many ranks (importing
diffusers costs ~5 s per process), and each test asserts on its own case's results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

import parallel_vae as pv
from parallel_vae.jobs.models import build_wan_vae
from tests.float64_internals import float64_internals_if

WIDTH = {"wan2.1": dict(base_dim=8, z_dim=4), "wan2.2": dict(base_dim=8, z_dim=4)}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
BARS = {"float64": 1e-10, "float32": 1e-5}
# float32 parameter gradients: the unmodified model disagrees with itself by 1.5e-5 (1 vs 2 threads) and 2.5e-5
# (its own use_slicing, batch 2) while it is 1.0e-5 to 1.2e-5 from the float64 truth, on this suite's cases. So 1e-5
# against the float32 reference is below float32's own reproducibility here. Parameter gradients in float32 are held
# instead to the float64 truth: no farther from it than PARAM_GRAD_SLACK x the unmodified float32 model's own
# distance (never required tighter than 1e-5). 2 = the measured spread between two float32 runs of the unmodified
# model (2.5e-5 / 1.04e-5 = 2.4). Outputs and input gradients keep the 1e-5 bar. float64 proves exactness (1e-10).
# "The unmodified model's own distance" is one draw of float32 rounding, and a machine's kernels decide it: on an
# AVX2-only EPYC the oneDNN run of cogvideox-float32-sharded-w3 is 6.0e-6 from the truth, the same model with
# oneDNN off 9.4e-6, and the two runs 1.27e-5 apart (the parallel model: 1.33e-5 from the truth, its 3 ranks'
# parameter gradients all-reduced in float32 or float64 alike). So where the parallel model is past the limit,
# tests/family_cases.check takes the larger distance of two valid unmodified runs (oneDNN on and off).
PARAM_GRAD_SLACK = 2.0


@dataclass(frozen=True)
class Case:
    layout: str = "wan2.1"
    dtype: str = "float64"
    mode: str = "replicated"  # or "sharded"
    batch: int = 1
    frames: int = 5  # pixel frames: chunks 1 + 4 -> 2 latent frames
    latent_h: int = 3
    latent_w: int = 3
    world: int = 2
    groups: Optional[tuple] = None  # e.g. ((2, 3),) or ((0, 1), (2, 3)); None = the whole world
    grads: bool = True
    checkpointing: bool = False
    offload: bool = False  # with checkpointing: the checkpoints' saved tensors in host memory

    @property
    def id(self) -> str:
        g = "" if self.groups is None else "-groups" + "|".join(",".join(map(str, rs)) for rs in self.groups)
        g += "-ckpt" if self.checkpointing else ""
        g += "-offload" if self.offload else ""
        return (
            f"{self.layout}-{self.dtype}-{self.mode}-w{self.world}-b{self.batch}-t{self.frames}"
            f"-h{self.latent_h}x{self.latent_w}{g}"
        )


def make_model(layout: str, dtype: torch.dtype):
    """The seeded model of ``layout``; float64 models compute their float32-inside upsamples in float64
    (tests/float64_internals.py)."""
    vae = build_wan_vae(layout, seed=1234, dtype=dtype, perturb=0.05, **WIDTH[layout])
    return float64_internals_if(vae, dtype)


def pixel_shape(case: Case):
    factor = 16 if case.layout == "wan2.2" else 8
    return (case.batch, 3, case.frames, case.latent_h * factor, case.latent_w * factor)


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 7):
    """A pixel video (B, 3, frames, H, W) in [-1, 1] and per-pixel loss weights for its reconstruction."""
    g = torch.Generator().manual_seed(seed)
    shape = pixel_shape(case)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(dtype), w.to(dtype)


def reference(case: Case, dtype_name: Optional[str] = None):
    """Unmodified diffusers: latents, reconstruction, input gradient, parameter gradients of sum(w * recon).

    One thread, so the reference is the same on every run of the suite on a machine."""
    torch.set_num_threads(1)
    dtype = DTYPES[dtype_name or case.dtype]
    vae = make_model(case.layout, dtype)
    x, w = make_inputs(case, dtype)
    x.requires_grad_(case.grads)
    with torch.set_grad_enabled(case.grads):
        z = vae.encode(x).latent_dist.mode()
        out = vae.decode(z).sample
    res = dict(z=z.detach(), out=out.detach())
    if case.grads:
        (out * w).sum().backward()
        res["x_grad"] = x.grad.detach()
        res["grads"] = {n: p.grad.detach().clone() for n, p in vae.named_parameters()}
    return res


def _groups(rank: int, case: Case):
    """Create every group of the case on every rank (new_group is collective); return this rank's group."""
    if case.groups is None:
        return dist.group.WORLD
    made = [dist.new_group(list(rs)) for rs in case.groups]
    for rs, g in zip(case.groups, made):
        if rank in rs:
            return g
    return None


def run_case(rank: int, case: Case):
    """One case on this rank. Returns, on each group's rank 0, the gathered results with parameter gradients
    summed over the spatial group; on every member, the output rows the decoder's last conv computed."""
    group = _groups(rank, case)
    if group is None:
        return None
    dtype = DTYPES[case.dtype]
    vae = make_model(case.layout, dtype)
    pv.enable_spatial_parallelism(vae, group)
    if case.checkpointing:
        pv.enable_gradient_checkpointing(vae, offload=case.offload)
    x, w = make_inputs(case, dtype)
    x.requires_grad_(case.grads)
    seen_rows = []
    hook = vae.decoder.conv_out.register_forward_hook(lambda m, args, out: seen_rows.append(out.shape[3]))
    with torch.set_grad_enabled(case.grads):
        if case.mode == "replicated":
            z = vae.encode(x).latent_dist.mode()
            out = vae.decode(z).sample
            loss = (out * w).sum()
        else:
            x_local = pv.shard_video(vae, x)
            z_local = pv.sharded_encode(vae, x_local).mode()
            out_local = pv.sharded_decode(vae, z_local)
            loss = (out_local * pv.shard_video(vae, w)).sum()
            z, out = pv.gather_shards(vae, z_local.detach()), pv.gather_shards(vae, out_local.detach())
    hook.remove()
    res = dict(z=z.detach(), out=out.detach(), conv_out_rows=sorted(set(seen_rows)))
    if case.grads:
        loss.backward()
        res["x_grad"] = x.grad.detach()
        grads = {}
        for n, p in vae.named_parameters():
            g = p.grad.detach().clone()
            dist.all_reduce(g, group=group)
            grads[n] = g
        res["grads"] = grads
    grank = dist.get_rank(group)
    res["group_rank"] = grank
    if grank != 0:
        for k in ("z", "out", "x_grad", "grads"):
            res.pop(k, None)  # only one copy travels back to the test
    return res


def run_cases(rank: int, world: int, cases: list):
    torch.set_num_threads(1)
    return {case.id: run_case(rank, case) for case in cases}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (docs/how-it-works.md, "Exactness bars")."""
    a, b = a.double(), b.double()
    denom = b.abs().max().item()
    return (a - b).abs().max().item() / (denom if denom > 0 else 1.0)


def worst_grad_err(grads: dict, ref: dict) -> tuple[float, str]:
    errs = {n: rel_err(grads[n], ref[n]) for n in ref}
    name = max(errs, key=errs.get)
    return errs[name], name

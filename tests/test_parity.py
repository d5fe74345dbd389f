"""Parallel vs unmodified diffusers: outputs, input gradients and parameter gradients within the bars of
docs/how-it-works.md.

World sizes 1-4, Wan2.1 and Wan2.2 layouts, even and uneven heights, batch 2, replicated and sharded modes,
float64 and float32, subgroups (ranks [2, 3] of 4) and two groups of 2 running at once.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import parallel_vae as pv
from tests.cases import (
    BARS,
    PARAM_GRAD_SLACK,
    Case,
    make_inputs,
    make_model,
    reference,
    rel_err,
    run_cases,
    worst_grad_err,
)
from tests.dist_harness import run_ranks, values
from tests.family_cases import FCase
from tests.family_cases import make_model as make_family_model
from tests.float64_internals import FLOAT32_UPSAMPLES, float64_internals

CASES = [
    # world 2: even (4 -> 2/2) and uneven (3 -> 2/1) heights, both layouts, both modes, batch 2, float32
    Case("wan2.1", "float64", "replicated", latent_h=4, world=2),
    Case("wan2.1", "float64", "sharded", latent_h=3, world=2),
    Case("wan2.2", "float64", "replicated", latent_h=3, world=2),
    Case("wan2.2", "float64", "sharded", latent_h=2, world=2, batch=2),
    Case("wan2.1", "float32", "replicated", latent_h=3, world=2, batch=2),
    Case("wan2.2", "float32", "sharded", latent_h=3, world=2),
    Case("wan2.1", "float64", "replicated", latent_h=2, latent_w=5, frames=9, world=2),  # 3 latent frames
    # activation checkpointing: recomputation repeats the halo exchanges during backward
    Case("wan2.1", "float64", "sharded", latent_h=3, frames=9, world=2, checkpointing=True),
    Case("wan2.2", "float64", "replicated", latent_h=3, world=3, checkpointing=True),
    Case("wan2.1", "float64", "sharded", latent_h=7, latent_w=2, world=3, checkpointing=True, offload=True),
    # world 3: 7 latent rows -> 3/2/2
    Case("wan2.1", "float64", "replicated", latent_h=7, latent_w=2, world=3),
    Case("wan2.2", "float64", "sharded", latent_h=7, latent_w=2, world=3),
    Case("wan2.1", "float32", "sharded", latent_h=3, world=3, batch=2),
    # encode and decode in one graph, replicated, 7 x 5 latent rows (112 x 80 pixels) split 3/2/2: where a run
    # once read 2e-9 against diffusers' float32-inside upsample (tests/float64_internals.py explains it)
    Case("wan2.2", "float64", "replicated", latent_h=7, latent_w=5, world=3),
    # world 4: whole world, a subgroup of the last two ranks, two groups of two at once
    Case("wan2.1", "float64", "sharded", latent_h=5, latent_w=2, world=4),
    Case("wan2.2", "float64", "replicated", latent_h=4, latent_w=2, world=4),
    Case("wan2.1", "float64", "replicated", latent_h=3, world=4, groups=((2, 3),)),
    Case("wan2.2", "float64", "sharded", latent_h=3, world=4, groups=((0, 1), (2, 3))),
]


@functools.lru_cache(maxsize=None)
def _world_results(world: int) -> dict:
    """Run every case of ``world`` in one spawn; {case id: [per-rank results]}."""
    cases = [c for c in CASES if c.world == world]
    per_rank = values(run_ranks(run_cases, world, cases, timeout=600))
    return {c.id: [r[c.id] for r in per_rank] for c in cases}


@functools.lru_cache(maxsize=None)
def _reference(case: Case, dtype_name: str) -> dict:
    return reference(case, dtype_name)


def _check(case: Case, res: dict):
    """the bars of docs/how-it-works.md against the unmodified model; float32 parameter gradients against the float64
    truth."""
    ref = _reference(case, case.dtype)
    bar = BARS[case.dtype]
    errs = {"z": rel_err(res["z"], ref["z"]), "out": rel_err(res["out"], ref["out"])}
    if case.grads:
        errs["x_grad"] = rel_err(res["x_grad"], ref["x_grad"])
    for k, e in errs.items():
        assert e <= bar, f"{case.id}: {k} rel err {e:.3e} > {bar:.0e}"
    if case.grads and case.dtype == "float64":
        errs["param_grad"], worst = worst_grad_err(res["grads"], ref["grads"])
        assert errs["param_grad"] <= bar, f"{case.id}: parameter {worst} rel err {errs['param_grad']:.3e} > {bar:.0e}"
    elif case.grads:
        truth = _reference(case, "float64")["grads"]
        own, own_worst = worst_grad_err(ref["grads"], truth)
        errs["param_grad_vs_truth"], worst = worst_grad_err(res["grads"], truth)
        errs["unmodified_param_grad_vs_truth"] = own
        limit = max(bar, PARAM_GRAD_SLACK * own)
        assert errs["param_grad_vs_truth"] <= limit, (
            f"{case.id}: parameter {worst} is {errs['param_grad_vs_truth']:.3e} from the float64 truth; the "
            f"unmodified {case.dtype} model is {own:.3e} from it ({own_worst}); limit {limit:.3e}"
        )
    return errs


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_parity(case: Case, record_property):
    results = _world_results(case.world)[case.id]
    roots = [r for r in results if r is not None and r["group_rank"] == 0]
    expected_groups = 1 if case.groups is None else len(case.groups)
    assert len(roots) == expected_groups
    for res in roots:  # every group (two groups at once: both) must match the reference
        errs = _check(case, res)
        record_property("max_rel_err", errs)
        print(case.id, {k: f"{v:.2e}" for k, v in errs.items()})


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", [c for c in CASES if c.groups is None], ids=lambda c: c.id)
def test_each_rank_computes_only_its_rows(case: Case):
    """The decoder's last conv computes exactly this rank's pixel rows (its input carries one halo row each side),
    never the whole frame."""
    results = _world_results(case.world)[case.id]
    factor = 16 if case.layout == "wan2.2" else 8
    patch = 2 if case.layout == "wan2.2" else 1
    sizes = pv.row_split(case.latent_h, case.world)
    for rank, res in enumerate(results):
        own = sizes[rank] * factor // patch  # the decoder works before unpatchify
        assert res["conv_out_rows"] == [own], (rank, res["conv_out_rows"], own)
        assert own < case.latent_h * factor // patch


def test_world_one_is_the_unmodified_model():
    """A group of one (torch.distributed not even initialized) is a no-op: bitwise the diffusers result."""
    case = Case("wan2.2", "float64", "replicated", latent_h=2, world=1)
    ref = reference(case)
    vae = make_model(case.layout, torch.float64)
    assert pv.enable_spatial_parallelism(vae) is vae
    assert pv.spatial_size(vae) == 1
    assert type(vae.decoder.conv_out).__name__ == "WanCausalConv3d"  # nothing swapped
    x, w = make_inputs(case, torch.float64)
    x.requires_grad_(True)
    z = pv.sharded_encode(vae, x).mode()
    out = pv.sharded_decode(vae, z)
    (out * w).sum().backward()
    assert torch.equal(z, ref["z"]) and torch.equal(out, ref["out"]) and torch.equal(x.grad, ref["x_grad"])
    for n, p in vae.named_parameters():
        assert torch.equal(p.grad, ref["grads"][n]), n


def test_float64_upsample_is_float32_inside():
    """Why the float64 models compute Wan's and Qwen-Image's upsample in float64 (tests/float64_internals.py).

    diffusers' own upsample, in a float64 model, rounds its activations to float32, and two float64 gradients 2 ulps
    apart across a float32 rounding midpoint come out of its backward one float32 ulp apart (2**-23 at 1): a
    difference of rounding made 10**8 times larger. Computed in float64 they stay 2 float64 ulps apart. If diffusers
    computes these in the model's dtype one day, the first assertions fail and the helper can go."""
    mid = torch.tensor(1 + 2.0**-24, dtype=torch.float64)  # halfway between the float32 values 1 and 1 + 2**-23
    pair = [torch.nextafter(mid, torch.tensor(t, dtype=torch.float64)).item() for t in (0.0, 2.0)]
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    exact = F.interpolate(x, scale_factor=2, mode="nearest-exact")

    def measure(up):
        grads = []
        for v in pair:
            g = torch.zeros_like(exact)
            g[0, 0, 0, 0] = v
            grads.append(torch.autograd.grad(up(x), x, g)[0])
        return (grads[1] - grads[0]).abs().max().item(), (up(x) - exact).abs().max().item()

    for cls in FLOAT32_UPSAMPLES:
        up = cls(scale_factor=(2.0, 2.0), mode="nearest-exact")
        jump, forward_err = measure(up)
        assert jump == 2.0**-23 and forward_err > 1e-9, (cls.__name__, jump, forward_err)
        jump, forward_err = measure(float64_internals(up))
        assert jump == pair[1] - pair[0] == 2.0**-51 and forward_err == 0, (cls.__name__, jump, forward_err)
    # the parity models carry it in float64, and only there
    models = [make_model("wan2.1", torch.float64), make_model("wan2.2", torch.float64)]
    models.append(make_family_model(FCase("qwenimage"), torch.float64))
    for vae in models:
        ups = [m for m in vae.modules() if type(m) in FLOAT32_UPSAMPLES]
        assert ups and all("forward" in m.__dict__ for m in ups)
    assert not any("forward" in m.__dict__ for m in make_model("wan2.2", torch.float32).modules())

"""Mochi (``AutoencoderKLMochi``) against the unmodified diffusers model.

* Parity (tests/family_cases.py's cases and checks): latents, reconstruction, input gradients and summed parameter
  gradients within the bars of docs/how-it-works.md at worlds 2 and 3 with uneven splits (3 latent rows on 2 ranks, 4
  and 5 on 3), replicated and sharded, activation checkpointing (diffusers' own), float32, every parameter perturbed
  (GroupNorm affines not 1 / 0). The model is the real Mochi-1 layout (attention in the encoder's three down blocks and
  ``block_out``, 3/3/4/6/3 resnets, 6x temporal and 8x spatial compression, 12 latent channels) at the smallest width
  diffusers allows (32: its GroupNorms have 32 groups). 7 frames (1 + 6) give every attention block more than one frame
  and every down block's conv a real temporal stride.
* The per-frame GroupNorm alone with 2 clips of 5 frames (diffusers normalizes them in chunks of 2 frames) on
  uneven rows, exact in forward and backward; whole-clip statistics would fail it.
* The classification refuses what it does not know; framewise encoding/decoding and bad input give one clear error,
  the same on every rank.

The unmodified references run inside the pool, on each case's group rank 0 after all of the task's collectives, and
only the error numbers travel back: a float64 Mochi at width 32 has 47 M parameters, and holding every case's
gradients in the test process took 4.7 GB.

Mochi's ``FourierFeatures`` compute in float32 even for a float64 model (diffusers casts its input), so both models'
input gradients pass through float32 rounding there; they round alike, and the measured input-gradient difference is
exactly 0. Latents, outputs and parameter gradients are float64 throughout; the worst parameter gradient (~3e-13, an
attention ``to_k.weight``, whose gradient is small beside its module's) is the unmodified model's own rounding: it
differs from itself by 3.9e-13 there between 1 and 2 threads.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
import torch.distributed as dist
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.autoencoders import autoencoder_kl_mochi as mochi

import parallel_vae as pv
from parallel_vae.core.plan import SpatialState, apply_plan
from parallel_vae.families import adapter_for
from parallel_vae.families.mochi import mochi_treatment
from tests.cases import rel_err
from tests.dist_harness import run_ranks, values
from tests.family_cases import FCase, call_outcomes, check, make_model, reference, run_case
from tests.test_families import _bad_input_worker

L = "mochi"
WIDTH, LATENT = 32, 12


def _case(dtype: str, mode: str, world: int, latent_h: int, **kw) -> FCase:
    return FCase(L, dtype, mode, world=world, latent_h=latent_h, latent_w=1, frames=7, width=WIDTH, latent=LATENT, **kw)


CASES = [
    _case("float64", "replicated", 2, 3),  # 2/1
    _case("float32", "sharded", 2, 3),  # its float64 truth is the first case's reference
    _case("float64", "sharded", 3, 4, checkpointing=True),  # 2/1/1
    _case("float64", "replicated", 3, 5),  # 2/2/1
]


def _parity_worker(rank: int, world: int, cases: list) -> dict:
    """Every case of this world on the parallel model; then, on group rank 0, the unmodified model and the errors
    (a dict of them, or the failed bar's message). References depend on the model and the input only, so one serves
    every case (and dtype) that shares them; checkpointing is compared against the model without it."""
    torch.set_num_threads(1)
    results = {case.id: run_case(rank, case) for case in cases}
    refs: dict = {}

    def ref(case: FCase, dtype: str) -> dict:
        key = dataclasses.replace(case, dtype=dtype, mode="replicated", world=1, groups=None, checkpointing=False)
        if key not in refs:
            refs[key] = reference(key)
        return refs[key]

    out = {}
    for case in cases:
        res = results.pop(case.id)
        entry = {"rows": res["conv_out_rows"]}
        if res["group_rank"] == 0:
            truth = ref(case, "float64") if case.dtype != "float64" else None
            try:
                entry["errs"] = check(case, res, ref(case, case.dtype), truth)
            except AssertionError as e:
                entry["errs"] = str(e)
        out[case.id] = entry
    return out


@functools.lru_cache(maxsize=None)
def _world_results(world: int) -> dict:
    cases = [c for c in CASES if c.world == world]
    per_rank = values(run_ranks(_parity_worker, world, cases, timeout=600))
    return {c.id: [r[c.id] for r in per_rank] for c in cases}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_mochi_parity(case: FCase, record_property):
    results = _world_results(case.world)[case.id]
    errs = results[0]["errs"]
    assert isinstance(errs, dict), errs
    record_property("max_rel_err", errs)
    print(case.id, {k: f"{v:.2e}" for k, v in errs.items()})
    # every rank's decoder computed its own rows only (8 pixel rows per latent row), never the whole height
    rows = [r["rows"] for r in results]
    assert rows == [[8 * s] for s in pv.row_split(case.latent_h, case.world)], rows


def _frame_norm_inputs() -> tuple:
    """``MochiChunkedGroupNorm3D`` (affine not 1 / 0, diffusers' chunks of 2 frames), 2 clips of 5 frames of 7 rows,
    loss weights; float64, seeded."""
    g = torch.Generator().manual_seed(0)
    norm = mochi.MochiChunkedGroupNorm3D(64, chunk_size=2).double()
    with torch.no_grad():
        norm.norm_layer.weight.add_(torch.rand(64, generator=g, dtype=torch.float64))
        norm.norm_layer.bias.add_(torch.rand(64, generator=g, dtype=torch.float64))
    x = torch.randn(2, 64, 5, 7, 3, generator=g, dtype=torch.float64) * 3 + 1
    return norm, x, torch.randn(x.shape, generator=g, dtype=torch.float64)


def _frame_norm_worker(rank: int, world: int) -> dict:
    """The per-frame norm on 7 rows split 4/3: this rank's output rows, input gradient and the group-summed affine
    gradients."""
    torch.set_num_threads(1)
    norm, x, w = _frame_norm_inputs()
    sharded = copy.deepcopy(norm)
    # the Mochi table's treatments of a per-frame norm and its GroupNorm, as inside a model
    parents = {id(sharded.norm_layer): sharded}
    plan = [mochi_treatment("", sharded, {}), mochi_treatment("norm_layer", sharded.norm_layer, parents)]
    apply_plan(sharded, plan, SpatialState(dist.group.WORLD, world, 1))
    sizes = pv.row_split(x.shape[3], world)
    start, rows = sum(sizes[:rank]), sizes[rank]
    x_local = x[..., start : start + rows, :].clone().requires_grad_(True)
    y = sharded(x_local)
    (y * w[..., start : start + rows, :]).sum().backward()
    grads = [p.grad.clone() for p in sharded.parameters()]
    for g in grads:
        dist.all_reduce(g)
    return {"y": y.detach(), "x_grad": x_local.grad, "grads": grads, "rows": (start, rows)}


def test_frame_group_norm_alone():
    """Statistics per (clip, frame, group) over all ranks' rows, exact in forward and backward at 1e-10; and the
    test can fail: statistics over the whole clip (GroupNorm of (C, T, H, W)) are far from diffusers' result."""
    per_rank = values(run_ranks(_frame_norm_worker, 2, timeout=120))
    norm, x, w = _frame_norm_inputs()
    x.requires_grad_(True)
    ref = norm(x)
    (ref * w).sum().backward()
    whole_clip = torch.nn.functional.group_norm(x, 32, norm.norm_layer.weight, norm.norm_layer.bias, 1e-5)
    assert rel_err(whole_clip.detach(), ref.detach()) > 1e-3
    for res in per_rank:
        start, rows = res["rows"]
        errs = {
            "y": rel_err(res["y"], ref.detach()[..., start : start + rows, :]),
            "x_grad": rel_err(res["x_grad"], x.grad[..., start : start + rows, :]),
        }
        for name, g in zip(("weight", "bias"), res["grads"]):
            errs[name] = rel_err(g, getattr(norm.norm_layer, name).grad)
        print(start, rows, {k: f"{v:.1e}" for k, v in errs.items()})
        for k, e in errs.items():
            assert e <= 1e-10, (k, e)


def _model() -> torch.nn.Module:
    return make_model(_case("float32", "replicated", 1, 1), torch.float32)


def test_unknown_modules_are_refused():
    """A layer the table does not know, a different attention processor, a GroupNorm outside a per-frame norm and a
    constant-padded causal conv each raise (``plan`` runs before anything is changed)."""

    def first_attention(vae):
        return vae.encoder.down_blocks[0].attentions[0]

    edits = {
        "processor": lambda vae: first_attention(vae).set_processor(AttnProcessor2_0()),
        "group norm": lambda vae: setattr(vae.encoder, "extra", torch.nn.GroupNorm(32, 32)),
        "pad mode": lambda vae: setattr(vae.decoder.block_in.resnets[0].conv1, "pad_mode", "constant"),
        "unknown layer": lambda vae: setattr(vae.decoder, "extra", torch.nn.Conv2d(4, 4, 3)),
    }
    base = _model()
    assert adapter_for(base).plan(base)  # the unedited model is accepted
    for what, edit in edits.items():
        vae = copy.deepcopy(base)
        edit(vae)
        with pytest.raises(NotImplementedError, match="does not know how to shard"):
            adapter_for(vae).plan(vae)


def test_constant_padding_is_refused_at_run_time():
    """``_enable_framewise_decoding`` switches the causal convs to constant padding after the plan was made: the
    sharded conv refuses it rather than computing something else."""
    vae = _model()
    apply_plan(vae, adapter_for(vae).plan(vae), SpatialState(None, 1, 8, adapter_for(vae)))
    conv = vae.decoder.block_in.resnets[0].conv1
    x = torch.zeros(1, conv.conv.in_channels, 2, 4, 4)
    assert conv(x)[0].shape == (1, conv.conv.out_channels, 2, 4, 4)
    conv.pad_mode = "constant"
    with pytest.raises(NotImplementedError, match="pad_mode='replicate' only"):
        conv(x)


def _mochi_bad_input_worker(rank: int, world: int) -> dict:
    out = _bad_input_worker(rank, world, L, WIDTH, LATENT)
    vae = make_model(_case("float32", "replicated", world, world), torch.float32)
    pv.enable_spatial_parallelism(vae)

    def framewise_decoding():
        vae._enable_framewise_decoding()
        vae.decode(torch.zeros(1, LATENT, 1, world, 1))

    def framewise_encoding():
        vae._enable_framewise_encoding()
        vae.encode(torch.zeros(1, 3, 1, 8 * world, 8))

    out.update(call_outcomes({"framewise_decoding": framewise_decoding, "framewise_encoding": framewise_encoding}))
    return out


@pytest.mark.timeout(300)
def test_bad_input_one_clear_error_on_every_rank():
    per_rank = values(run_ranks(_mochi_bad_input_worker, 2, timeout=240))
    expected = {"tiling_enabled": "RuntimeError", "framewise_decoding": "NotImplementedError"}
    expected["framewise_encoding"] = "NotImplementedError"
    for name in per_rank[0]:
        errors = [r[name] for r in per_rank]
        assert errors[0] is not None, f"{name}: no error"
        assert all(e == errors[0] for e in errors), f"{name}: ranks disagree: {errors}"
        assert errors[0][0] == expected.get(name, "ShardingError"), errors[0]
    assert "exclusive" in per_rank[0]["tiling_enabled"][1]
    assert "framewise" in per_rank[0]["framewise_decoding"][1]

"""CogVideoX (``AutoencoderKLCogVideoX``) against the unmodified diffusers model.

* Parity (tests/family_cases.py machinery, seeded CogVideoX-2b layout at width 8 with 16 latent channels, every
  parameter perturbed so no norm affine is trivial): latents, outputs, input gradients and summed parameter
  gradients within the bars of docs/how-it-works.md at worlds 2 and 3, uneven splits (3 latent rows on 2 ranks, 7 on 3
  and 4 on 3), replicated and sharded, batch 2, diffusers' own activation checkpointing, float32. 17 frames run the
  class's own frame batching in both directions (encoder batches of 9 + 8 frames, decoder batches of 3 + 2 latent
  frames), so the conv caches carry rows across batches.
* Each rank's decoder computes its own rows only, and every spatial norm is conditioned on this rank's own latent
  rows (never a gathered ``zq``).
* ``HaloOwnForwardConv`` around a conv whose own forward splits along time, with a different number of chunks on
  each rank (``CogVideoXSafeConv3d`` does that above 2 GiB per input, out of reach of a test): exact in the
  forward, the input gradient and the weight gradient.
* Bad input: one ``ShardingError`` (or, with tiling on, one ``RuntimeError``), the same on every rank.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from diffusers.models.autoencoders import autoencoder_kl_cogvideox as cog

import parallel_vae as pv
from parallel_vae.core.plan import SpatialState, Treatment, apply_plan, sharded_class
from parallel_vae.layers.cogvideox_conv import HaloOwnForwardConv
from tests.cases import rel_err
from tests.dist_harness import run_ranks, values
from tests.family_cases import FCase, check, make_model, reference, run_cases
from tests.test_families import _bad_input_worker

L = "cogvideox"
Z = 16  # the real latent width: it sizes every spatial norm's conv_y / conv_b

CASES = [
    # the class's frame batching in both directions: 17 frames -> encoder batches 9 + 8, decoder 3 + 2 latent frames
    FCase(L, "float64", "replicated", world=2, latent_h=3, frames=17, latent=Z),
    FCase(L, "float64", "sharded", world=2, latent_h=3, frames=9, batch=2, checkpointing=True, latent=Z),
    FCase(L, "float64", "sharded", world=3, latent_h=7, latent_w=1, frames=9, latent=Z),  # 3/2/2
    FCase(L, "float64", "replicated", world=3, latent_h=4, latent_w=1, frames=1, latent=Z),  # 2/1/1, one frame
    FCase(L, "float32", "sharded", world=3, latent_h=5, latent_w=1, frames=9, latent=Z),  # 2/2/1
]


def _own_rows(rank: int, world: int) -> dict:
    """A sharded decode of 3 latent frames (one odd frame batch: the first frame resized apart) of ``world + 2``
    latent rows: per spatial norm, (rows of zq, rows of its features) on this rank; and this rank's latent rows."""
    case = FCase(L, "float64", "sharded", world=world, latent_h=world + 2, latent_w=1, latent=Z)
    vae = make_model(case, torch.float64)
    pv.enable_spatial_parallelism(vae)
    seen = []
    for m in vae.modules():
        if isinstance(m, cog.CogVideoXSpatialNorm3D):
            m.register_forward_pre_hook(lambda mod, args, kw: seen.append((args[1].shape[-2], args[0].shape[-2])),
                                        with_kwargs=True)
    start, rows = pv.local_rows(vae, case.latent_h)
    z = torch.randn(1, Z, 3, case.latent_h, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pv.sharded_decode(vae, z.narrow(-2, start, rows))
    return {"rows": rows, "spatial_norms": sorted(set(seen))}


class _TimeChunkedConv3d(nn.Conv3d):
    """A conv whose forward splits its input along time, each chunk with the kernel's k - 1 frames of overlap,
    as ``CogVideoXSafeConv3d`` does above 2 GiB; the chunk count depends on the rows it gets (2 for odd, 3 for
    even), so the ranks of one group chunk differently."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        chunks = x.chunk(2 if x.shape[-2] % 2 else 3, dim=2)
        overlapped = [torch.cat([chunks[i - 1][:, :, -(k - 1) :], chunks[i]], 2) for i in range(1, len(chunks))]
        parts = [chunks[0]] + overlapped
        return torch.cat([super(_TimeChunkedConv3d, self).forward(p) for p in parts], 2)


def _own_forward_conv(rank: int, world: int) -> dict:
    """``HaloOwnForwardConv`` on 7 rows (3/2/2 on 3 ranks) against the plain conv of the whole input: output,
    input gradient and group-summed weight/bias gradients, float64."""
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 3, 8, 7, 5, generator=g, dtype=torch.float64)
    w = torch.randn(1, 4, 6, 7, 5, generator=g, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        conv = _TimeChunkedConv3d(3, 4, 3, padding=(0, 1, 1)).double()
    ref = nn.Conv3d(3, 4, 3, padding=(0, 1, 1)).double()
    ref.load_state_dict(conv.state_dict())
    x_ref = x.clone().requires_grad_(True)
    (ref(x_ref) * w).sum().backward()

    holder = nn.ModuleDict({"conv": conv})
    apply_plan(holder, [Treatment("conv", sharded_class(HaloOwnForwardConv, _TimeChunkedConv3d), "test")],
               SpatialState(group, world, 1))
    x_full = x.clone().requires_grad_(True)
    x_local = pv.scatter_rows(x_full, group, dim=-2, sizes=pv.row_split(7, world))
    out_local = conv(x_local)
    (out_local * pv.scatter_rows(w, group, dim=-2, sizes=pv.row_split(7, world))).sum().backward()
    grads = {}
    for n, p in conv.named_parameters():
        gp = p.grad.detach().clone()
        dist.all_reduce(gp, group=group)
        grads[n] = rel_err(gp, getattr(ref, n).grad)
    out = pv.gather_rows(out_local.detach(), group, dim=-2)
    return {"out": rel_err(out, ref(x).detach()), "x_grad": rel_err(x_full.grad, x_ref.grad), **grads}


_EXTRAS = {
    2: {"bad_input": lambda rank, world: _bad_input_worker(rank, world, L), "own_rows": _own_rows},
    3: {"own_rows": _own_rows, "own_forward_conv": _own_forward_conv},
}


def _world_worker(rank: int, world: int, cases: list) -> dict:
    torch.set_num_threads(1)
    out = {"cases": run_cases(rank, world, cases)}
    for name, fn in _EXTRAS[world].items():
        out[name] = fn(rank, world)
    return out


@functools.lru_cache(maxsize=None)
def _world_results(world: int) -> list:
    return values(run_ranks(_world_worker, world, [c for c in CASES if c.world == world], timeout=600))


@functools.lru_cache(maxsize=None)
def _reference(case: FCase, dtype_name: str) -> dict:
    return reference(dataclasses.replace(case, world=1, mode="replicated", checkpointing=False, dtype=dtype_name))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cogvideox_parity(case: FCase, record_property):
    results = [r["cases"][case.id] for r in _world_results(case.world)]
    root = results[0]
    truth = _reference(case, "float64") if case.dtype != "float64" else None
    errs = check(case, root, _reference(case, case.dtype), truth)
    record_property("max_rel_err", errs)
    print(case.id, {k: f"{v:.2e}" for k, v in errs.items()})
    # every rank's decoder computed its own rows only (conv_out: 8 pixel rows per latent row)
    sizes = pv.row_split(case.latent_h, case.world)
    assert [r["conv_out_rows"] for r in results] == [[8 * s] for s in sizes]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [2, 3])
def test_spatial_norms_see_only_their_own_latent_rows(world):
    per_rank = [r["own_rows"] for r in _world_results(world)]
    assert [r["rows"] for r in per_rank] == pv.row_split(world + 2, world)
    for r in per_rank:
        # zq rows are the rank's latent rows; features are 1, 2, 4 or 8 times them (the decoder's levels)
        assert {zq for zq, _ in r["spatial_norms"]} == {r["rows"]}, r
        assert {f // r["rows"] for _, f in r["spatial_norms"]} == {1, 2, 4, 8}, r


@pytest.mark.timeout(600)
def test_own_forward_conv_exact_with_rank_dependent_chunks():
    per_rank = [r["own_forward_conv"] for r in _world_results(3)]
    for errs in per_rank:
        assert max(errs.values()) <= 1e-12, errs


@pytest.mark.timeout(600)
def test_bad_input_one_clear_error_on_every_rank():
    per_rank = [r["bad_input"] for r in _world_results(2)]
    for name in per_rank[0]:
        errors = [r[name] for r in per_rank]
        assert errors[0] is not None, f"{name}: no error"
        assert all(e == errors[0] for e in errors), f"{name}: ranks disagree: {errors}"
        assert errors[0][0] == ("RuntimeError" if name == "tiling_enabled" else "ShardingError"), errors[0]
    assert "exclusive" in per_rank[0]["tiling_enabled"][1]

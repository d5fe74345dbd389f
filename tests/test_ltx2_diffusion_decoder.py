"""LTX-2.5's diffusion decoder (``LTX2VideoDiffusionDecoderModel``) against the unmodified diffusers model, and its
neighbourhood attention on row shards (issue 20).

diffusers computes neighbourhood attention with FlexAttention by default (NATTEN, its other processor, fetches GPU
kernels from the Hub). On CPU FlexAttention runs eagerly, forward only: it refuses inputs that require grad. So:

* the decode itself is compared with the unmodified model on its default FlexAttention path (no grad);
* gradients are compared with the unmodified model whose attention is diffusers' own window rule (the ``mask_mod``
  of ``_neighborhood_block_mask``) made dense and run through SDPA (:class:`DenseWindowProcessor`), which is
  checked against the FlexAttention path first.

Float64 parity (bar 1e-10; the RoPE's float32 casts read as float64 on both sides, ``tests/float64_internals.py``)
of the decoded video, the latent gradient and the parameter gradients summed over the group, every parameter
perturbed: worlds 2 (batch 2) and 3 (7 latent rows: 3/2/2), both modes, a subgroup (ranks [1, 2] of 3), a window
reach wider than a rank's rows (a 5-row kernel on 2/2/1 latent rows: rows from every rank), a float32 multi-step
decode against the unmodified float32 model. Each rank's stage 5 computes its own rows only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.autoencoders import ltx2_diffusion_decoder as ldd

import parallel_vae as pv
from parallel_vae.families import adapter_for
from parallel_vae.jobs.models import build_seeded_vae
from parallel_vae.layers.neighborhood_attention import neighborhood_sdpa, row_windows, window_rows
from tests.cases import BARS, DTYPES, rel_err
from tests.dist_harness import run_ranks, values
from tests.family_cases import call_outcomes, param_grad_errors, worst
from tests.float64_internals import float64_internals_if

LAYOUT = "ltx2diffusion"
# The released layer kinds at test size: one block per stage, the real strides and channel reductions, small
# kernels (the real ones need 7 latent rows and 3 latent frames), patch 2 (16 pixel rows per latent row).
SMALL = (
    ("decoder_stage_depths", (1, 1, 1, 1, 1)),
    ("decoder_stage_kernels", ((3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))),
    ("decoder_stage5_kernel", (1, 5, 3)),
    ("patch_size", 2),
    ("spatial_compression_ratio", 16),
    ("decoder_t_emb_dim", 16),
)
WIDE = SMALL[:1] + (("decoder_stage_kernels", ((3, 5, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))),) + SMALL[2:]
MULTISTEP = SMALL + (("decoder_num_inference_steps", 2),)


@dataclass(frozen=True)
class DCase:
    dtype: str = "float64"
    mode: str = "replicated"
    world: int = 2
    batch: int = 1
    latent_h: int = 3
    latent_w: int = 3
    groups: Optional[tuple] = None
    overrides: tuple = SMALL

    @property
    def id(self) -> str:
        g = "" if self.groups is None else "-groups" + "|".join(",".join(map(str, rs)) for rs in self.groups)
        kind = {SMALL: "", WIDE: "-wide", MULTISTEP: "-2steps"}[self.overrides]
        return f"{self.dtype}-{self.mode}-w{self.world}-b{self.batch}-h{self.latent_h}x{self.latent_w}{g}{kind}"


CASES = [
    DCase("float64", "replicated", world=2, batch=2, latent_h=3),
    DCase("float64", "sharded", world=2, latent_h=4),
    DCase("float64", "sharded", world=3, latent_h=7),  # 3/2/2
    DCase("float64", "replicated", world=3, latent_h=5, overrides=WIDE),  # 2/2/1, a 5-row window at stage 1
    DCase("float64", "replicated", world=3, latent_h=3, groups=((1, 2),)),  # 2/1 on ranks [1, 2]
    DCase("float32", "sharded", world=3, latent_h=4, overrides=MULTISTEP),
]


class DenseWindowProcessor:
    """diffusers' neighbourhood attention with its own window rule (the ``mask_mod`` of ``_neighborhood_block_mask``)
    as a dense boolean mask through SDPA: the FlexAttention processor's function, with a backward on CPU."""

    def __init__(self):
        self._masks = {}

    def _mask(self, frames, height, width, kernel, device):
        key = (frames, height, width, tuple(kernel))
        if key not in self._masks:
            import torch.nn.attention.flex_attention as fa

            made = {}
            real = fa.create_block_mask

            def dense(mask_mod, B, H, Q_LEN, KV_LEN, device):
                made["mask"] = fa.create_mask(mask_mod, 1, 1, Q_LEN, KV_LEN, device)
                return None

            fa.create_block_mask = dense  # _neighborhood_block_mask imports it at call time
            try:
                ldd._neighborhood_block_mask(frames, height, width, kernel, device)
            finally:
                fa.create_block_mask = real
            self._masks[key] = made["mask"]
        return self._masks[key]

    def __call__(self, attn, hidden_states, block_mask=None):
        batch, frames, height, width, _ = hidden_states.shape
        query, key, value = attn.project_qkv(hidden_states)
        q, k, v = (t.reshape(batch, -1, attn.heads, attn.head_dim).transpose(1, 2) for t in (query, key, value))
        mask = self._mask(frames, height, width, attn.kernel_size, hidden_states.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        out = out.transpose(1, 2).reshape(batch, frames, height, width, attn.heads * attn.head_dim)
        return attn.to_out[0](out)


def make_model(case: DCase, dtype: torch.dtype, dense: bool = False):
    vae = build_seeded_vae(LAYOUT, width=8, latent=4, seed=1234, dtype=dtype, perturb=0.05, overrides=dict(case.overrides))
    if dense:
        proc = DenseWindowProcessor()
        for m in vae.modules():
            if isinstance(m, ldd.LTX2VideoVaeNeighborhoodAttention):
                m.set_processor(proc)
    return float64_internals_if(vae, dtype)


def make_inputs(case: DCase, vae, dtype):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(case.batch, 4, 1, case.latent_h, case.latent_w, generator=g, dtype=torch.float64)
    f = adapter_for(vae).spatial_factor(vae)
    w = torch.randn(case.batch, 3, 1, case.latent_h * f, case.latent_w * f, generator=g, dtype=torch.float64)
    return z.to(dtype), w.to(dtype)


def _gen():
    return torch.Generator().manual_seed(11)


def reference(case: DCase, dtype_name: str, grads: bool = True) -> dict:
    """The unmodified model: with grads on its dense-window attention, without on its own FlexAttention path."""
    torch.set_num_threads(1)
    dtype = DTYPES[dtype_name]
    vae = make_model(case, dtype, dense=grads)
    z, w = make_inputs(case, vae, dtype)
    z.requires_grad_(grads)
    with torch.set_grad_enabled(grads):
        out = vae.decode(z, generator=_gen()).sample
    res = dict(out=out.detach())
    if grads:
        (out * w).sum().backward()
        res["z_grad"] = z.grad.detach()
        res["grads"] = {n: p.grad.detach().clone() for n, p in vae.named_parameters() if p.grad is not None}
    return res


@functools.lru_cache(maxsize=None)
def cached_reference(case: DCase, dtype_name: str, grads: bool = True) -> dict:
    return reference(case, dtype_name, grads)


def _group(rank: int, case: DCase):
    if case.groups is None:
        return dist.group.WORLD
    made = [dist.new_group(list(rs)) for rs in case.groups]
    return next((g for rs, g in zip(case.groups, made) if rank in rs), None)


def run_case(rank: int, case: DCase):
    group = _group(rank, case)
    if group is None:
        return None
    dtype = DTYPES[case.dtype]
    vae = make_model(case, dtype)
    pv.enable_spatial_parallelism(vae, group)
    z, w = make_inputs(case, vae, dtype)
    z.requires_grad_(True)
    rows = []
    hook = vae.decoder.conv_out.register_forward_hook(lambda m, a, out: rows.append(out.shape[2]))
    if case.mode == "replicated":
        out = vae.decode(z, generator=_gen()).sample
        loss = (out * w).sum()
    else:
        out_local = pv.sharded_decode(vae, pv.shard_latents(vae, z), generator=_gen())
        loss = (out_local * pv.shard_video(vae, w)).sum()
        out = pv.gather_shards(vae, out_local.detach())
    hook.remove()
    loss.backward()
    grads = {}
    for n, p in vae.named_parameters():
        if p.grad is not None:
            g = p.grad.detach().clone()
            dist.all_reduce(g, group=group)
            grads[n] = g
    res = dict(out=out.detach(), z_grad=z.grad.detach(), grads=grads, rows=rows, group_rank=dist.get_rank(group))
    return res if res["group_rank"] == 0 else dict(rows=rows, group_rank=res["group_rank"])


def run_cases(rank: int, world: int, cases: list):
    torch.set_num_threads(1)
    return {c.id: run_case(rank, c) for c in cases}


@functools.lru_cache(maxsize=None)
def world_results(world: int) -> dict:
    mine = [c for c in CASES if c.world == world]
    per_rank = values(run_ranks(run_cases, world, mine, timeout=600))
    return {c.id: [r[c.id] for r in per_rank] for c in mine}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_ltx2_diffusion_decoder_parity(case: DCase, record_property):
    results = world_results(case.world)[case.id]
    roots = [r for r in results if r is not None and r["group_rank"] == 0]
    assert len(roots) == 1
    bar = BARS[case.dtype]
    ref = cached_reference(case, case.dtype)
    truth = cached_reference(case, "float64") if case.dtype != "float64" else None
    for res in roots:
        errs = {"out": rel_err(res["out"], ref["out"])}
        if truth is None:
            errs["z_grad"] = rel_err(res["z_grad"], ref["z_grad"])
            errs["param_grad"], name = worst(param_grad_errors(res["grads"], ref["grads"]))
        else:  # float32 gradients against the float64 truth, no farther than twice the unmodified model's distance
            own = max(rel_err(ref["z_grad"], truth["z_grad"]), worst(param_grad_errors(ref["grads"], truth["grads"]))[0])
            errs["z_grad"] = rel_err(res["z_grad"], truth["z_grad"]) / max(1.0, 2 * own / bar)
            errs["param_grad"], name = worst(param_grad_errors(res["grads"], truth["grads"]))
            errs["param_grad"] /= max(1.0, 2 * own / bar)
        record_property("max_rel_err", errs)
        print(case.id, {k: f"{v:.2e}" for k, v in errs.items()})
        for k, e in errs.items():
            assert e <= bar, f"{case.id}: {k} {e:.3e} > {bar:.0e}" + (f" ({name})" if k == "param_grad" else "")
        assert set(res["grads"]) == set(ref["grads"])
    if case.groups is None:  # stage 5 computed own rows only: 8 tokens per latent row (16 pixel rows / patch 2)
        steps = 2 if case.overrides == MULTISTEP else 1  # conv_out runs once per step
        assert [r["rows"] for r in results] == [[8 * s] * steps for s in pv.row_split(case.latent_h, case.world)]


def test_dense_window_reference_is_diffusers_flex_path():
    """The gradient reference (dense window mask through SDPA) decodes as the unmodified FlexAttention path does,
    and the parallel world-3 decode equals the FlexAttention path itself (no grad: Flex has no CPU backward)."""
    case = CASES[2]
    flex = cached_reference(case, "float64", grads=False)["out"]
    dense = cached_reference(case, "float64")["out"]
    assert rel_err(dense, flex) <= 1e-13
    parallel = world_results(case.world)[case.id][0]["out"]
    assert rel_err(parallel, flex) <= BARS["float64"]


# ---------------------------------------------------------------------------------------------------------------
# the layer alone: window rows from several ranks, forward and backward against whole-grid attention
# ---------------------------------------------------------------------------------------------------------------


def _layer_worker(rank: int, world: int, sizes: list, kernel: tuple):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(3)
    shape = (2, 3, sum(sizes), 4, 2, 8)  # (B, T, H, W, heads, d)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    # the whole grid, diffusers' window rule, dense
    dense = DenseWindowProcessor()._mask(3, sum(sizes), 4, kernel, "cpu")
    qf, kf, vf = (t.clone().requires_grad_(True) for t in (q, k, v))
    flat = lambda t: t.reshape(2, -1, 2, 8).transpose(1, 2)  # noqa: E731
    ref = F.scaled_dot_product_attention(flat(qf), flat(kf), flat(vf), attn_mask=dense).transpose(1, 2).reshape(shape)
    (ref * up).sum().backward()
    # my rows, the window rows from their owners
    a = sum(sizes[:rank])
    mine = lambda t: t[:, :, a : a + sizes[rank]].clone().requires_grad_(True)  # noqa: E731
    ql, kl, vl = mine(q), mine(k), mine(v)
    windows = row_windows(sizes, kernel[1])
    kw_, vw_ = (window_rows(t, dist.group.WORLD, 2, sizes, windows) for t in (kl, vl))
    out = neighborhood_sdpa(ql, kw_, vw_, kernel, a, windows[rank][0], sum(sizes), scale=8**-0.5)
    (out * up[:, :, a : a + sizes[rank]]).sum().backward()
    sl = slice(a, a + sizes[rank])
    return dict(
        out=rel_err(out, ref[:, :, sl]),
        q=rel_err(ql.grad, qf.grad[:, :, sl]),
        k=rel_err(kl.grad, kf.grad[:, :, sl]),
        v=rel_err(vl.grad, vf.grad[:, :, sl]),
        window=windows[rank],
    )


@pytest.mark.timeout(300)
def test_window_rows_wider_than_a_shard_forward_and_backward():
    """Kernel (3, 5, 3) on 5 rows split 2/2/1: rank 2's one row (row 4) reads rows 0-4 (the window shifted inward
    at the bottom), from every rank; float64 outputs and q/k/v gradients equal whole-grid attention's."""
    sizes, kernel = [2, 2, 1], (3, 5, 3)
    per_rank = values(run_ranks(_layer_worker, 3, sizes, kernel, timeout=240))
    assert [r["window"] for r in per_rank] == [(0, 5), (0, 5), (0, 5)]
    for r in per_rank:
        for key in ("out", "q", "k", "v"):
            assert r[key] <= 1e-12, (key, r)


def test_row_windows_shift_inward_at_the_edges():
    assert row_windows([3, 2, 2], 3) == [(0, 4), (2, 6), (4, 7)]
    assert row_windows([4, 4], 7) == [(0, 7), (1, 8)]
    assert row_windows([1, 1, 1, 1, 1, 1, 1], 7) == [(0, 7)] * 7


# ---------------------------------------------------------------------------------------------------------------
# bad input and the module table
# ---------------------------------------------------------------------------------------------------------------


def _bad_input_worker(rank, world):
    torch.set_num_threads(1)
    vae = make_model(DCase(), torch.float32)
    pv.enable_spatial_parallelism(vae)
    calls = {
        "too_few_latent_rows": lambda: vae.decode(torch.zeros(1, 4, 1, world - 1, 3)),
        "wrong_latent_channels": lambda: vae.decode(torch.zeros(1, 5, 1, world, 3)),
        "rows_below_the_kernel": lambda: vae.decode(torch.zeros(1, 4, 1, 2, 3)),  # stage 1's 3-row window
        "sharded_encode": lambda: pv.sharded_encode(vae, torch.zeros(1, 3, 1, 16 * world, 16)),
    }
    return call_outcomes(calls)


@pytest.mark.timeout(300)
def test_ltx2_diffusion_bad_input_one_clear_error_on_every_rank():
    per_rank = values(run_ranks(_bad_input_worker, 2, timeout=240))
    for name in per_rank[0]:
        errors = [r[name] for r in per_rank]
        assert errors[0] is not None, f"{name}: no error"
        assert all(e == errors[0] for e in errors), f"{name}: ranks disagree: {errors}"
    assert per_rank[0]["too_few_latent_rows"][0] == "ShardingError"
    assert "kernel size" in per_rank[0]["rows_below_the_kernel"][1]
    assert "decoder only" in per_rank[0]["sharded_encode"][1]


def test_ltx2_diffusion_refuses_an_unknown_processor_and_module():
    vae = make_model(DCase(), torch.float32)
    adapter = adapter_for(vae)
    adapter.plan(vae)  # every module of the released layout classifies
    vae.decoder.diff_blocks[0].attn.set_processor(DenseWindowProcessor())
    with pytest.raises(NotImplementedError, match=r"diff_blocks\.0\.attn .*DenseWindowProcessor"):
        adapter.plan(vae)
    vae = make_model(DCase(), torch.float32)
    vae.decoder.det_stages[0][0].mlp = torch.nn.Conv2d(1, 1, 3)
    with pytest.raises(NotImplementedError, match=r"det_stages\.0\.0\.mlp"):
        adapter.plan(vae)


def test_window_rule_against_natten_when_installed():
    """NATTEN's own na3d (on CPU, NATTEN 0.21 built without its CUDA library runs its Flex backend: forward,
    float32) against :func:`neighborhood_sdpa` on the whole grid. NATTEN is not a dependency (diffusers' NATTEN
    processor fetches GPU kernels from the Hub instead), so this runs where someone installed it."""
    natten = pytest.importorskip("natten")
    g = torch.Generator().manual_seed(0)
    for kernel, shape in (((3, 5, 3), (1, 4, 7, 6, 2, 8)), ((3, 7, 7), (2, 3, 9, 8, 1, 16))):
        q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
        ref = natten.na3d(q, k, v, kernel_size=kernel, scale=1.0)
        assert rel_err(neighborhood_sdpa(q, k, v, kernel, 0, 0, shape[2]), ref) <= BARS["float32"]

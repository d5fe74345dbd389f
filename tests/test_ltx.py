"""LTX-Video (``AutoencoderKLLTXVideo``) and LTX-2 (``AutoencoderKLLTX2Video``) against the unmodified diffusers model.

* Parity (tests/family_cases.py machinery): latents, outputs, input gradients and summed parameter gradients within
  the bars of docs/how-it-works.md, at worlds 2 and 3 with uneven splits (3 latent rows on 2 ranks: 2/1; 4 on 3: 2/1/1;
  3 on 3), replicated and sharded, every parameter perturbed (the LayerNorm affines, biases and timestep tables are not
  their initial values), diffusers' own activation checkpointing, and float32.
* The default configurations (``SEEDED_LAYOUTS`` "ltxvideo" = LTX-Video 0.9.0 = diffusers' default, "ltx2" = the
  released LTX-2 VAE, and LTX-2's class default with its causal decoder), and the layer kinds of the later released LTX-Video VAEs at fewer layers per block: 0.9.1 (decoder noise
  injection, timestep conditioning, residual depth-to-space upsamplers with channel factor 2) and 0.9.5
  (``LTXVideo095DownBlock3D`` with spatial / temporal / spatiotemporal space-to-depth downsamplers).
* LTX-2's decoder pads reflect: ranks holding a single latent row at the global top or bottom build the reflected
  row from their halo (2/1, 1/1 and 1/1/1 splits).
* Noise injection: the reference and every rank seed the global generator alike right after building the model, so
  the unmodified model's per-pixel noise is the one each rank's rows must reproduce.
* Bad input: one error, the same on every rank (too few rows, a height that is not a multiple of 32, wrong
  channels, a frame count the encoder's temporal downsamplers cannot pair, tiling).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from diffusers.models.embeddings import Timesteps
from diffusers.models.normalization import RMSNorm

import parallel_vae as pv
from parallel_vae.families import adapter_for
from parallel_vae.jobs.models import build_seeded_vae
from tests import family_cases
from tests.dist_harness import run_ranks, values
from tests.family_cases import FCase, call_outcomes, check, run_cases

NOISE_SEED = 31

# The later released LTX-Video VAEs (diffusers' convert_ltx_to_diffusers.py), at the test width 8 (block widths
# scaled by 8/128 as seeded_config scales the layout's) and one or two layers per block instead of 4-8.
VARIANTS = {
    "0.9.1": dict(
        decoder_block_out_channels=[16, 32, 64], decoder_layers_per_block=[2, 1, 1, 1],
        decoder_spatio_temporal_scaling=[True, True, True], decoder_inject_noise=[True, True, True, False],
        upsample_residual=[True, True, True], upsample_factor=[2, 2, 2], timestep_conditioning=True,
    ),
    # LTX-2's class default (diffusers' AutoencoderKLLTX2Video()), where it differs from the released VAE: a causal
    # decoder (time padding on one side) and no compression ratios (diffusers then reports 64, the layers do 32)
    "ltx2-class-default": dict(decoder_causal=True, spatial_compression_ratio=None, temporal_compression_ratio=None),
    "0.9.5": dict(
        block_out_channels=[8, 16, 32, 64, 128], down_block_types=["LTXVideo095DownBlock3D"] * 4,
        layers_per_block=[1, 1, 1, 1, 1], spatio_temporal_scaling=[True, True, True, True],
        downsample_type=["spatial", "temporal", "spatiotemporal", "spatiotemporal"],
        decoder_block_out_channels=[16, 32, 64], decoder_layers_per_block=[1, 1, 1, 1],
        decoder_spatio_temporal_scaling=[True, True, True], decoder_inject_noise=[False, False, False, False],
        upsample_residual=[True, True, True], upsample_factor=[2, 2, 2], timestep_conditioning=True,
        spatial_compression_ratio=32, temporal_compression_ratio=8,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class LTXCase(FCase):
    """An ``FCase`` of a released variant's config (``VARIANTS``) and, for timestep-conditioned decoders, a
    per-sample decode timestep."""

    variant: Optional[str] = None
    frames: int = 9  # 1 + 8k: what LTX pipelines encode
    float64_internals: bool = True  # float64 cases: see _float64_internals

    @property
    def id(self) -> str:
        extra = (f"-v{self.variant}" if self.variant else "") + ("" if self.float64_internals else "-unmodified")
        return FCase.id.fget(self) + extra

    def decode_kwargs(self, dtype: torch.dtype) -> dict:
        if self.variant is None or not VARIANTS[self.variant].get("timestep_conditioning"):
            return {}
        return {"temb": torch.linspace(0.03, 0.07, self.batch, dtype=dtype)}


def _float64_internals(vae) -> None:
    """Where diffusers computes in float32 whatever the model's dtype, compute in the input's dtype instead:
    LTX-Video's ``RMSNorm`` takes its mean square in float32 (``hidden_states.to(torch.float32)``), and
    ``get_timestep_embedding`` casts the timesteps to float32. Those float32 roundings depend on the tensor's shape
    (PyTorch's CPU reduction takes a vectorized or a scalar path per pixel depending on the tensor's size) and on
    where a gradient is summed, so the unmodified float64 model is not reproducible to 1e-10 even by itself (see
    ``test_ltxvideo_float32_internals``). With these two in float64, in the reference and on every rank alike, every
    step parallel_vae changes is held to the float64 bar. LTX-2's ``PerChannelRMSNorm`` already computes in the
    input's dtype."""
    for m in vae.modules():
        if type(m) is RMSNorm:
            _norm_in_input_dtype(m)
        elif type(m) is Timesteps:
            _embedding_in_input_dtype(m)


def _norm_in_input_dtype(norm: RMSNorm) -> None:
    assert norm.weight is None  # LTX-Video's: no affine

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return hidden_states * torch.rsqrt(variance + norm.eps)

    norm.forward = forward


def _embedding_in_input_dtype(proj: Timesteps) -> None:
    def forward(timesteps: torch.Tensor) -> torch.Tensor:
        # get_timestep_embedding with the default max_period, in the timesteps' dtype
        half = proj.num_channels // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=timesteps.dtype) / (half - proj.downscale_freq_shift)
        emb = proj.scale * timesteps[:, None] * torch.exp(exponent)[None, :]
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
        return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if proj.flip_sin_to_cos else emb

    assert proj.num_channels % 2 == 0
    proj.forward = forward


def _make(case: FCase, dtype: torch.dtype):
    config = VARIANTS[case.variant] if getattr(case, "variant", None) else None
    vae = build_seeded_vae(
        case.layout, width=case.width, latent=case.latent, seed=1234, dtype=dtype, perturb=0.05, overrides=config
    )
    if dtype == torch.float64 and getattr(case, "float64_internals", False):
        _float64_internals(vae)
    # Nothing draws from the global generator between here and the decoder's noise (encode is deterministic and
    # the inputs have their own generator), so the reference and every rank draw the same noise.
    torch.manual_seed(NOISE_SEED)
    return vae


@contextlib.contextmanager
def _ltx_models():
    """family_cases builds its models with ``make_model``: build the case's variant instead, in the reference and
    in every rank alike. Restored afterwards (pooled workers keep module globals between tasks)."""
    base = family_cases.make_model
    family_cases.make_model = _make
    try:
        yield
    finally:
        family_cases.make_model = base


CASES = [
    # world 2: 3 latent rows -> 2/1; LTX-2's last rank holds one reflect-padded row
    LTXCase("ltxvideo", "float64", "replicated", world=2, latent_h=3),
    LTXCase("ltx2", "float64", "sharded", world=2, latent_h=3),
    LTXCase("ltxvideo", "float64", "sharded", world=2, latent_h=3, variant="0.9.1"),
    LTXCase("ltx2", "float32", "replicated", world=2, latent_h=3, frames=1, batch=2),
    LTXCase("ltx2", "float64", "replicated", world=2, latent_h=2, variant="ltx2-class-default"),
    # world 3: 4 rows -> 2/1/1 and 3 rows -> 1/1/1 (LTX-2: one reflect-padded row at the top and at the bottom)
    LTXCase("ltxvideo", "float64", "sharded", world=3, latent_h=4, frames=1),
    LTXCase("ltx2", "float64", "replicated", world=3, latent_h=3, checkpointing=True),
    LTXCase("ltxvideo", "float64", "replicated", world=3, latent_h=4, frames=1, variant="0.9.1", checkpointing=True),
    LTXCase("ltxvideo", "float64", "sharded", world=3, latent_h=3, variant="0.9.5"),
]

# The unmodified float64 model (diffusers' float32 norm and timestep embedding inside), held to its own
# reproducibility instead of 1e-10: test_ltxvideo_float32_internals.
UNMODIFIED = [
    LTXCase("ltxvideo", "float64", "sharded", world=2, latent_h=3, variant="0.9.1", float64_internals=False)
]


def _run_ltx_cases(rank: int, world: int, cases: list):
    with _ltx_models():
        return run_cases(rank, world, cases)


@functools.lru_cache(maxsize=None)
def _world_results(world: int) -> dict:
    cases = [c for c in CASES + UNMODIFIED if c.world == world]
    per_rank = values(run_ranks(_run_ltx_cases, world, cases, timeout=600))
    return {c.id: [r[c.id] for r in per_rank] for c in cases}


@functools.lru_cache(maxsize=None)
def _reference(case: LTXCase, dtype_name: str) -> dict:
    with _ltx_models():
        return family_cases.reference(case, dtype_name)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_ltx_parity(case: LTXCase, record_property):
    results = _world_results(case.world)[case.id]
    roots = [r for r in results if r is not None and r["group_rank"] == 0]
    assert len(roots) == 1
    truth = _reference(case, "float64") if case.dtype != "float64" else None
    errs = check(case, roots[0], _reference(case, case.dtype), truth)
    record_property("max_rel_err", errs)
    print(case.id, {k: f"{v:.2e}" for k, v in errs.items()})
    # every rank's decoder computed its own rows only (before the unpatchify), never the whole height
    sizes = pv.row_split(case.latent_h, case.world)
    rows = [r["conv_out_rows"] for r in results]
    per_latent_row = rows[0][0] // sizes[0]
    assert per_latent_row == 8 and rows == [[s * per_latent_row] for s in sizes], rows


@pytest.mark.timeout(600)
def test_ltxvideo_float32_internals():
    """The unmodified float64 LTX-Video model carries float32 rounding: its RMSNorm takes the mean square in float32
    and its timestep embedding casts to float32, roundings that move with the tensor's shape (a row shard is another
    shape). So it is held, as float32 models are (tests/cases.py), to the float64 truth (the same model with those
    two steps in float64, which the parity cases hold to 1e-10): the parallel model (rows split 2/1) must be no
    farther from the truth than twice the unmodified model's own distance to it."""
    case = UNMODIFIED[0]
    res = [r for r in _world_results(case.world)[case.id] if r is not None and r["group_rank"] == 0][0]
    ref = _reference(case, "float64")
    truth = _reference(dataclasses.replace(case, float64_internals=True), "float64")
    errs = {}
    for key in ("z", "out", "x_grad"):
        errs[key] = [family_cases.rel_err(r[key], truth[key]) for r in (res, ref)]
        errs[key].append(family_cases.rel_err(res[key], ref[key]))
    errs["param_grad"] = [
        family_cases.worst(family_cases.param_grad_errors(r["grads"], truth["grads"]))[0] for r in (res, ref)
    ] + [family_cases.worst(family_cases.param_grad_errors(res["grads"], ref["grads"]))[0]]
    shown = {k: "parallel {:.2e}, unmodified {:.2e} from the truth; {:.2e} apart".format(*v) for k, v in errs.items()}
    print(case.id, shown)
    for key, (parallel, itself, _) in errs.items():
        assert parallel <= max(1e-10, 2 * itself), (key, parallel, itself)


def test_ltx_noise_is_drawn():
    """The 0.9.1 variant really injects noise: with its per-channel scales (perturbed away from 0) the output
    depends on the generator's state, so the parity cases above check the noise rows, not a no-op."""
    case = LTXCase("ltxvideo", "float64", variant="0.9.1")
    vae = _make(case, torch.float64)
    z = torch.randn(1, 4, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kw = case.decode_kwargs(torch.float64)
    torch.manual_seed(1)
    a = vae.decode(z, **kw).sample
    torch.manual_seed(2)
    b = vae.decode(z, **kw).sample
    torch.manual_seed(1)
    c = vae.decode(z, **kw).sample
    assert (a - b).abs().max() > 1e-3 and torch.equal(a, c)


def _frame_noise_worker(rank: int, world: int):
    """Rows 2/1 of a 5-wide frame, each rank's generator seeded differently: (my rows, my generator's next draw)."""
    import torch.distributed as dist

    from parallel_vae.layers.ltx_noise import frame_noise

    torch.manual_seed(100 + rank)
    rows = [2, 1][rank]
    mine = frame_noise(rows, 5, dist.group.WORLD, device=torch.device("cpu"), dtype=torch.float64)
    return mine, torch.randn(3, dtype=torch.float64)


def test_frame_noise_is_rank_zeros_field_and_generators_advance_alike():
    """The shards form one field, group rank 0's draw of the whole frame, even when the ranks' generators differ;
    each rank's generator advanced by exactly one whole-frame draw, as the unmodified model's would."""
    per_rank = values(run_ranks(_frame_noise_worker, 2, timeout=120))
    for rank, (_, after) in enumerate(per_rank):
        g = torch.Generator().manual_seed(100 + rank)
        full = torch.randn((3, 5), generator=g, dtype=torch.float64)
        assert torch.equal(after, torch.randn(3, generator=g, dtype=torch.float64))
        if rank == 0:
            assert torch.equal(torch.cat([r[0] for r in per_rank]), full)


def _reflect_edge_worker(rank: int, world: int, sizes: tuple):
    """LTX-2's decoder conv (3x3x3, reflect) on shards whose edge ranks hold one row: (forward rel err, gradcheck)."""
    import torch.distributed as dist
    import torch.nn as nn

    from parallel_vae.core.halo import HaloConv
    from tests.test_core import _SumGradsOverGroup, _rel, _sharded, _swap

    torch.manual_seed(0)
    group = dist.group.WORLD
    conv = nn.Conv3d(2, 3, 3, padding=(0, 1, 1), padding_mode="reflect").double()
    x = torch.randn(1, 2, 3, sum(sizes), 3, dtype=torch.float64, requires_grad=True)
    ref = conv(x)
    w0 = conv.weight.detach().clone().requires_grad_(True)
    _swap(conv, HaloConv, group)

    def f(x, w):
        w = _SumGradsOverGroup.apply(w, group)
        return _sharded(lambda l: torch.func.functional_call(conv, {"weight": w, "bias": conv.bias}, (l,)), sizes, group)(x)

    return _rel(f(x, w0), ref), torch.autograd.gradcheck(f, (x, w0), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sizes", [(1, 1), (1, 2, 1)])
def test_reflect_padding_on_one_row_edge_shards(sizes):
    """A reflect pad reads the second row, which a one-row edge shard lacks: it is built from the halo instead."""
    err, ok = values(run_ranks(_reflect_edge_worker, len(sizes), sizes, timeout=240))[0]
    assert err <= 1e-10 and ok, (err, ok)


def _bad_input_worker(rank: int, world: int, layout: str):
    """Each bad call on every rank: the error type and message."""
    torch.set_num_threads(1)
    vae = build_seeded_vae(layout, width=8, latent=4, seed=0)
    pv.enable_spatial_parallelism(vae)
    adapter = adapter_for(vae)
    f, c, zc = adapter.spatial_factor(vae), adapter.pixel_channels(vae), adapter.latent_channels(vae)

    def tiled():
        vae.enable_tiling()
        try:
            vae.decode(torch.zeros(1, zc, 1, world, 2))
        finally:
            vae.disable_tiling()

    calls = {
        "too_few_latent_rows": lambda: vae.decode(torch.zeros(1, zc, 1, world - 1, 2)),
        "pixel_height_not_multiple": lambda: vae.encode(torch.zeros(1, c, 1, f * world + 4, f)),
        "wrong_latent_channels": lambda: vae.decode(torch.zeros(1, zc + 1, 1, world, 2)),
        "wrong_pixel_channels": lambda: vae.encode(torch.zeros(1, c + 1, 1, f * world, f)),
        "tiling_enabled": tiled,
    }
    if layout == "ltx2":  # LTX-Video's stride-2 conv downsamplers take any frame count; LTX-2's pair frames up
        calls["frames_not_paired"] = lambda: pv.sharded_encode(vae, torch.zeros(1, c, 4, f, f))
    return call_outcomes(calls)


@pytest.mark.timeout(300)
def test_ltx_bad_input_one_clear_error_on_every_rank():
    for layout in ("ltxvideo", "ltx2"):
        per_rank = values(run_ranks(_bad_input_worker, 2, layout, timeout=240))
        for name in per_rank[0]:
            errors = [r[name] for r in per_rank]
            assert errors[0] is not None, f"{layout} {name}: no error"
            assert all(e == errors[0] for e in errors), f"{layout} {name}: ranks disagree: {errors}"
            expected = "RuntimeError" if name == "tiling_enabled" else "ShardingError"
            assert errors[0][0] == expected, errors[0]
        if layout == "ltx2":
            assert "1 + 8n frames" in per_rank[0]["frames_not_paired"][1]
        assert "minimum" in per_rank[0]["too_few_latent_rows"][1]
        assert "exclusive" in per_rank[0]["tiling_enabled"][1]


def test_ltx_geometry_from_layers():
    """Factors come from the layers: LTX-2's class default leaves spatial_compression_ratio unset and diffusers then
    reports 64, though its encoder compresses rows 32x (one of its four downsamplers is temporal only)."""
    from diffusers import AutoencoderKLLTX2Video

    default = AutoencoderKLLTX2Video(block_out_channels=(8, 16, 32, 64), decoder_block_out_channels=(8, 16, 32),
                                     latent_channels=4, layers_per_block=(1, 1, 1, 1, 1),
                                     decoder_layers_per_block=(1, 1, 1, 1))  # fmt: skip
    adapter = adapter_for(default)
    assert default.spatial_compression_ratio == 64
    assert (adapter.spatial_factor(default), adapter.temporal_factor(default)) == (32, 8)
    for layout in ("ltxvideo", "ltx2"):
        vae = build_seeded_vae(layout, width=8, latent=4)
        a = adapter_for(vae)
        assert (a.spatial_factor(vae), a.temporal_factor(vae)) == (32, 8)
        assert a.check_frames(vae, 17, latent=False) is None and a.check_frames(vae, 5, latent=True) is None

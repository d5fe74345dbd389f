"""HunyuanVideo (``AutoencoderKLHunyuanVideo``) against the unmodified diffusers model.

* Parity (tests/family_cases.py machinery): outputs, input gradients and summed parameter gradients within
  the bars of docs/how-it-works.md at worlds 2-4, 7 latent rows on 3 ranks (3/2/2), one latent row per rank, batch 2,
  replicated and sharded, a subgroup, activation checkpointing, float32. diffusers' framewise (temporal tiled) encode
  and decode run in the true default configuration (17 frames: tiles of 16 + 1 frames, stride 12) and with smaller tiles
  (8 + 1, stride 4) set identically on the reference and the parallel model (more tile boundaries, fewer frames); each
  case checks that the reference really took the path it is meant to.
* Activation checkpointing (diffusers' own): halo convs inside checkpointed blocks are recomputed in backward on
  every rank alike, and the gradients equal those without checkpointing.
* The mid block alone (its frame-causal attention over 4 frames): exact against diffusers' masked mid block in the
  forward and in input and parameter gradients, in both its plain and its gradient-checkpointing branch, and the
  sharded one never builds the mask.
* Peak memory of the attention step: sharded (per rank) against the unmodified masked one.
* Bad input: one ``ShardingError``, the same on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import weakref
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.distributed as dist
from diffusers.models.autoencoders import autoencoder_kl_hunyuan_video as hv
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import parallel_vae as pv
from parallel_vae.core.comm import gather_rows
from parallel_vae.core.plan import SpatialState, apply_plan, classify
from parallel_vae.families import adapter_for
from parallel_vae.families import hunyuan_video as hvf
from tests import family_cases
from tests.cases import rel_err
from tests.dist_harness import run_ranks, values
from tests.family_cases import FCase, call_outcomes, check, run_cases

L = "hunyuanvideo"
SMALL_TILES = (8, 4)  # tile_sample_min_num_frames, tile_sample_stride_num_frames (diffusers: 16, 12)


@dataclass(frozen=True)
class HVCase(FCase):
    """An ``FCase`` with optional temporal tile sizes, set on both the reference and the parallel model."""

    tiles: Optional[tuple] = None

    @property
    def id(self) -> str:
        base = FCase.id.fget(self)
        return base + (f"-tiles{self.tiles[0]}s{self.tiles[1]}" if self.tiles else "-default")

    def framewise(self) -> tuple[bool, bool]:
        """Whether diffusers' own ``_encode`` / ``_decode`` take the temporal tiled path for this case."""
        tmin = self.tiles[0] if self.tiles else 16
        latent_frames = (self.frames - 1) // 4 + 1
        return self.frames > tmin, latent_frames > tmin // 4


CASES = [
    # the true default configuration; 17 frames: framewise encode (2 tiles) and decode (2 tiles)
    HVCase(L, "float64", "replicated", world=2, latent_h=2, frames=17),
    # 9 frames in tiles of 8 + 1 (stride 4): 3 encoder and 3 decoder tiles, blended; recomputed in backward
    HVCase(L, "float64", "sharded", world=2, latent_h=2, frames=9, batch=2, tiles=SMALL_TILES, checkpointing=True),
    # uneven: 7 latent rows on 3 ranks -> 3/2/2 (5 frames: no temporal tiling)
    HVCase(L, "float64", "sharded", world=3, latent_h=7, frames=5),
    # float32: the unmodified float32 model of this seeded layout is itself 4e-6 to 4.6e-5 from the float64 truth
    # depending on the frame size (the rounding of ~60 GroupNorm/conv layers; t9 h3x2: 2.9e-5, and 3.8e-5 between
    # 1 and 2 threads; only swapping its convs to oneDNN moves it 5.3e-5), and the parallel model lands as far from
    # the truth as it does (5.7e-6 vs 5.4e-6, 9.3e-6 vs 9.4e-6, 4.9e-6 vs 4.8e-6 on three sizes). Against the float32
    # reference, 1e-5 is therefore testable only where the reference is stable well below it: 5 x 4 latents
    # (its distance to the truth 4.8e-6; the parallel's 4.9e-6, 6.5e-6 from the reference).
    HVCase(L, "float32", "sharded", world=3, latent_h=5, latent_w=4, frames=9, tiles=SMALL_TILES),
    HVCase(L, "float64", "replicated", world=4, latent_h=4, frames=5),
    HVCase(L, "float64", "replicated", world=4, latent_h=3, frames=5, groups=((2, 3),)),
]


@contextlib.contextmanager
def _tiled_models():
    """family_cases builds its models with ``make_model``; set each case's tile sizes right after, in the reference
    and in every rank alike. Restored afterwards (pooled workers keep module globals between tasks)."""
    base = family_cases.make_model

    def make(case, dtype):
        vae = base(case, dtype)
        if getattr(case, "tiles", None):
            vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames = case.tiles
        return vae

    family_cases.make_model = make
    try:
        yield
    finally:
        family_cases.make_model = base


def _run_hv_cases(rank: int, world: int, cases: list):
    with _tiled_models():
        return run_cases(rank, world, cases)


@functools.lru_cache(maxsize=None)
def _world_results(world: int) -> dict:
    cases = [c for c in CASES if c.world == world]
    per_rank = values(run_ranks(_run_hv_cases, world, cases, timeout=600))
    return {c.id: [r[c.id] for r in per_rank] for c in cases}


@functools.lru_cache(maxsize=None)
def _reference(case: HVCase, dtype_name: str) -> dict:
    """The unmodified model; also counts its encoder/decoder calls (more than one: temporal tiles ran)."""
    calls = {"encoder": 0, "decoder": 0}

    def count(name):
        return lambda *args: calls.__setitem__(name, calls[name] + 1)

    with _tiled_models():
        tiled = family_cases.make_model

        def counting(c, dtype):
            vae = tiled(c, dtype)
            vae.encoder.register_forward_pre_hook(count("encoder"))
            vae.decoder.register_forward_pre_hook(count("decoder"))
            return vae

        family_cases.make_model = counting  # _tiled_models() restores the original on exit
        res = family_cases.reference(case, dtype_name)
    res["calls"] = calls
    return res


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hunyuan_video_parity(case: HVCase, record_property):
    results = _world_results(case.world)[case.id]
    roots = [r for r in results if r is not None and r["group_rank"] == 0]
    assert len(roots) == (1 if case.groups is None else len(case.groups))
    ref = _reference(case, case.dtype)
    # the temporal tiling this case is meant to exercise really runs in diffusers' own _encode/_decode
    enc_tiled, dec_tiled = case.framewise()
    assert (ref["calls"]["encoder"] > 1) == enc_tiled and (ref["calls"]["decoder"] > 1) == dec_tiled, ref["calls"]
    truth = _reference(case, "float64") if case.dtype != "float64" else None
    for res in roots:
        errs = check(case, res, ref, truth)
        record_property("max_rel_err", errs)
        print(case.id, {k: f"{v:.2e}" for k, v in errs.items()})
    if case.groups is None:
        # every rank's decoder computed its own rows only (8 pixel rows per latent row), never the whole height
        rows = [r["conv_out_rows"] for r in results]
        assert rows == [[s * 8] for s in pv.row_split(case.latent_h, case.world)], rows


def test_framewise_cases_cover_both_paths():
    """Temporal tiling runs in encode and decode in diffusers' default tile configuration and with small tiles,
    the latter also under activation checkpointing and in float32."""
    framewise = [c for c in CASES if c.framewise() == (True, True)]
    assert any(c.tiles is None for c in framewise)
    assert any(c.tiles and c.checkpointing for c in framewise)
    assert any(c.tiles and c.dtype == "float32" for c in framewise)


def test_spatial_factor_is_the_layers_ratio():
    """The factor comes from the config, checked against the stride-2 downsamples and 2x upsamples diffusers built
    (it derives them from log2 of the ratio, capped by the block count: 32 with 4 blocks builds 16)."""
    import diffusers

    from parallel_vae.jobs.models import seeded_config

    name, cfg = seeded_config(L, 8, 4)
    for ratio, expect in ((8, 8), (16, 16), (32, None)):
        vae = getattr(diffusers, name)(**dict(cfg, spatial_compression_ratio=ratio))
        adapter = adapter_for(vae)
        if expect is None:
            with pytest.raises(ValueError, match="4 stride-2 downsamples"):
                adapter.spatial_factor(vae)
            with pytest.raises(ValueError, match="4 stride-2 downsamples"):
                adapter.plan(vae)
        else:
            assert adapter.spatial_factor(vae) == expect


class _MyGroupNorm(torch.nn.GroupNorm):
    pass


def test_unknown_modules_are_refused():
    """A module the table does not know (a new layer, a subclass of a known one, an attention outside the mid
    block, a circular pad) raises before anything is changed."""

    def model():
        return family_cases.make_model(FCase(L, "float32"), torch.float32)

    edits = {
        "new layer": lambda v: setattr(v.decoder.up_blocks[0].resnets[0], "nonlinearity", torch.nn.Upsample(1.0)),
        "subclass": lambda v: setattr(v.decoder, "conv_norm_out", _MyGroupNorm(4, 8)),
        "attention outside the mid block": lambda v: setattr(
            v.decoder.up_blocks[0].resnets[0], "extra", copy.deepcopy(v.decoder.mid_block.attentions[0])
        ),
        "circular pad": lambda v: setattr(v.decoder.conv_out, "pad_mode", "circular"),
    }
    for what, edit in edits.items():
        vae = model()
        edit(vae)
        with pytest.raises(NotImplementedError, match="does not know how to shard"):
            adapter_for(vae).plan(vae)
    assert adapter_for(model()).plan(model())  # the unedited model is fully classified


def _recompute_worker(rank: int, world: int):
    """Sharded encode + decode with diffusers' own gradient checkpointing: how often a halo conv inside a
    checkpointed block (decoder mid block) and one outside any (decoder conv_out) run in forward and in backward,
    and the largest gradient difference against the same run without checkpointing."""
    torch.set_num_threads(1)
    case = FCase(L, "float64", "sharded", world=world, latent_h=3, frames=5)
    grads, counts = [], {}
    for ckpt in (False, True):
        vae = family_cases.make_model(case, torch.float64)
        pv.enable_spatial_parallelism(vae)
        if ckpt:
            pv.enable_gradient_checkpointing(vae)
        phase = ["forward"]

        def count(module, args, key):
            key = key + (phase[0],)
            counts[key] = counts.get(key, 0) + 1

        for name in ("decoder.mid_block.resnets.0.conv1", "decoder.conv_out"):
            vae.get_submodule(name).register_forward_pre_hook(functools.partial(count, key=(ckpt, name)))
        x, w = family_cases.make_inputs(case, vae, torch.float64)
        x_local = pv.shard_video(vae, x)
        out = pv.sharded_decode(vae, pv.sharded_encode(vae, x_local).mode())
        phase[0] = "backward"
        (out * pv.shard_video(vae, w)).sum().backward()
        grads.append({n: p.grad for n, p in vae.named_parameters()})
    diff = max(
        (grads[0][n] - grads[1][n]).abs().max().item() / (grads[0][n].abs().max().item() or 1.0) for n in grads[0]
    )
    return {"counts": {"|".join(map(str, k)): v for k, v in counts.items()}, "diff": diff}


@pytest.mark.timeout(300)
def test_checkpointing_recomputes_halo_convs():
    per_rank = values(run_ranks(_recompute_worker, 2, timeout=240))
    for r in per_rank:
        c = r["counts"]
        print(c, r["diff"])
        mid, out = "decoder.mid_block.resnets.0.conv1", "decoder.conv_out"
        # checkpointed: the mid block's halo conv runs again in backward, its exchange re-run on every rank alike
        # (twice: diffusers checkpoints the decoder's mid block and, nested inside it, each of its resnets)
        assert c[f"True|{mid}|forward"] == 1 and c[f"True|{mid}|backward"] >= 1, c
        assert f"False|{mid}|backward" not in c and f"True|{out}|backward" not in c, c
        assert r["diff"] <= 1e-12, r


# ---------------------------------------------------------------------------------------------------------------
# the mid block alone
# ---------------------------------------------------------------------------------------------------------------

MID_CHANNELS, MID_GROUPS = 8, 4


def _mid_block(dtype: torch.dtype) -> hv.HunyuanVideoMidBlock3D:
    """A seeded mid block as the decoder builds it (one head over all channels), every parameter perturbed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        block = hv.HunyuanVideoMidBlock3D(
            MID_CHANNELS, resnet_groups=MID_GROUPS, attention_head_dim=MID_CHANNELS, add_attention=True
        )
        with torch.no_grad():
            for p in block.parameters():
                p.add_(torch.rand_like(p).sub_(0.5).mul_(0.1))
    return block.to(dtype)


def _shard_mid_block(block, group, world):
    """The adapter's plan applied to a bare mid block (the block itself is the root, which classify() skips)."""
    plan = [hvf.hunyuan_video_treatment("", block, {})]
    plan += classify(block, hvf._CONTAINERS, hvf._LOCAL, hvf.hunyuan_video_treatment)
    apply_plan(block, plan, SpatialState(group, world, 1))
    return block


@contextlib.contextmanager
def _mask_forbidden():
    def refuse(*args, **kwargs):
        raise AssertionError("the sharded mid block built diffusers' (T*H*W)^2 attention mask")

    original = hv.prepare_causal_attention_mask
    hv.prepare_causal_attention_mask = refuse
    try:
        yield
    finally:
        hv.prepare_causal_attention_mask = original


def _mid_block_worker(rank: int, world: int, checkpointing: bool):
    """Sharded over the world vs the unmodified (masked) mid block: relative errors of the output, the input
    gradient and the worst parameter gradient (summed over ranks), float64."""
    torch.set_num_threads(1)
    dtype = torch.float64
    g = torch.Generator().manual_seed(3)
    shape = (2, MID_CHANNELS, 4, 5, 3)  # B, C, T=4 latent frames, H=5 rows (3/2 on 2 ranks), W
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5
    w = torch.randn(shape, generator=g, dtype=dtype)
    ref_block, block = _mid_block(dtype), _mid_block(dtype)
    for b in (ref_block, block):
        if checkpointing:
            b.gradient_checkpointing = True
            b._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    xr = x.clone().requires_grad_(True)
    ref = ref_block(xr)
    (ref * w).sum().backward()

    _shard_mid_block(block, dist.group.WORLD, world)
    sizes = pv.row_split(shape[3], world)
    start = sum(sizes[:rank])
    x_local = x.narrow(3, start, sizes[rank]).clone().requires_grad_(True)
    with _mask_forbidden():
        out_local = block(x_local)
        (out_local * w.narrow(3, start, sizes[rank])).sum().backward()
    out = gather_rows(out_local.detach(), dist.group.WORLD, dim=3, sizes=sizes)
    gx = gather_rows(x_local.grad, dist.group.WORLD, dim=3, sizes=sizes)
    grads = {}
    for n, p in block.named_parameters():
        gp = p.grad.clone()
        dist.all_reduce(gp)
        grads[n] = gp
    ref_grads = {n: p.grad for n, p in ref_block.named_parameters()}
    return {
        "out": rel_err(out, ref.detach()),
        "x_grad": rel_err(gx, xr.grad),
        "param_grad": family_cases.worst(family_cases.param_grad_errors(grads, ref_grads)),
        "n_params": len(grads),
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_mid_block_exact_without_mask(checkpointing):
    per_rank = values(run_ranks(_mid_block_worker, 2, checkpointing, timeout=240))
    for r in per_rank:
        print(r)
        assert r["n_params"] == sum(1 for _ in _mid_block(torch.float64).parameters())
        assert r["out"] <= 1e-10 and r["x_grad"] <= 1e-10, r
        assert r["param_grad"][0] <= 1e-10, r


# ---------------------------------------------------------------------------------------------------------------
# peak memory of the attention step
# ---------------------------------------------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created while active (storages that existed before are not counted).

    Every op's outputs are registered by storage; a weakref finalizer on the storage (torch keeps one Python
    object per live storage) subtracts its bytes when it is freed. Views and in-place results share a storage and
    count once. Not seen: scratch buffers a fused kernel allocates and frees inside itself."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # an output on an input's storage (a view, an in-place result) is not new memory, even when that storage
        # was made before the mode started
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                s = t.untyped_storage()
                key = id(s)
                if key not in self._sizes and key not in inputs:
                    self._sizes[key] = s.nbytes()
                    self.live += s.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(s, self._free, key)
        return out


def test_live_bytes_tracker_counts_what_it_should():
    before = torch.zeros(4000, dtype=torch.float64)
    with LiveBytes() as m:
        view = before[100:].view(-1, 10)  # views of a storage made before: never counted
        view.mul_(2)
        a = torch.empty(1000, dtype=torch.float64)  # 8000 B
        b = torch.ones(500, dtype=torch.float64)  # 4000 B
        a.add_(1)  # in place: no new storage
        v = b[10:]  # a view: no new storage
        del a
        c = torch.zeros(2000, dtype=torch.float64)  # 16000 B: peak 20000
        del b, v, c, view
    assert m.peak == 20000 and m.live == 0, (m.peak, m.live)


MEM_SHAPE = (1, 8, 8, 8, 8)  # B, C=8, T=8 latent frames, 8 x 8 latent: 512 tokens, a 512 x 512 mask


def _attention_input(rank: int, world: int):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(MEM_SHAPE, generator=g, dtype=torch.float64)
    sizes = pv.row_split(MEM_SHAPE[3], world)
    start = sum(sizes[:rank])
    return x, x.narrow(3, start, sizes[rank])


def _tokens(x):
    # (B, C, T, H, W) -> (B, T * H * W, C), as the mid block flattens them
    return x.permute(0, 2, 3, 4, 1).flatten(1, 3).contiguous()


def _attention_memory_worker(rank: int, world: int):
    """Peak live bytes of one attention step (forward, no grad): diffusers' (mask + masked attention) and the
    sharded one (frame-causal, this rank's queries) on this rank; and the sharded result's error."""
    torch.set_num_threads(1)
    block = _mid_block(torch.float64)
    attn = block.attentions[0]
    x, x_local = _attention_input(rank, world)
    b, c, t, h, w = x.shape
    with torch.no_grad():
        tokens = _tokens(x)
        with LiveBytes() as masked:
            mask = hv.prepare_causal_attention_mask(t, h * w, tokens.dtype, tokens.device, batch_size=b)
            ref = attn(tokens, attention_mask=mask)
            del mask
        _shard_mid_block(block, dist.group.WORLD, world)
        local = _tokens(x_local)
        with LiveBytes() as sharded:
            out_local = attn(local, frames=t)
    ref_local = ref.unflatten(1, (t, h, w)).narrow(2, sum(pv.row_split(h, world)[:rank]), x_local.shape[3])
    err = rel_err(out_local.unflatten(1, (t, x_local.shape[3], w)), ref_local)
    return {"masked": masked.peak, "sharded": sharded.peak, "err": err}


# Measured (torch 2.13 CPU, float64, 1 thread, 2 ranks; B=1, C=8, 8 frames of 8 x 8 latent = 512 tokens, no grad):
#   masked (diffusers: build the mask, then SDPA with it): 3,147,808 B, the mask's construction (a 512^2 bool,
#   the float32 torch.where result and the float64 mask live at once: 256 KiB + 1 MiB + 2 MiB);
#   sharded: 262,144 B on rank 0 and on rank 1 (0.083x), the K/V all-gather buffers (local cat + contiguous copy,
#   gathered buffer + contiguous copy); the per-frame SDPA (flash kernel, no mask) adds less than that.
# The mask grows as (T*H*W)^2, the sharded peak as T*H*W*C, so the ratio only falls for larger clips.
MEMORY_RATIO = 0.1


@pytest.mark.timeout(300)
def test_attention_peak_memory_no_mask():
    per_rank = values(run_ranks(_attention_memory_worker, 2, timeout=240))
    for r in per_rank:
        print(r)
        n = MEM_SHAPE[2] * MEM_SHAPE[3] * MEM_SHAPE[4]
        assert r["masked"] >= n * n * 8, r  # the mask alone
        assert r["sharded"] <= MEMORY_RATIO * r["masked"], r
        assert r["err"] <= 1e-12, r


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def _bad_input_worker(rank: int, world: int):
    """Each bad call on every rank: the error type and message."""
    torch.set_num_threads(1)
    case = FCase(L, "float32", world=world)
    vae = family_cases.make_model(case, torch.float32)
    pv.enable_spatial_parallelism(vae)
    adapter = adapter_for(vae)
    f, c, zc = adapter.spatial_factor(vae), adapter.pixel_channels(vae), adapter.latent_channels(vae)
    assert f == 8
    calls = {
        "too_few_latent_rows": lambda: vae.decode(torch.zeros(1, zc, 1, world - 1, 2)),
        "pixel_height_not_multiple": lambda: vae.encode(torch.zeros(1, c, 1, f * world + 4, f)),
        "wrong_latent_channels": lambda: vae.decode(torch.zeros(1, zc + 1, 1, world, 2)),
        "wrong_pixel_channels": lambda: vae.encode(torch.zeros(1, c + 1, 1, f * world, f)),
        "no_frames": lambda: vae.decode(torch.zeros(1, zc, 0, world, 2)),
        "sharded_shard_not_multiple": lambda: pv.sharded_encode(vae, torch.zeros(1, c, 1, f + 4 * rank, f)),
    }
    return call_outcomes(calls)


@pytest.mark.timeout(300)
def test_bad_input_one_clear_error_on_every_rank():
    per_rank = values(run_ranks(_bad_input_worker, 2, timeout=240))
    for name in per_rank[0]:
        errors = [r[name] for r in per_rank]
        assert errors[0] is not None, f"{name}: no error"
        assert all(e == errors[0] for e in errors), f"{name}: ranks disagree: {errors}"
        assert errors[0][0] == "ShardingError", errors[0]
        print(name, errors[0][1])

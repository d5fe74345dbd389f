"""enable/disable in place, state_dict and save/load, clear errors on every rank, bf16, no-op paths."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from diffusers import AutoencoderKLWan

import parallel_vae as pv
from parallel_vae.core.sharding import ShardingError
from tests.cases import Case, make_inputs, make_model, rel_err
from tests.dist_harness import run_ranks, values


def _enable_disable_worker(rank, world, save_dir):
    vae = make_model("wan2.2", torch.float64)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    params_before = [id(p) for p in vae.parameters()]
    classes_before = {n: type(m) for n, m in vae.named_modules()}
    pv.enable_spatial_parallelism(vae)
    swapped = sorted({type(m).__name__ for n, m in vae.named_modules() if type(m) is not classes_before[n]})
    assert list(vae.state_dict()) == list(before)
    assert [id(p) for p in vae.parameters()] == params_before
    with pytest.raises(RuntimeError, match="already enabled"):
        pv.enable_spatial_parallelism(vae)
    twin = copy.deepcopy(vae)  # e.g. an EMA copy: stays parallel, shares the group
    assert pv.is_spatially_parallel(twin) and pv.spatial_group(twin) is pv.spatial_group(vae)
    x, _ = make_inputs(Case("wan2.2", latent_h=2), torch.float64)
    z_par = vae.encode(x).latent_dist.mode()
    z_twin = twin.encode(x).latent_dist.mode()
    if rank == 0:
        vae.save_pretrained(save_dir)  # while enabled
    dist.barrier()
    pv.disable_spatial_parallelism(vae)
    assert not pv.is_spatially_parallel(vae)
    assert {n: type(m) for n, m in vae.named_modules()} == classes_before
    assert "_encode" not in vae.__dict__ and "_decode" not in vae.__dict__
    z_plain = vae.encode(x).latent_dist.mode()  # after disable: the unmodified model on every rank, no collectives
    return dict(swapped=swapped, z_par=z_par, z_twin=z_twin, z_plain=z_plain)


@pytest.mark.timeout(240)
def test_enable_disable_in_place_and_saved_model_loads_in_plain_diffusers(tmp_path):
    save_dir = str(tmp_path / "vae")
    res = values(run_ranks(_enable_disable_worker, 2, save_dir))
    assert res[0]["swapped"] == [
        "HaloCausalConv_WanCausalConv3d",
        "HaloConv_Conv2d",
        "HaloZeroPad2d_ZeroPad2d",
        "ShardedFrameAttention_WanAttentionBlock",
    ]
    for r in res:
        assert rel_err(r["z_par"], r["z_plain"]) <= 1e-10
        assert torch.equal(r["z_twin"], r["z_par"])
    loaded = AutoencoderKLWan.from_pretrained(save_dir, torch_dtype=torch.float64)
    original = make_model("wan2.2", torch.float64)
    for k, v in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert type(loaded.decoder.conv_out) is type(original.decoder.conv_out)


def test_rejects_what_it_cannot_shard():
    with pytest.raises(TypeError, match="supports the diffusers classes .*AutoencoderKLWan"):
        pv.enable_spatial_parallelism(torch.nn.Conv2d(1, 1, 1))

    from parallel_vae.families import plan_for

    vae = make_model("wan2.1", torch.float32)

    class MyBlur(torch.nn.Module):  # a module with unknown spatial reach
        def forward(self, x):
            return x

    vae.decoder.up_blocks[0].resnets[0].norm1 = MyBlur()
    with pytest.raises(NotImplementedError, match="decoder.up_blocks.0.resnets.0.norm1"):
        plan_for(vae)


def test_row_arithmetic():
    assert pv.row_split(7, 3) == [3, 2, 2]
    assert pv.row_split(4, 4) == [1, 1, 1, 1]
    assert pv.row_offsets([3, 2, 2]) == [0, 3, 5]
    with pytest.raises(ShardingError, match="at least one row"):
        pv.row_split(2, 3)
    from parallel_vae.core.sharding import check_pixel_height, nearest_valid

    assert nearest_valid(100, 8) == [96, 104]
    assert nearest_valid(100, 16, world=8) == [128]
    with pytest.raises(ShardingError, match=r"not a multiple of the spatial factor 8.*96 or 104"):
        check_pixel_height(100, 2, 8)
    with pytest.raises(ShardingError, match=r"minimum is 4 latent rows \(32 pixel rows"):
        check_pixel_height(24, 4, 8)


# Each bad input: (name, function run on every rank returning the tensor to decode/encode). All run in one spawn;
# since every rank raises after the same agreement collective, the group stays usable for the next case.
def _bad_inputs_worker(rank, world):
    vae = make_model("wan2.1", torch.float32)
    pv.enable_spatial_parallelism(vae)
    z_ok = torch.zeros(1, 4, 2, 3, 3)
    x_ok = torch.zeros(1, 3, 5, 24, 24)
    cases = {
        "too_few_latent_rows": lambda: vae.decode(torch.zeros(1, 4, 2, 1, 3)),
        "rank_mismatched_shapes": lambda: vae.decode(torch.zeros(1, 4, 2, 3, 3 + rank)),
        "rank_mismatched_dtype": lambda: vae.decode(z_ok.to(torch.float64 if rank else torch.float32)),
        "wrong_latent_channels": lambda: vae.decode(torch.zeros(1, 5, 2, 3, 3)),
        "wrong_pixel_channels": lambda: vae.encode(torch.zeros(1, 4, 5, 24, 24)),
        "pixel_height_not_multiple": lambda: vae.encode(torch.zeros(1, 3, 5, 20, 24)),
        "pixel_height_too_small": lambda: vae.encode(torch.zeros(1, 3, 5, 8, 24)),
        "not_5d": lambda: vae.decode(torch.zeros(4, 2, 3, 3)),
        "sharded_shard_not_multiple": lambda: pv.sharded_encode(vae, torch.zeros(1, 3, 5, 8 + 4 * rank, 24)),
        "sharded_mode_mismatch": lambda: (
            pv.sharded_decode(vae, z_ok) if rank == 0 else pv.sharded_encode(vae, x_ok)
        ),
    }
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            out[name] = None
        except Exception as e:
            out[name] = (type(e).__name__, str(e))
    # The group is still healthy: a correct call works after all those errors.
    out["after"] = vae.decode(z_ok).sample.shape
    vae.enable_tiling()
    try:
        vae.decode(z_ok)
        out["tiling"] = None
    except Exception as e:
        out["tiling"] = (type(e).__name__, str(e))
    return out


EXPECTED_ERRORS = {
    "too_few_latent_rows": r"latent height 1 is too small for a spatial group of 2 ranks.*minimum is 2 latent rows",
    "rank_mismatched_shapes": r"disagree on the input.*rank 0: decode of float32 \(1, 4, 2, 3, 3\); "
    r"rank 1: decode of float32 \(1, 4, 2, 3, 4\)",
    "rank_mismatched_dtype": r"disagree on the input.*float32.*float64",
    "wrong_latent_channels": r"decode expects 4 latent channels \(dim 1\), got 5",
    "wrong_pixel_channels": r"encode expects 3 pixel channels \(dim 1\), got 4",
    "pixel_height_not_multiple": r"pixel height 20 is not a multiple of the spatial factor 8.*16 or 24",
    "pixel_height_too_small": r"minimum is 2 latent rows \(16 pixel rows",
    "not_5d": r"expects a 5-D",
    "sharded_shard_not_multiple": r"ranks \[1\] have heights \[12\].*nearest: \[8, 16\]",
    "sharded_mode_mismatch": r"disagree on the input.*sharded_decode.*sharded_encode",
    "tiling": r"tiling are exclusive",
}


@pytest.mark.timeout(180)
def test_bad_inputs_raise_the_same_clear_error_on_every_rank():
    import re

    results = values(run_ranks(_bad_inputs_worker, 2, timeout=150))
    for name, pattern in EXPECTED_ERRORS.items():
        errs = [r[name] for r in results]
        assert all(e is not None for e in errs), f"{name}: some rank did not raise: {errs}"
        assert len({e for e in errs}) == 1, f"{name}: ranks raised different errors: {errs}"
        kind, msg = errs[0]
        assert re.search(pattern, msg), f"{name}: {kind}: {msg}"
        if name != "tiling":
            assert kind == "ShardingError"
    assert all(tuple(r["after"]) == (1, 3, 5, 24, 24) for r in results)


def _bf16_worker(rank, world, z):
    vae = make_model("wan2.1", torch.bfloat16)
    pv.enable_spatial_parallelism(vae)
    return vae.decode(z.to(torch.bfloat16)).sample.float()


@pytest.mark.timeout(180)
def test_bf16_no_worse_than_single_process_bf16():
    """docs/how-it-works.md, "Exactness bars": in bf16, the parallel model's error against float32 is no worse than the
    single-process bf16 model's own error against float32."""
    torch.manual_seed(3)
    z = torch.randn(1, 4, 2, 5, 4)
    ref32 = make_model("wan2.1", torch.float32).decode(z).sample
    single16 = make_model("wan2.1", torch.bfloat16).decode(z.bfloat16()).sample.float()
    par16 = values(run_ranks(_bf16_worker, 2, z))
    own = rel_err(single16, ref32)
    for out in par16:
        assert rel_err(out, ref32) <= own, (rel_err(out, ref32), own)
    assert torch.equal(par16[0], par16[1])


def _subgroup_of_one_worker(rank, world):
    groups = [dist.new_group([r]) for r in range(world)]
    vae = make_model("wan2.1", torch.float64)
    pv.enable_spatial_parallelism(vae, groups[rank])
    assert pv.spatial_size(vae) == 1
    assert type(vae.decoder.conv_out).__name__ == "WanCausalConv3d"
    z = torch.randn(1, 4, 2, 1, 2, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    return z, pv.decode_video(vae, z)


@pytest.mark.timeout(120)
def test_group_of_one_inside_a_world_is_the_plain_model():
    res = values(run_ranks(_subgroup_of_one_worker, 2))
    ref = make_model("wan2.1", torch.float64)
    for z, out in res:
        assert torch.equal(out, ref.decode(z).sample)


def test_layout_configs_carry_matching_latent_statistics():
    """Every layout and width has one latent mean/std per latent channel (pipelines normalize with them)."""
    import inspect

    from parallel_vae.jobs.models import wan_config

    defaults = inspect.signature(AutoencoderKLWan.__init__).parameters  # diffusers' own (Wan2.1, 16 channels)
    for layout in ("wan2.1", "wan2.2"):
        for z in (None, 4):
            cfg = wan_config(layout, z_dim=z)
            mean = cfg.get("latents_mean", defaults["latents_mean"].default)
            std = cfg.get("latents_std", defaults["latents_std"].default)
            assert len(mean) == len(std) == cfg["z_dim"], (layout, z)

"""torch.compile of a parallel VAE: the compiled decoder and encoder equal eager parallel (float32 bar), at 2 ranks,
for a video family (Wan) and an image family (AutoencoderKL); compiling before enabling is a clear error.

Dynamo traces the collectives (functional collectives) and the halo convs (no oneDNN call while tracing). The model
cases compile with ``aot_eager`` (Dynamo + AOTAutograd, the whole front end); one halo conv, forward and backward,
compiles with inductor (C++ codegen with gcc), which a whole model would take minutes to build here. All cases run
in one task of the shared 2-rank pool, each compiled once.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks, values

BAR = 1e-5  # the float32 bar


def _tiny(family: str):
    import diffusers

    torch.manual_seed(0)
    if family == "wan":  # two levels, one resnet each: every Wan layer kind (causal convs, resample, mid attention)
        vae = diffusers.AutoencoderKLWan(
            base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        )
    else:  # AutoencoderKL: GroupNorm, 3x3 convs, the strided downsample, nearest upsample, mid attention
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
            norm_num_groups=4, latent_channels=4,
        )
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.rand_like(p).sub_(0.5).mul_(0.2))  # norm scales off 1, biases off 0
    return vae.eval()


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _inputs(family: str):
    g = torch.Generator().manual_seed(1)
    if family == "wan":  # 5 frames -> 2 latent frames; 8 rows -> 4 latent rows (factor 2): 2/2 on 2 ranks
        return torch.randn(1, 4, 2, 4, 3, generator=g), torch.randn(1, 3, 5, 8, 6, generator=g)
    return torch.randn(1, 4, 5, 3, generator=g), torch.randn(1, 3, 10, 6, generator=g)  # 5 rows: 3/2 uneven


def _worker(rank, world):
    import torch._dynamo

    import parallel_vae as pv

    torch._dynamo.config.cache_size_limit = 64  # Wan's decoder runs once per latent frame, cache None first
    out = {}
    for family in ("wan", "kl"):
        z, x = _inputs(family)
        for part in ("decoder", "encoder"):
            torch._dynamo.reset()
            vae = pv.enable_spatial_parallelism(_tiny(family))
            run = (lambda: vae.decode(z).sample) if part == "decoder" else (lambda: vae.encode(x).latent_dist.mean)
            with torch.no_grad():
                eager = run()
                setattr(vae, part, torch.compile(getattr(vae, part), backend="aot_eager"))
                compiled = run()
            out[f"{family}-{part}"] = _rel(compiled, eager)
    # compiling before enabling: one clear error naming OptimizedModule
    vae = _tiny("kl")
    vae.decoder = torch.compile(vae.decoder)
    try:
        pv.enable_spatial_parallelism(vae)
        out["before"] = "enabled"
    except TypeError as e:
        out["before"] = str(e)
    out["inductor-conv"] = _inductor_conv(rank)
    return out


def _inductor_conv(rank):
    """One sharded 3x3 conv (stride 1 and the strided downsample) under inductor, forward and input gradient,
    against the same conv eager."""
    import torch._dynamo
    import torch.distributed as dist

    from parallel_vae.core import comm
    from parallel_vae.core.halo import HaloConv
    from parallel_vae.core.plan import SpatialState, sharded_class

    torch._dynamo.reset()
    group = dist.group.WORLD
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    conv.__class__ = sharded_class(HaloConv, torch.nn.Conv2d)
    conv._pv_state = SpatialState(group, 2, 1)
    full = torch.randn(1, 3, 6, 5)

    def f(x):
        return conv(comm.scatter_rows(x, group, dim=-2, sizes=(4, 2)))

    xe = full.clone().requires_grad_(True)
    ye = f(xe)
    ye.square().sum().backward()
    xc = full.clone().requires_grad_(True)
    yc = torch.compile(f, backend="inductor")(xc)
    yc.square().sum().backward()
    return max(_rel(yc, ye), _rel(xc.grad, xe.grad))


@pytest.fixture(scope="module")
def results():
    return values(run_ranks(_worker, 2, timeout=600))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", ["wan-decoder", "wan-encoder", "kl-decoder", "kl-encoder", "inductor-conv"])
def test_compiled_equals_eager(results, case):
    for rank_result in results:
        assert rank_result[case] <= BAR, (case, rank_result[case])


@pytest.mark.timeout(600)
def test_compile_before_enable_is_a_clear_error(results):
    for rank_result in results:
        assert "OptimizedModule" in rank_result["before"] and "Enable first" in rank_result["before"]

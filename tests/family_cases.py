"""Parity cases for every family: the same seeded model, inputs and loss, run unmodified (reference) and parallel.

The family-generic version of ``tests/cases.py`` (which keeps Wan's own cases). A case names a seeded layout
(``parallel_vae.jobs.models.SEEDED_LAYOUTS``); images are 4-D, videos 5-D. Every case of one world size runs in
one spawn of that many ranks, and each test asserts on its own case's results.

Parameter-gradient error: ``max |a - b|`` over a parameter divided by the largest reference gradient of the
*module* that owns it. A plain per-parameter ratio is meaningless where the exact gradient is identically zero:
softmax attention is invariant to adding one vector to every key, so ``to_k.bias`` has gradient 0 and both models
return rounding noise (1e-17) there. Against its module's gradient scale (``to_k.weight``) that noise is ~1e-15.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

import parallel_vae as pv
from parallel_vae.families import adapter_for
from parallel_vae.jobs.models import build_seeded_vae
from tests.cases import BARS, DTYPES, PARAM_GRAD_SLACK, rel_err
from tests.float64_internals import float64_internals_if


@dataclass(frozen=True)
class FCase:
    layout: str
    dtype: str = "float64"
    mode: str = "replicated"  # or "sharded"
    batch: int = 1
    frames: int = 5  # pixel frames (video families only)
    latent_h: int = 3
    latent_w: int = 2
    world: int = 2
    groups: Optional[tuple] = None  # e.g. ((2, 3),); None = the whole world
    grads: bool = True
    checkpointing: bool = False
    width: int = 8
    latent: int = 4
    overrides: Optional[tuple] = None  # ((config key, value), ...) over the seeded layout, e.g. fewer layers
    attention: str = "auto"  # enable_spatial_parallelism(attention=...): sequence attention (MiniMax-H3's ViT)


    @property
    def id(self) -> str:
        g = "" if self.groups is None else "-groups" + "|".join(",".join(map(str, rs)) for rs in self.groups)
        g += "-ckpt" if self.checkpointing else ""
        g += "".join("-" + "".join(w[0] for w in k.split("_")) for k, _ in self.overrides or ())  # initials
        g += "" if self.attention == "auto" else f"-{self.attention}"
        return (
            f"{self.layout}-{self.dtype}-{self.mode}-w{self.world}-b{self.batch}-t{self.frames}"
            f"-h{self.latent_h}x{self.latent_w}{g}"
        )

    def decode_kwargs(self, dtype: torch.dtype) -> dict:
        """Further arguments of ``decode`` / ``sharded_decode``, the same for the reference and every rank (none
        here; e.g. a timestep-conditioned decoder's ``temb``)."""
        return {}


def make_model(case: FCase, dtype: torch.dtype):
    """The case's seeded model; float64 models compute diffusers' float32-inside upsamples (Wan-style layouts) in
    float64 (tests/float64_internals.py)."""
    vae = build_seeded_vae(
        case.layout, width=case.width, latent=case.latent, seed=1234, dtype=dtype, perturb=0.05,
        overrides=dict(case.overrides or ()),
    )
    return float64_internals_if(vae, dtype)


def make_inputs(case: FCase, vae, dtype: torch.dtype, seed: int = 7):
    """An input (B, 3, [frames,] H, W) in [-1, 1] and per-pixel loss weights for its reconstruction."""
    adapter = adapter_for(vae)
    f = adapter.spatial_factor(vae)
    c = adapter.pixel_channels(vae)
    hw = (case.latent_h * f, case.latent_w * f)
    shape = (case.batch, c, case.frames) + hw if adapter.video else (case.batch, c) + hw
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(dtype), w.to(dtype)


def reference(case: FCase, dtype_name: Optional[str] = None) -> dict:
    """Unmodified diffusers: latents, reconstruction, input gradient, parameter gradients of sum(w * recon)."""
    torch.set_num_threads(1)
    dtype = DTYPES[dtype_name or case.dtype]
    vae = make_model(case, dtype)
    if case.checkpointing:
        pv.enable_gradient_checkpointing(vae)
    x, w = make_inputs(case, vae, dtype)
    x.requires_grad_(case.grads)
    with torch.set_grad_enabled(case.grads):
        z = adapter_for(vae).posterior_of(vae.encode(x)).mode()
        out = vae.decode(z, **case.decode_kwargs(dtype)).sample
    res = dict(z=z.detach(), out=out.detach())
    if case.grads:
        (out * w).sum().backward()
        res["x_grad"] = x.grad.detach()
        res["grads"] = {n: p.grad.detach().clone() for n, p in vae.named_parameters() if p.grad is not None}
    return res



@functools.lru_cache(maxsize=None)
def second_reference(case: FCase) -> dict:
    """The unmodified model again, in ``case``'s dtype, with oneDNN off (torch's other CPU kernels): a second,
    equally valid rounding of the same function (tests/cases.py, PARAM_GRAD_SLACK)."""
    with torch.backends.mkldnn.flags(enabled=False):
        return reference(case)


def bad_shape_calls(vae, world: int, frames: int) -> tuple[dict, tuple, tuple, int]:
    """The four shape mistakes every family must refuse with one clear error on every rank (too few latent rows, a
    pixel height off the spatial factor, wrong latent and pixel channels), for an enabled ``vae`` on ``world``
    ranks; with the leading dims ``(1, C[, frames])`` of pixels and latents and the spatial factor, for a test's
    own extra calls."""
    adapter = adapter_for(vae)
    f, c, zc = adapter.spatial_factor(vae), adapter.pixel_channels(vae), adapter.latent_channels(vae)
    lead = (1, c, frames) if adapter.video else (1, c)
    zlead = (1, zc, frames) if adapter.video else (1, zc)
    calls = {
        "too_few_latent_rows": lambda: vae.decode(torch.zeros(zlead + (world - 1, 2))),
        "pixel_height_not_multiple": lambda: vae.encode(torch.zeros(lead + (f * world + 1, f))),
        "wrong_latent_channels": lambda: vae.decode(torch.zeros((1, zc + 1) + zlead[2:] + (world, 2))),
        "wrong_pixel_channels": lambda: vae.encode(torch.zeros((1, c + 1) + lead[2:] + (f * world, f))),
    }
    return calls, lead, zlead, f


def call_outcomes(calls: dict) -> dict:
    """name -> None if ``calls[name]()`` returned, else (exception type name, message): what the bad-input tests
    compare across ranks (every rank must raise the same clear error)."""
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except Exception as e:  # noqa: BLE001 - the test inspects what was raised
            out[name] = (type(e).__name__, str(e))
    return out

def _groups(rank: int, case: FCase):
    if case.groups is None:
        return dist.group.WORLD
    made = [dist.new_group(list(rs)) for rs in case.groups]
    for rs, g in zip(case.groups, made):
        if rank in rs:
            return g
    return None


def row_probe(vae) -> torch.nn.Module:
    """The decoder layer whose output rows (dim -2 of its output, or of its first output) the tests count: the last
    conv, or the last block where the decoder ends in a channels-last Linear (Mochi's ``proj_out``)."""
    decoder = vae.decoder
    if hasattr(decoder, "conv_out"):
        return decoder.conv_out
    return decoder.block_out if hasattr(decoder, "block_out") else decoder  # MiniMax-H3's ViT: the decoder's pixels


def run_case(rank: int, case: FCase):
    """One case on this rank: on each group's rank 0 the gathered results with parameter gradients summed over the
    spatial group; on every member, the rows its decoder's last conv computed."""
    group = _groups(rank, case)
    if group is None:
        return None
    dtype = DTYPES[case.dtype]
    vae = make_model(case, dtype)
    if getattr(vae, "use_tiling", False):  # MiniMax-H3 ships with tiling on; at the cases' sizes it cuts no tile
        vae.disable_tiling()
    pv.enable_spatial_parallelism(vae, group, attention=case.attention)
    if case.checkpointing:
        pv.enable_gradient_checkpointing(vae)
    x, w = make_inputs(case, vae, dtype)
    x.requires_grad_(case.grads)
    seen_rows = []
    # the probe returns a tensor, or (tensor, conv cache) in CogVideoX
    hook = row_probe(vae).register_forward_hook(
        lambda m, args, out: seen_rows.append((out[0] if isinstance(out, tuple) else out).shape[-2])
    )
    with torch.set_grad_enabled(case.grads):
        if case.mode == "replicated":
            z = adapter_for(vae).posterior_of(vae.encode(x)).mode()
            out = vae.decode(z, **case.decode_kwargs(dtype)).sample
            loss = (out * w).sum()
        else:
            x_local = pv.shard_video(vae, x)
            z_local = pv.sharded_encode(vae, x_local).mode()
            out_local = pv.sharded_decode(vae, z_local, **case.decode_kwargs(dtype))
            loss = (out_local * pv.shard_video(vae, w)).sum()
            z, out = pv.gather_shards(vae, z_local.detach()), pv.gather_shards(vae, out_local.detach())
    hook.remove()
    res = dict(z=z.detach(), out=out.detach(), conv_out_rows=sorted(set(seen_rows)))
    if case.grads:
        loss.backward()
        res["x_grad"] = x.grad.detach()
        grads = {}
        for n, p in vae.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.detach().clone()
            dist.all_reduce(g, group=group)
            grads[n] = g
        res["grads"] = grads
    res["group_rank"] = dist.get_rank(group)
    if res["group_rank"] != 0:
        for k in ("z", "out", "x_grad", "grads"):
            res.pop(k, None)
    return res


def run_cases(rank: int, world: int, cases: list):
    torch.set_num_threads(1)
    return {case.id: run_case(rank, case) for case in cases}


def param_grad_errors(grads: dict, ref: dict) -> dict:
    """Per parameter: max |a - b| / (largest reference gradient of the module owning it); see the module doc."""
    scale: dict[str, float] = {}
    for n, g in ref.items():
        owner = n.rsplit(".", 1)[0]
        scale[owner] = max(scale.get(owner, 0.0), g.abs().max().item())
    errs = {}
    for n, g in ref.items():
        if n not in grads:
            errs[n] = float("inf")
            continue
        denom = scale[n.rsplit(".", 1)[0]] or 1.0
        errs[n] = (grads[n].double() - g.double()).abs().max().item() / denom
    return errs


def worst(errs: dict) -> tuple[float, str]:
    name = max(errs, key=errs.get)
    return errs[name], name


def check(case: FCase, res: dict, ref: dict, truth: Optional[dict] = None) -> dict:
    """the bars of docs/how-it-works.md against the unmodified model; float32 parameter gradients against the float64
    ``truth`` (no farther than PARAM_GRAD_SLACK x the unmodified float32 model's own distance, see tests/cases.py)."""
    bar = BARS[case.dtype]
    errs = {"z": rel_err(res["z"], ref["z"]), "out": rel_err(res["out"], ref["out"])}
    if case.grads and case.dtype == "float64":
        errs["x_grad"] = rel_err(res["x_grad"], ref["x_grad"])
    for k, e in errs.items():
        if e > bar and truth is not None and case.dtype != "float64":
            # Two float32 roundings of one function can differ by more than 1e-5 where the unmodified float32
            # model is itself ~1e-5 from the float64 truth (Mochi: 9.74e-6). Then the parallel model must be no
            # farther from the truth than the unmodified one is (no slack): as accurate, in another rounding.
            own, ours = rel_err(ref[k], truth[k]), rel_err(res[k], truth[k])
            assert ours <= max(bar, own), f"{case.id}: {k} {ours:.3e} from the float64 truth > unmodified {own:.3e}"
            continue
        assert e <= bar, f"{case.id}: {k} rel err {e:.3e} > {bar:.0e}"
    if case.grads and case.dtype != "float64":
        # float32 input gradients through GroupNorm + attention: the unmodified float32 model is itself 1.1e-5 from
        # the float64 truth (sd layout, 3 latent rows), so they are held to the truth, as parameter gradients are.
        own = rel_err(ref["x_grad"], truth["x_grad"])
        errs["x_grad_vs_truth"] = rel_err(res["x_grad"], truth["x_grad"])
        limit = max(bar, PARAM_GRAD_SLACK * own)
        assert errs["x_grad_vs_truth"] <= limit, (
            f"{case.id}: input gradient {errs['x_grad_vs_truth']:.3e} from the float64 truth; the unmodified model "
            f"is {own:.3e} from it; limit {limit:.3e}"
        )
    if not case.grads:
        return errs
    if case.dtype == "float64":
        errs["param_grad"], name = worst(param_grad_errors(res["grads"], ref["grads"]))
        assert errs["param_grad"] <= bar, f"{case.id}: parameter {name} rel err {errs['param_grad']:.3e} > {bar:.0e}"
    else:
        own, _ = worst(param_grad_errors(ref["grads"], truth["grads"]))
        errs["param_grad_vs_truth"], name = worst(param_grad_errors(res["grads"], truth["grads"]))
        limit = max(bar, PARAM_GRAD_SLACK * own)
        if errs["param_grad_vs_truth"] > limit:
            # One float32 run's distance from the truth is one draw of its rounding: a second valid run of the
            # unmodified model (oneDNN off, other kernels) gives the second draw; see tests/cases.py.
            own = max(own, worst(param_grad_errors(second_reference(case)["grads"], truth["grads"]))[0])
            limit = max(bar, PARAM_GRAD_SLACK * own)
        assert errs["param_grad_vs_truth"] <= limit, (
            f"{case.id}: parameter {name} is {errs['param_grad_vs_truth']:.3e} from the float64 truth; the unmodified "
            f"model is {own:.3e} from it; limit {limit:.3e}"
        )
    return errs


def expected_conv_out_rows(case: FCase, rank: int, factor_before_unpatchify: int) -> int:
    """Rows the decoder's last conv computes on ``rank`` (its own rows only)."""
    return pv.row_split(case.latent_h, case.world)[rank] * factor_before_unpatchify


# --------------------------------------------------------------------------------------------------------------
# the parity test of a list of cases (tests/test_families.py, tests/test_wave3_conv.py)
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def world_results(cases: tuple, world: int) -> dict:
    """case id -> every rank's result, for the cases of ``cases`` at ``world``: all of them in one task of that
    world's worker pool (tests/dist_harness.py)."""
    from tests.dist_harness import run_ranks, values

    mine = [c for c in cases if c.world == world]
    per_rank = values(run_ranks(run_cases, world, mine, timeout=600))
    return {c.id: [r[c.id] for r in per_rank] for c in mine}


@functools.lru_cache(maxsize=None)
def cached_reference(case: FCase, dtype_name: str) -> dict:
    return reference(case, dtype_name)


def check_parity(case: FCase, cases: tuple, record_property) -> None:
    """``case`` (one of ``cases``) against the unmodified model, on every group's rank 0; without subgroups, every
    rank's decoder computed its own rows only (before any unpatchify), never the whole height."""
    results = world_results(cases, case.world)[case.id]
    roots = [r for r in results if r is not None and r["group_rank"] == 0]
    assert len(roots) == (1 if case.groups is None else len(case.groups))
    truth = cached_reference(case, "float64") if case.dtype != "float64" else None
    for res in roots:
        errs = check(case, res, cached_reference(case, case.dtype), truth)
        record_property("max_rel_err", errs)
        print(case.id, {k: f"{v:.2e}" for k, v in errs.items()})
    if case.groups is None:
        sizes = pv.row_split(case.latent_h, case.world)
        rows = [r["conv_out_rows"] for r in results]
        per_latent_row = rows[0][0] // sizes[0]
        assert rows == [[s * per_latent_row] for s in sizes], rows

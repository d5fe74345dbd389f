"""MiniMax-H3 (``AutoencoderKLMiniMaxH3``, issue 20) against the unmodified diffusers model, and its sequence-parallel
attention (gathered and ring) against whole-sequence attention.

* Attention alone, float64: this rank's queries against every rank's keys and values, gathered
  (``start_kv_gather``) or passed around a ring (``ring_sdpa``), against ``F.scaled_dot_product_attention`` of the
  whole sequence: forward, ``gradcheck`` of the scatter -> attention -> gather composite (torch's fast mode), uneven shards, worlds 2 and 3 and the offset subgroup [1, 2] of 3 (the ring's
  point-to-point peers are global ranks). The ring moves only ring traffic (no all-gather).
* The model, float64 (bar 1e-10): latents, reconstruction, input gradients and parameter gradients summed over the
  group, every parameter perturbed; worlds 2 and 3 with uneven splits (4 latent rows on 3 ranks: 2/1/1), batch 2,
  both modes and both attention modes, a subgroup, activation checkpointing, float32; each rank's decoder produces
  only its own pixel rows. Encode and decode run in one graph.
* Bad input and the module table: one clear error on every rank; a module outside the table is refused by name.

The test model is the released layout at width 8 (2 heads of 64 in the decoder) with 1 resnet per level, 2 decoder
blocks and 5-frame encoder clips with ``token_drop`` 1 (6 pixel frames <-> 3 latent frames round-trip), so that a
case costs about a second; every layer kind of the released model is in it.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import parallel_vae as pv
from parallel_vae.families import adapter_for
from tests.dist_harness import run_ranks, values
from tests.family_cases import FCase, call_outcomes, check_parity, make_model

MM = "minimax_h3"
OV = (("layers_per_block", 1), ("clip_length", 5), ("token_drop", 1), ("decoder_num_layers", 2))


def _case(mode, attention, world, latent_h, **kw) -> FCase:
    return FCase(MM, kw.pop("dtype", "float64"), mode, frames=6, latent_h=latent_h, world=world, attention=attention,
                 overrides=OV, **kw)


CASES = [
    _case("replicated", "ring", 2, 3, batch=2),
    _case("sharded", "gather", 2, 3, checkpointing=True),
    _case("sharded", "ring", 3, 4),  # 2/1/1
    _case("replicated", "gather", 3, 4),
    _case("replicated", "ring", 3, 3, groups=((1, 2),)),  # 2/1 on ranks [1, 2]
    _case("sharded", "ring", 3, 3, dtype="float32"),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_minimax_h3_parity(case: FCase, record_property):
    check_parity(case, tuple(CASES), record_property)


# ---------------------------------------------------------------------------------------------------------------
# the attention alone: gathered and ring against whole-sequence SDPA
# ---------------------------------------------------------------------------------------------------------------

# token counts per group rank: uneven everywhere
ATTN_SIZES = {2: [(5, 2)], 3: [(3, 1, 4), (3, 2)]}  # at 3: the whole world, then the subgroup [1, 2]


def _attention_worker(rank: int, world: int):
    from parallel_vae.core import comm
    from parallel_vae.core.attention import start_kv_gather
    from parallel_vae.core.ring_attention import ring_sdpa

    torch.set_num_threads(1)
    out = {}
    for sizes in ATTN_SIZES[world]:
        members = list(range(world)) if len(sizes) == world else list(range(world - len(sizes), world))
        group = dist.new_group(members)  # every rank takes part in creating every group
        if rank not in members:
            continue
        g = torch.Generator().manual_seed(11)
        n, heads, d = sum(sizes), 2, 4
        q, k, v = (torch.randn(1, heads, n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v)

        def attend(mode):
            def f(q, k, v):
                ql, kl, vl = (comm.scatter_rows(t, group, dim=-2, sizes=sizes) for t in (q, k, v))
                if mode == "gather":
                    o = start_kv_gather(kl, vl, group, sizes).attend(ql)
                else:
                    o = ring_sdpa(ql, kl, vl, group, sizes)
                return comm.gather_rows(o, group, dim=-2, sizes=sizes)

            return f

        for mode in ("gather", "ring"):
            f = attend(mode)
            fwd = ((f(q, k, v) - ref).abs().max() / ref.abs().max()).item()
            # the attention's own traffic, forward and backward
            ql, kl, vl = (comm.scatter_rows(t.detach(), group, dim=-2, sizes=sizes).requires_grad_() for t in (q, k, v))
            with comm.count_traffic() as counter:
                o = start_kv_gather(kl, vl, group, sizes).attend(ql) if mode == "gather" else ring_sdpa(ql, kl, vl, group, sizes)
                o.backward(torch.ones_like(o))
            kinds = set(counter.as_dict()["by_kind"])
            # torch's fast mode: u^T J v for random u, v against the numerical Jacobian; a gradient a rank fails to
            # send or receive changes it for almost every u, v (tests/test_core.py)
            ok = torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True)
            out[f"{mode}-{sizes}"] = (fwd, ok, sorted(kinds))
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
def test_sequence_attention_gathered_and_ring(world):
    per_rank = values(run_ranks(_attention_worker, world))
    checked = 0
    for res in per_rank:
        for name, (fwd, ok, kinds) in res.items():
            assert fwd <= 1e-13, f"{name}: forward rel err {fwd:.3e}"
            assert ok, f"{name}: gradcheck failed"
            if name.startswith("ring"):  # the whole sequence's keys/values are never gathered
                assert "ring" in kinds and "all_gather" not in kinds and "reduce_scatter" not in kinds, (name, kinds)
            else:
                assert "ring" not in kinds, (name, kinds)
            checked += 1
    assert checked == (4 if world == 2 else 3 * 2 + 2 * 2), checked


def test_ring_is_chosen_by_size():
    from parallel_vae.core.attention import RING_AUTO_BYTES, resolve_attention_mode

    assert resolve_attention_mode("auto", RING_AUTO_BYTES) == "gather"
    assert resolve_attention_mode("auto", RING_AUTO_BYTES + 1) == "ring"
    assert resolve_attention_mode("ring", 1) == "ring" and resolve_attention_mode("gather", 1 << 40) == "gather"
    with pytest.raises(ValueError, match="attention mode"):
        resolve_attention_mode("flash", 1)


# ---------------------------------------------------------------------------------------------------------------
# bad input and the module table
# ---------------------------------------------------------------------------------------------------------------


def _bad_input_worker(rank, world):
    torch.set_num_threads(1)
    case = _case("replicated", "auto", world, world, dtype="float32")
    vae = make_model(case, torch.float32)
    out = call_outcomes({"bad_attention_keyword": lambda: pv.enable_spatial_parallelism(vae, attention="flash")})
    pv.enable_spatial_parallelism(vae)
    adapter = adapter_for(vae)
    f, zc = adapter.spatial_factor(vae), adapter.latent_channels(vae)
    # the released default: tiling on
    out.update(call_outcomes({"tiling_on": lambda: vae.decode(torch.zeros(1, zc, 3, world, 2))}))
    vae.disable_tiling()
    out.update(call_outcomes({
        "one_latent_frame": lambda: vae.decode(torch.zeros(1, zc, 1, world, 2)),
        "too_few_latent_rows": lambda: vae.decode(torch.zeros(1, zc, 3, world - 1, 2)),
        "pixel_height_not_multiple": lambda: vae.encode(torch.zeros(1, 3, 6, f * world + 1, 2 * f)),
        "wrong_latent_channels": lambda: vae.decode(torch.zeros(1, zc + 1, 3, world, 2)),
    }))
    return out


@pytest.mark.timeout(300)
def test_minimax_h3_bad_input_one_clear_error_on_every_rank():
    per_rank = values(run_ranks(_bad_input_worker, 2, timeout=240))
    for name in per_rank[0]:
        errors = [r[name] for r in per_rank]
        assert errors[0] is not None, f"{name}: no error"
        assert all(e == errors[0] for e in errors), f"{name}: ranks disagree: {errors}"
    assert per_rank[0]["bad_attention_keyword"][0] == "ValueError"
    assert "disable_tiling" in per_rank[0]["tiling_on"][1]
    assert "at least 2 latent frames" in per_rank[0]["one_latent_frame"][1], per_rank[0]["one_latent_frame"]


def test_minimax_h3_refuses_modules_outside_its_table():
    from diffusers.models.autoencoders.autoencoder_kl_minimax_h3 import MiniMaxH3VideoAttnProcessor

    vae = make_model(_case("replicated", "auto", 2, 2, dtype="float32"), torch.float32)
    plan = adapter_for(vae).plan(vae)  # the released layout classifies
    modules = dict(vae.named_modules())
    treated = {type(modules[t.name]).__name__ for t in plan}
    assert treated == {
        "MiniMaxH3VideoCausalConv3d", "MiniMaxH3VideoDownsample3d", "MiniMaxH3VideoGroupNorm",
        "MiniMaxH3VideoViTDecoder3d", "MiniMaxH3VideoAttention",
    }, treated
    vae.encoder.conv_in.spatial_padding_mode = "circular"
    with pytest.raises(NotImplementedError, match=r"encoder\.conv_in"):
        adapter_for(vae).plan(vae)
    vae.encoder.conv_in.spatial_padding_mode = "reflect"

    class OtherProcessor(MiniMaxH3VideoAttnProcessor):
        pass

    vae.decoder.transformer_blocks[0].attn.set_processor(OtherProcessor())
    with pytest.raises(NotImplementedError, match=r"transformer_blocks\.0\.attn"):
        adapter_for(vae).plan(vae)


def test_minimax_h3_latent_normalization():
    from parallel_vae.jobs.loading import denormalize_latents, normalize_latents

    vae = make_model(_case("replicated", "auto", 2, 2, dtype="float32"), torch.float32)
    vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 2.0, 1.5, 1.0])
    z = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(denormalize_latents(z, vae), z * std + mean)  # the pipeline's decode-side rule
    torch.testing.assert_close(normalize_latents(denormalize_latents(z, vae), vae), z)

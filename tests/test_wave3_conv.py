"""The third wave's convolution / GroupNorm families against the unmodified diffusers model (issue 20):
Qwen-Image 2.1 (``AutoencoderKLQwenImage21``).

Float64 parity (bar 1e-10) of latents, reconstruction, input gradients and parameter gradients summed over the
group, with every parameter perturbed (norm scales != 1, biases != 0): worlds 2 and 3 with an uneven split (7
latent rows on 3 ranks: 3/2/2), batch 2, both modes, a subgroup (ranks [1, 2] of 3), activation checkpointing,
float32; each rank's decoder computes only its own rows. Bad input gives one clear error, the same on every rank;
a module outside the table is refused by name.

The machinery is ``tests/family_cases.py``'s; every case of one world size runs in one task of that world's worker
pool (tests/dist_harness.py).
"""

from __future__ import annotations


import pytest
import torch

import parallel_vae as pv
from parallel_vae.families import adapter_for
from tests.dist_harness import run_ranks, values
from tests.family_cases import FCase, bad_shape_calls, call_outcomes, check_parity, make_model

Q21 = "qwenimage21"
CASES = [
    # Qwen-Image 2.1: images are 1-frame videos (B, 4, 1, H, W); 16x spatial, so 3 latent rows are 48 pixel rows
    FCase(Q21, "float64", "replicated", latent_h=3, world=2, frames=1, batch=2),
    FCase(Q21, "float64", "sharded", latent_h=4, world=2, frames=1, checkpointing=True),
    FCase(Q21, "float64", "sharded", latent_h=7, world=3, frames=1),  # 3/2/2
    FCase(Q21, "float32", "sharded", latent_h=3, world=3, frames=1),
    FCase(Q21, "float64", "replicated", latent_h=3, world=3, frames=1, groups=((1, 2),)),  # 2/1 on ranks [1, 2]
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_wave3_conv_parity(case: FCase, record_property):
    check_parity(case, tuple(CASES), record_property)


# ---------------------------------------------------------------------------------------------------------------
# bad input: one clear error, the same on every rank
# ---------------------------------------------------------------------------------------------------------------


def _frames_calls(vae, world, lead, zlead, f) -> dict:
    """Qwen-Image 2.1 takes exactly one frame each way."""
    c, zc = lead[1], zlead[1]
    return {
        "two_latent_frames": lambda: vae.decode(torch.zeros(1, zc, 2, world, 2)),
        "five_pixel_frames": lambda: vae.encode(torch.zeros(1, c, 5, f * world, f)),
    }


# layout -> (frames of a valid input, further bad calls, their expected error type)
BAD_INPUT = {Q21: (1, _frames_calls, "ShardingError")}


def _bad_input_worker(rank, world, layout):
    torch.set_num_threads(1)
    case = FCase(layout, "float32", world=world)
    vae = make_model(case, torch.float32)
    pv.enable_spatial_parallelism(vae)
    frames, extra, _ = BAD_INPUT[layout]
    calls, lead, zlead, f = bad_shape_calls(vae, world, frames)
    calls.update(extra(vae, world, lead, zlead, f))
    return call_outcomes(calls)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", list(BAD_INPUT))
def test_wave3_bad_input_one_clear_error_on_every_rank(layout):
    per_rank = values(run_ranks(_bad_input_worker, 2, layout, timeout=240))
    for name in per_rank[0]:
        errors = [r[name] for r in per_rank]
        assert errors[0] is not None, f"{layout} {name}: no error"
        assert all(e == errors[0] for e in errors), f"{layout} {name}: ranks disagree: {errors}"
        assert errors[0][0] == BAD_INPUT[layout][2] or errors[0][0] == "ShardingError", errors[0]
    if layout == Q21:
        assert "exactly one latent frame" in per_rank[0]["two_latent_frames"][1]


# ---------------------------------------------------------------------------------------------------------------
# the module tables: every module classified, one outside the table refused by name
# ---------------------------------------------------------------------------------------------------------------


def test_qwenimage21_refuses_a_conv_outside_its_table():
    vae = make_model(FCase(Q21, "float32"), torch.float32)
    adapter_for(vae).plan(vae)  # the released layout classifies
    vae.decoder.conv_in._padding = (1, 1, 2, 0)  # a row padding the table does not know
    with pytest.raises(NotImplementedError, match=r"decoder\.conv_in"):
        adapter_for(vae).plan(vae)

"""The third wave's HunyuanImage and Kandinsky-5 families against the unmodified diffusers model (issue 20):
HunyuanImage-2.1 (``AutoencoderKLHunyuanImage``).

Float64 parity (bar 1e-10) of latents, reconstruction, input gradients and parameter gradients summed over the
group, with every parameter perturbed (norm scales != 1, biases != 0): worlds 2 and 3 with an uneven split (4 or 7
latent rows on 3 ranks), batch 2, both modes, a subgroup (ranks [1, 2] of 3), float32; each rank's decoder computes
only its own rows. Bad input gives one clear error, the same on every rank; a module outside the table is refused
by name.

The machinery is ``tests/family_cases.py``'s; every case of one world size runs in one task of that world's worker
pool (tests/dist_harness.py). Widths: these classes fix their GroupNorms at 32 groups, so the seeded width is 32
(``jobs.models.GROUPS_32_CLASSES``); one resnet per level keeps every layer kind at a third of the cost.
"""

from __future__ import annotations

import pytest
import torch

import parallel_vae as pv
from parallel_vae.families import adapter_for
from tests.dist_harness import run_ranks, values
from tests.family_cases import FCase, call_outcomes, check_parity, make_model

HI = "hunyuanimage"
_HI_SMALL = (("layers_per_block", 1),)
CASES = [
    # HunyuanImage-2.1: 4-D images, 32x spatial, so 3 latent rows are 96 pixel rows
    FCase(HI, "float64", "replicated", latent_h=3, world=2, batch=2, width=32, overrides=_HI_SMALL),
    FCase(HI, "float64", "sharded", latent_h=4, world=3, width=32, overrides=_HI_SMALL),  # 2/1/1
    FCase(HI, "float32", "sharded", latent_h=3, world=2, width=32, overrides=_HI_SMALL),
    FCase(HI, "float64", "replicated", latent_h=3, world=3, width=32, groups=((1, 2),), overrides=_HI_SMALL),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_wave3_families_parity(case: FCase, record_property):
    check_parity(case, tuple(CASES), record_property)

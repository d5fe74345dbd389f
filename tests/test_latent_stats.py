"""recipes/latent_stats.py and parallel_vae.jobs.training.latent_statistics: a model's own latent normalization."""

from __future__ import annotations

import json

import torch
from diffusers import AutoencoderKLWan

from parallel_vae.jobs.data import make_dataset
from parallel_vae.jobs.models import build_wan_vae
from parallel_vae.jobs.training import latent_statistics
from tests.launch import check_ok, python_run

RECIPE = "recipes/latent_stats.py"


def test_latent_statistics_match_a_direct_computation():
    torch.set_num_threads(1)
    vae = build_wan_vae("wan2.1", base_dim=8, z_dim=4, seed=2, dtype=torch.float64, perturb=0.05)
    clips = [torch.rand(3, 5, 16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(3)]
    mean, std = latent_statistics(vae, clips)
    with torch.no_grad():
        z = torch.cat([vae.encode(c[None]).latent_dist.mean for c in clips], dim=2)  # (1, C, 3 * T', H', W')
    flat = z[0].reshape(4, -1)
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), flat.mean(1), rtol=0, atol=1e-12)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), flat.std(1, correction=0), rtol=0, atol=1e-12)
    assert len(set(round(s, 6) for s in std)) == 4  # per channel, not one pooled number


def test_recipe_writes_the_statistics_into_the_config(tmp_path):
    model = build_wan_vae("wan2.1", base_dim=8, z_dim=4, seed=1, perturb=0.05)
    folder = tmp_path / "vae"
    model.save_pretrained(folder)
    args = ["--pretrained", str(folder), "--data", "synthetic:3", "--frames", "5", "--height", "32", "--width", "32", "--write"]
    proc = python_run(RECIPE, args, tmp_path)
    check_ok(proc)
    printed = json.loads(proc.stdout.splitlines()[0])
    data = make_dataset("synthetic:3", frames=5, height=32, width=32, spatial_factor=8, seed=0)
    torch.set_num_threads(1)
    mean, std = latent_statistics(model, (data[i] for i in range(3)))
    assert printed["latents_mean"] == [round(v, 4) for v in mean] and printed["latents_std"] == [round(v, 4) for v in std]
    reloaded = AutoencoderKLWan.from_pretrained(folder)
    assert list(reloaded.config.latents_mean) == printed["latents_mean"]
    assert list(reloaded.config.latents_std) == printed["latents_std"]
    for k, v in model.state_dict().items():  # weights untouched
        assert torch.equal(v, reloaded.state_dict()[k]), k


def test_recipe_without_a_config_fails_cleanly(tmp_path):
    proc = python_run(RECIPE, ["--pretrained", str(tmp_path)], tmp_path)
    assert proc.returncode == 2 and "no config.json there" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

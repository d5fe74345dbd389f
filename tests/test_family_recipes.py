"""The recipes with families beyond Wan: loading by the config's ``_class_name`` (folders and single files the tests
write themselves), each family's latent normalization, and 2-process runs of recipes/decode.py (an image VAE and
a video VAE) and recipes/finetune.py (an image VAE), compared with the unmodified model where it applies.
"""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from safetensors.torch import load_file, save_file

from parallel_vae.errors import InputError
from parallel_vae.families import adapter_for
from parallel_vae.jobs.decode_job import DEMO_IMAGE_FRAMES, DEMO_SHAPE
from parallel_vae.jobs.loading import denormalize_latents, load_vae, normalize_latents, parse_seeded
from parallel_vae.jobs.models import MOCHI_WIDTH_UNIT, SEEDED_LAYOUTS, build_seeded_vae
from parallel_vae.jobs.video import demo_video
from tests.launch import accelerate_launch, check_ok

F32_BAR = 1e-5


def _seeded(layout: str, **kw):
    width = MOCHI_WIDTH_UNIT if layout == "mochi" else 8  # Mochi's group count and head width are fixed at 32
    return build_seeded_vae(layout, width=width, latent=kw.pop("latent", 4), seed=5, perturb=0.05, **kw)


@pytest.mark.parametrize("layout", sorted(SEEDED_LAYOUTS))
def test_every_seeded_layout_builds_and_has_an_adapter(layout):
    vae = _seeded(layout)
    adapter = adapter_for(vae)
    assert adapter.plan(vae), layout  # every module classified, and something to shard
    assert adapter.spatial_factor(vae) in (8, 16, 32)


def test_pretrained_folder_loads_the_class_named_in_its_config(tmp_path):
    for layout, cls_name in (("sd", "AutoencoderKL"), ("flux2", "AutoencoderKLFlux2"), ("qwenimage", "AutoencoderKLQwenImage")):
        vae = _seeded(layout)
        vae.save_pretrained(tmp_path / layout / "vae")  # a pipeline folder: the VAE in vae/
        loaded, source = load_vae(pretrained=str(tmp_path / layout))
        assert type(loaded).__name__ == cls_name and source["subfolder"] == "vae"
        for k, v in vae.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), (layout, k)


def test_pretrained_folder_of_an_unsupported_class_is_one_clear_error(tmp_path):
    vae = _seeded("sd")
    vae.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["_class_name"] = "AutoencoderTiny"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="_class_name is 'AutoencoderTiny'; parallel_vae supports .*AutoencoderKL"):
        load_vae(pretrained=str(tmp_path / "m"))


def test_single_file_with_config_for_other_families(tmp_path):
    vae = _seeded("sd")
    vae.save_pretrained(tmp_path / "cfg")
    save_file(vae.state_dict(), str(tmp_path / "sd.safetensors"))
    loaded, source = load_vae(single_file=str(tmp_path / "sd.safetensors"), config=str(tmp_path / "cfg"))
    assert isinstance(loaded, AutoencoderKL) and source["kind"] == "single_file"
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # a weight missing from the file: an error naming it, never a half-random model
    sd = load_file(str(tmp_path / "sd.safetensors"))
    sd.pop("decoder.conv_out.weight")
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(InputError, match="1 weights missing .*decoder.conv_out.weight"):
        load_vae(single_file=str(tmp_path / "broken.safetensors"), config=str(tmp_path / "cfg"))


def test_latent_normalization_per_family():
    g = torch.Generator().manual_seed(0)
    # AutoencoderKL (SD3/Flux.1): pipelines decode latents / scaling_factor + shift_factor
    vae = _seeded("sd3")
    z = torch.randn(2, 4, 3, 5, generator=g)
    cfg = vae.config
    torch.testing.assert_close(denormalize_latents(z, vae), z / cfg.scaling_factor + cfg.shift_factor)
    torch.testing.assert_close(normalize_latents(denormalize_latents(z, vae), vae), z)
    # Flux.2: pipeline latents are 2x2-patchified and BatchNorm-normalized with the VAE's running statistics
    vae = _seeded("flux2", latent=4)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(16, generator=g))
        vae.bn.running_var.copy_(torch.rand(16, generator=g) + 0.5)
    z = torch.randn(2, 4, 6, 8, generator=g)
    packed = normalize_latents(z, vae)
    assert packed.shape == (2, 16, 3, 4)
    # channel c*4 + i*2 + j of the packed latent is pixel (2y + i, 2x + j) of channel c (the pipeline's order)
    c, i, j, y, x = 1, 1, 0, 2, 3
    k = c * 4 + i * 2 + j
    expect = (z[0, c, 2 * y + i, 2 * x + j] - vae.bn.running_mean[k]) / torch.sqrt(vae.bn.running_var[k] + vae.bn.eps)
    torch.testing.assert_close(packed[0, k, y, x], expect)
    torch.testing.assert_close(denormalize_latents(packed, vae), z)
    assert isinstance(vae, AutoencoderKLFlux2)
    # Mochi: MochiPipeline decodes latents * latents_std / scaling_factor + latents_mean (its real 12-channel stats)
    vae = _seeded("mochi", latent=12)
    vae.register_to_config(scaling_factor=0.5)  # the released 1.0 would hide a misplaced scale
    z = torch.randn(1, 12, 2, 3, 4, generator=g)
    mean = torch.tensor(vae.config.latents_mean).view(1, 12, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 12, 1, 1, 1)
    torch.testing.assert_close(denormalize_latents(z, vae), z * std / 0.5 + mean)
    torch.testing.assert_close(normalize_latents(denormalize_latents(z, vae), vae), z)


def test_parse_seeded():
    assert parse_seeded("sd:32:4") == {"layout": "sd", "width": 32, "latent": 4}
    from parallel_vae.jobs.cli import SEEDED_DEFAULT_WIDTH

    assert parse_seeded("hunyuanvideo") == {"layout": "hunyuanvideo", "width": SEEDED_DEFAULT_WIDTH}  # small default
    for bad in ("nope:8", "sd:x", "sd:8:4:2", ":8", "mochi:16"):
        with pytest.raises(InputError, match="--seeded"):
            parse_seeded(bad)


@pytest.mark.timeout(300)
def test_decode_recipe_image_family_round_trip_two_processes(tmp_path):
    """sd at 2 processes: the demo's 4 frames as a batch of images, sharded; PNGs, a contact sheet, and the decoded
    tensor equal to the unmodified model's decode(encode(x).mode()) within the float32 bar."""
    proc = accelerate_launch(
        "recipes/decode.py",
        ["--seeded", "sd:16:4", "--parallel", "on", "--save_tensor", "--no_progress", "--output_dir", str(tmp_path / "o")],
        tmp_path,
    )
    check_ok(proc)
    out = tmp_path / "o"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == ["image.png", "image_1.png", "image_2.png", "image_3.png"]
    assert metrics["contact_sheet"] == "contact_sheet.png" and metrics["videos"] == []
    assert metrics["group_layout"]["latent_rows_per_rank"] == [4, 4]
    assert iio.imread(out / "image.png").shape == (64, 96, 3)
    assert iio.imread(out / "contact_sheet.png").shape == (2 * 64 + 2, 4 * 96 + 3 * 2, 3)  # inputs above outputs
    decoded = load_file(str(out / "decoded.safetensors"))["video"]
    vae = build_seeded_vae("sd", width=16, latent=4, seed=0)
    clip = demo_video(**DEMO_SHAPE)
    x = torch.stack([clip[:, t] for t in DEMO_IMAGE_FRAMES])
    torch.set_num_threads(1)
    with torch.no_grad():
        ref = vae.decode(vae.encode(x).latent_dist.mode()).sample
    assert ((decoded - ref).abs().max() / ref.abs().max()).item() <= F32_BAR


@pytest.mark.timeout(300)
def test_decode_recipe_video_family_from_pretrained_folder_two_processes(tmp_path):
    """Qwen-Image from a save_pretrained folder (no family flag), normalized latents with 3 latent rows on 2 ranks
    (2/1): the decoded tensor equals the unmodified model's."""
    vae = build_seeded_vae("qwenimage", width=8, latent=4, seed=3, perturb=0.05)
    vae.save_pretrained(tmp_path / "qwen")
    z = torch.randn(1, 4, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    torch.save(z, tmp_path / "z.pt")
    proc = accelerate_launch(
        "recipes/decode.py",
        ["--pretrained", str(tmp_path / "qwen"), "--latents", str(tmp_path / "z.pt"), "--latents_normalized",
         "--parallel", "on", "--save_tensor", "--no_progress", "--output_dir", str(tmp_path / "o")],
        tmp_path,
    )  # fmt: skip
    check_ok(proc)
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["model"]["class"] == "AutoencoderKLQwenImage" and metrics["videos"] == ["video.mp4"]
    assert metrics["group_layout"]["latent_rows_per_rank"] == [2, 1]
    decoded = load_file(str(tmp_path / "o" / "decoded.safetensors"))["video"]
    torch.set_num_threads(1)
    with torch.no_grad():
        ref = vae.decode(denormalize_latents(z, vae)).sample
    assert decoded.shape == ref.shape == (1, 3, 5, 24, 32)
    assert ((decoded - ref).abs().max() / ref.abs().max()).item() <= F32_BAR


@pytest.mark.timeout(300)
def test_finetune_recipe_image_family_two_processes(tmp_path):
    """sd fine-tunes on single frames, sharded over 2 processes; the export loads in plain diffusers."""
    out = tmp_path / "ft"
    proc = accelerate_launch(
        "recipes/finetune.py",
        ["--seeded", "sd:8:4", "--frames", "1", "--height", "32", "--width", "32", "--max_steps", "2",
         "--data", "synthetic:8", "--val_data", "synthetic:2", "--output_dir", str(out)],
        tmp_path,
    )  # fmt: skip
    check_ok(proc)
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["layout"]["sp_degree"] == 2 and len(summary["history"]) == 2
    assert summary["validation"][-1]["clips"] == 2 and (out / "samples" / "step_000002.png").is_file()
    loaded = AutoencoderKL.from_pretrained(out / "final")
    start = build_seeded_vae("sd", width=8, latent=4, seed=0)
    changed = [k for k, v in start.state_dict().items() if not torch.equal(loaded.state_dict()[k], v)]
    assert changed, "two optimizer steps changed no weight"
    bad = accelerate_launch(
        "recipes/finetune.py",
        ["--seeded", "sd:8:4", "--frames", "5", "--height", "32", "--width", "32", "--output_dir", str(tmp_path / "b")],
        tmp_path,
    )  # fmt: skip
    assert bad.returncode != 0 and "image VAE: train it with --frames 1" in bad.stderr + bad.stdout

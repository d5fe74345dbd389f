"""Loading models and latents (parallel_vae/jobs/loading.py), on checkpoints and files these tests write themselves.

Covers the default model (seeded, or the checkpoint folder when present), diffusers folders (top level, pipeline
``vae/``, explicit subfolder), single files in the original Wan key format and in diffusers' (``.safetensors`` and
``.pth``, through ``AutoencoderKLWan.from_single_file`` with a config inferred offline), latents in every
supported format, latent (de)normalization against the Wan pipeline's formula, and every error being an
``InputError`` that says what is wrong. Plus the accelerate configs: each one loads and says what its name says.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from parallel_vae.jobs import loading
from parallel_vae.errors import InputError
from parallel_vae.jobs.models import build_wan_vae

REPO = Path(__file__).resolve().parents[1]


def small(layout: str = "wan2.1", seed: int = 1):
    return build_wan_vae(layout, base_dim=8, z_dim=4, seed=seed, perturb=0.05)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


def to_original_wan_keys(sd: dict) -> dict:
    """diffusers Wan2.1 VAE names -> the original Wan names (Wan2.1_VAE.pth), i.e. the inverse of diffusers'
    ``convert_wan_vae_to_diffusers``; checked against that function in :func:`test_inverse_key_map`."""
    resnet = [("norm1.gamma", "residual.0.gamma"), ("conv1", "residual.2"), ("norm2.gamma", "residual.3.gamma"),
              ("conv2", "residual.6"), ("conv_shortcut", "shortcut")]

    def res(rest):
        for a, b in resnet:
            if rest.startswith(a):
                return b + rest[len(a):]
        raise KeyError(rest)

    rules = [
        (r"quant_conv\.(.*)", lambda m: f"conv1.{m[1]}"),
        (r"post_quant_conv\.(.*)", lambda m: f"conv2.{m[1]}"),
        (r"(encoder|decoder)\.conv_in\.(.*)", lambda m: f"{m[1]}.conv1.{m[2]}"),
        (r"(encoder|decoder)\.norm_out\.(.*)", lambda m: f"{m[1]}.head.0.{m[2]}"),
        (r"(encoder|decoder)\.conv_out\.(.*)", lambda m: f"{m[1]}.head.2.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{res(m[3])}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", lambda m: f"{m[1]}.middle.1.{m[2]}"),
        (r"encoder\.down_blocks\.(\d+)\.((resample|time_conv).*)", lambda m: f"encoder.downsamples.{m[1]}.{m[2]}"),
        (r"encoder\.down_blocks\.(\d+)\.(.*)", lambda m: f"encoder.downsamples.{m[1]}.{res(m[2])}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
         lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{res(m[3])}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"),
    ]
    out = {}
    for k, v in sd.items():
        for pattern, name in rules:
            m = re.fullmatch(pattern, k)
            if m:
                out[name(m)] = v
                break
        else:
            raise KeyError(k)
    return out


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------


def test_default_is_seeded_wan21_without_checkpoint(tmp_path):
    vae, source = loading.load_vae(default_dir=tmp_path / "absent")
    again, _ = loading.default_vae(default_dir=tmp_path / "absent")
    assert source["kind"] == "default_seeded"
    assert vae.config.base_dim == loading.DEFAULT_SEEDED["base_dim"] and vae.config.z_dim == 16
    assert vae.config.patch_size is None and vae.config.in_channels == 3  # the Wan2.1 layout
    assert_same_weights(vae, again)  # seeded: the same model in every process
    assert not vae.training


def test_default_uses_checkpoint_folder_when_present(tmp_path):
    model = small()
    model.save_pretrained(tmp_path / "default_vae")
    vae, source = loading.load_vae(default_dir=tmp_path / "default_vae")
    assert source["kind"] == "default_checkpoint"
    assert_same_weights(vae, model)


def test_pretrained_top_level_pipeline_and_explicit_subfolder(tmp_path):
    model = small(seed=2)
    model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    model.save_pretrained(tmp_path / "odd" / "my_vae")

    vae, src = loading.load_vae(pretrained=str(tmp_path / "plain"))
    assert src["subfolder"] == "" and src["kind"] == "pretrained"
    assert_same_weights(vae, model)
    vae, src = loading.load_vae(pretrained=str(tmp_path / "pipe"))
    assert src["subfolder"] == "vae"
    assert_same_weights(vae, model)
    vae, src = loading.load_vae(pretrained=str(tmp_path / "odd"), subfolder="my_vae", dtype=torch.bfloat16)
    assert src["subfolder"] == "my_vae" and vae.dtype == torch.bfloat16


def test_pretrained_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    small().save_pretrained(tmp_path / "broken")
    weights = next((tmp_path / "broken").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    cases = [
        (dict(pretrained="./no/such/folder"), "no such folder"),
        (dict(pretrained=str(tmp_path / "empty")), "no config.json at its top or in vae/"),
        (dict(pretrained=str(tmp_path / "file.txt")), "is a file"),
        (dict(pretrained=str(tmp_path / "empty"), subfolder="vae"), "no config.json"),
        (dict(pretrained=str(tmp_path / "broken")), "cannot load the VAE"),
        (dict(pretrained=str(tmp_path / "empty"), single_file="x.safetensors"), "not both"),
        (dict(config=str(tmp_path)), "--config only applies to --single_file"),
        (dict(subfolder="vae"), "--subfolder needs --pretrained"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=re.escape(message)):
            loading.load_vae(default_dir=tmp_path / "absent", **kwargs)


def test_pretrained_hub_id_tries_vae_subfolder_then_top_level(monkeypatch):
    # No hub here: stand in for from_pretrained, and check the order of tries and the message when all fail.
    calls, model = [], small()
    monkeypatch.setattr(loading, "_hub_unreachable", lambda: None)  # as if online (the probe is tested elsewhere)
    monkeypatch.setattr(loading, "_hub_offline", lambda: False)

    def fake(path, subfolder, dtype, **kwargs):
        calls.append((path, subfolder))
        if subfolder == "vae":
            raise OSError("vae/config.json not found")
        return model

    monkeypatch.setattr(loading, "_from_pretrained", fake)
    vae, src = loading.load_vae(pretrained="org/vae-only-repo")
    assert calls == [("org/vae-only-repo", "vae"), ("org/vae-only-repo", "")]
    assert vae is model and src == {"kind": "pretrained", "path": "org/vae-only-repo", "subfolder": "", "hub": True}

    def offline(path, subfolder, dtype, **kwargs):
        raise OSError(f"offline ({subfolder or 'top'})")

    monkeypatch.setattr(loading, "_from_pretrained", offline)
    with pytest.raises(InputError, match=r"loading it from the hub failed \(subfolder vae: offline \(vae\); "
                                         r"subfolder \(top level\): offline \(top\)\)"):
        loading.load_vae(pretrained="org/pipeline-repo")


def test_inverse_key_map():
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    sd = small().state_dict()
    original = to_original_wan_keys(sd)
    assert "encoder.conv1.weight" in original and "decoder.upsamples.4.shortcut.weight" in original
    assert convert_wan_vae_to_diffusers(dict(original)).keys() == sd.keys()


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
def test_single_file_original_wan_format(tmp_path, ext):
    model = small(seed=3)
    original = {k: v.contiguous() for k, v in to_original_wan_keys(model.state_dict()).items()}
    path = tmp_path / f"Wan2.1_VAE{ext}"
    save_file(original, str(path)) if ext == ".safetensors" else torch.save(original, path)
    vae, src = loading.load_vae(single_file=str(path))
    assert src == {"kind": "single_file", "path": str(path), "config": "inferred from weight shapes"}
    assert_same_weights(vae, model)
    z = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(vae.decode(z).sample, model.decode(z).sample)


def test_single_file_diffusers_keys_wan22_layout_inferred(tmp_path):
    model = small("wan2.2", seed=4)
    path = tmp_path / "wan22.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    vae, _ = loading.load_vae(single_file=str(path), dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    for key in ("base_dim", "decoder_base_dim", "z_dim", "patch_size", "is_residual", "in_channels"):
        assert vae.config[key] == model.config[key], key
    assert vae.config.latents_mean is None  # unknown for a non-Wan2.1 latent width: never made up
    sd = vae.state_dict()
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v.to(torch.bfloat16)) for k, v in model.state_dict().items())


def test_single_file_with_config_folder(tmp_path):
    model = small(seed=5)
    model.save_pretrained(tmp_path / "pipe" / "vae")
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    vae, src = loading.load_vae(single_file=str(path), config=str(tmp_path / "pipe"))
    assert src["config"].endswith("pipe/vae")
    assert list(vae.config.latents_mean) == list(model.config.latents_mean)  # from the folder's config.json
    assert_same_weights(vae, model)


def test_single_file_errors(tmp_path):
    sd = {k: v.contiguous() for k, v in small().state_dict().items()}
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00garbage")
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    save_file({"some.weight": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    save_file({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}, str(tmp_path / "partial.safetensors"))
    save_file({**sd, "decoder.extra.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    (tmp_path / "weights.txt").write_text("x")
    cases = [
        ("missing.safetensors", "checkpoint file not found"),
        ("garbage.safetensors", "cannot read checkpoint"),
        ("garbage.pt", "cannot read checkpoint"),
        ("foreign.safetensors", "not a Wan VAE checkpoint"),
        ("partial.safetensors", "1 weights missing"),
        ("extra.safetensors", "1 unexpected"),
        ("weights.txt", "unsupported extension"),
    ]
    for name, message in cases:
        with pytest.raises(InputError, match=re.escape(message)):
            loading.load_vae(single_file=str(tmp_path / name))


# ---------------------------------------------------------------------------------------------------------------
# latents
# ---------------------------------------------------------------------------------------------------------------


def test_load_latents_every_format(tmp_path):
    z = torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    save_file({"latents": z, "other": z[:1].clone()}, str(tmp_path / "a.safetensors"))
    save_file({"whatever": z}, str(tmp_path / "b.safetensors"))
    torch.save(z, tmp_path / "c.pt")
    torch.save({"frames": z, "prompt_embeds": torch.zeros(1)}, tmp_path / "d.pt")
    np.save(tmp_path / "e.npy", z.numpy())
    np.savez(tmp_path / "f.npz", z=z.numpy())
    torch.save(z[0], tmp_path / "g.pt")  # one sample without the batch dim
    torch.save(z.double(), tmp_path / "h.pt")
    for name in "abcdef":
        path = next(tmp_path.glob(f"{name}.*"))
        got = loading.load_latents(str(path))
        assert got.dtype == torch.float32 and torch.equal(got, z), path.name
    assert torch.equal(loading.load_latents(str(tmp_path / "g.pt")), z[:1])
    assert torch.equal(loading.load_latents(str(tmp_path / "a.safetensors"), key="other"), z[:1])
    assert torch.equal(loading.load_latents(str(tmp_path / "h.pt")), z)


def test_load_latents_errors(tmp_path):
    z = torch.randn(1, 4, 2, 3, 3)
    (tmp_path / "bad.safetensors").write_bytes(b"\x01\x02junk")
    (tmp_path / "bad.pt").write_bytes(b"junk")
    (tmp_path / "bad.npy").write_bytes(b"junk")
    save_file({"a": z, "b": z.clone()}, str(tmp_path / "two.safetensors"))
    torch.save(z[0, 0], tmp_path / "three_d.pt")
    torch.save(z.long(), tmp_path / "int.pt")
    nan = z.clone()
    nan[0, 0, 0, 0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    (tmp_path / "x.json").write_text("{}")
    cases = [
        ("missing.pt", {}, "latents file not found"),
        ("bad.safetensors", {}, "cannot read latents file"),
        ("bad.pt", {}, "cannot read latents file"),
        ("bad.npy", {}, "cannot read latents file"),
        ("two.safetensors", {}, "name one with --latents_key"),
        ("two.safetensors", {"key": "c"}, "has no entry 'c'"),
        ("three_d.pt", {}, "this model's latents are (batch, channels, frames, height, width)"),
        ("int.pt", {}, "expected floating point"),
        ("nan.pt", {}, "NaN or infinite"),
        ("x.json", {}, "unsupported extension"),
    ]
    for name, kwargs, message in cases:
        with pytest.raises(InputError, match=re.escape(message)):
            loading.load_latents(str(tmp_path / name), **kwargs)


def test_denormalize_matches_the_wan_pipeline():
    vae = build_wan_vae("wan2.1", base_dim=8, z_dim=16)  # z_dim 16: diffusers' real Wan2.1 latents_mean / std
    z = torch.randn(1, 16, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    # WanPipeline.__call__ with output_type != "latent":
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    expected = z / inv_std + mean
    assert torch.allclose(loading.denormalize_latents(z, vae), expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(loading.normalize_latents(expected, vae), z, rtol=1e-5, atol=1e-5)
    unknown = build_wan_vae("wan2.1", base_dim=8, z_dim=16)
    unknown.register_to_config(latents_mean=None, latents_std=None)
    with pytest.raises(InputError, match="needs the model config's latents_mean"):
        loading.denormalize_latents(z, unknown)


def test_parse_dtype():
    assert loading.parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(InputError, match="unknown dtype 'float8'; choose one of float32, bfloat16, float16"):
        loading.parse_dtype("float8")


# ---------------------------------------------------------------------------------------------------------------
# accelerate configs
# ---------------------------------------------------------------------------------------------------------------

# file -> (distributed_type, num_processes, num_machines)
CONFIGS = {
    "single_process.yaml": ("NO", 1, 1),
    "ddp_2gpu.yaml": ("MULTI_GPU", 2, 1),
    "ddp_4gpu.yaml": ("MULTI_GPU", 4, 1),
    "ddp_8gpu.yaml": ("MULTI_GPU", 8, 1),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8, 1),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 8, 1),
    "multi_node_2x8.yaml": ("MULTI_GPU", 16, 2),
    # MULTI_GPU on purpose: see the file (accelerate starts one process for MULTI_CPU without an MPI hostfile).
    "cpu_2proc.yaml": ("MULTI_GPU", 2, 1),
}


def test_accelerate_configs_load_and_match_their_names():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = REPO / "accelerate_configs"
    assert set(CONFIGS) <= {p.name for p in folder.glob("*.yaml")}
    for name, (kind, procs, machines) in CONFIGS.items():
        cfg = load_config_from_file(str(folder / name))
        assert (str(cfg.distributed_type).split(".")[-1], cfg.num_processes, cfg.num_machines) == (kind, procs, machines)
        assert cfg.mixed_precision == "no", name  # precision is a recipe flag
        if kind == "DEEPSPEED":
            assert cfg.deepspeed_config["zero_stage"] == int(name[-6])
        if machines > 1:
            assert cfg.main_process_ip and cfg.main_process_port and "EDIT" in (folder / name).read_text()

"""recipes/decode.py end to end, through ``accelerate launch`` with 2 CPU processes (accelerate_configs/cpu_2proc.yaml).

* the 2-process decode equals the 1-process (unmodified diffusers) decode within the float32 bar, compared on the
  raw decoded tensor (``--save_tensor``) before mp4 encoding; for latents (uneven 3 + 2 row split) and for a video
  round trip (sharded encode, then decode);
* ``--parallel auto`` below its threshold falls back to every rank decoding alone, still one correct video;
* video.mp4 opens with the right frame count and size; metrics.json has every field; wandb's offline run folder
  exists (no login: the offline fallback, not WANDB_MODE);
* each bad input: non-zero exit, the message once, no traceback from our code, no video.mp4 / metrics.json.

Plus the single-process path in-process (no launch) and ``--help`` for every flag.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
from safetensors.torch import load_file, save_file

from parallel_vae import decode_video, encode_video
from parallel_vae.jobs.loading import default_vae, denormalize_latents
from parallel_vae.jobs.models import build_wan_vae
from parallel_vae.jobs.video import demo_video, read_video, write_video

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "decode.py"
CPU_CONFIG = REPO / "accelerate_configs" / "cpu_2proc.yaml"
ACCELERATE = Path(sys.executable).with_name("accelerate")
F32_BAR = 1e-5
# Seconds per launch: a hang fails the test instead of blocking CI (the recipe's own collective timeout, 120 s
# here, should fire first).
LAUNCH_TIMEOUT = 240

METRIC_FIELDS = {
    "world_size", "backend", "device", "group_layout", "parallel", "dtype", "model", "input", "input_shape",
    "latent_shape", "output_shape", "decode_seconds", "decode_seconds_per_rank", "peak_memory_bytes",
    "peak_memory_kind", "peak_memory_note", "ranks", "fps", "videos", "tensor_file", "versions",
}
ROUND_TRIP_FIELDS = {"encode_seconds", "encode_seconds_per_rank", "psnr", "ssim"}


def _free_port() -> int:
    # Other test runs on the same machine may hold accelerate's default port 29500.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], tmp_path: Path, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        CUDA_VISIBLE_DEVICES="",  # stay on CPU even where GPUs exist
        OMP_NUM_THREADS="1",
        NETRC=str(tmp_path / "no-netrc"),  # no wandb login: the recipe must fall back to offline by itself
        PYTHONPATH=str(REPO),
        **env_extra,
    )
    cmd = [str(ACCELERATE), "launch", "--config_file", str(CPU_CONFIG), "--main_process_port", str(_free_port()),
           str(RECIPE), "--no_progress", "--timeout", "120", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def vae():
    torch.set_num_threads(1)
    model, _ = default_vae()  # the recipe's default model (seeded, or the checkpoint folder once it exists)
    return model


@pytest.fixture(scope="module")
def latents(vae, tmp_path_factory):
    # 5 latent rows: an uneven 3 + 2 split over the 2 ranks; 2 latent frames -> 5 video frames of 40 x 32 pixels.
    z = torch.randn(1, vae.config.z_dim, 2, 5, 4, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("inputs") / "latents.safetensors"
    save_file({"latents": z}, str(path))
    return path, z


def check_mp4(path: Path, frames: int, height: int, width: int) -> None:
    video = iio.imread(path)  # (T, H, W, 3) uint8
    assert video.shape == (frames, height, width, 3)


def no_leftovers(folder: Path) -> None:
    assert not list(folder.glob(".tmp-*")), "temporary files left behind"


@pytest.mark.timeout(300)
def test_two_process_latents_decode_matches_one_process(tmp_path, vae, latents):
    path, z = latents
    out = tmp_path / "out"
    proc = launch(
        ["--latents", str(path), "--parallel", "on", "--save_tensor", "--output_dir", str(out),
         "--report_to", "wandb", "--tracker_project", "pv-tests", "--run_name", "decode-test"],
        tmp_path,
    )
    ok(proc)
    reference = decode_video(vae, z)  # one process, unmodified diffusers
    decoded = load_file(str(out / "decoded.safetensors"))["video"]
    assert decoded.shape == reference.shape == (1, 3, 5, 40, 32)
    assert rel_err(decoded, reference) <= F32_BAR
    check_mp4(out / "video.mp4", 5, 40, 32)

    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_FIELDS <= metrics.keys()
    assert metrics["world_size"] == 2 and metrics["backend"] == "gloo" and metrics["dtype"] == "float32"
    assert metrics["parallel"]["shard"] is True
    assert metrics["group_layout"] == {
        "spatial_groups": [[0, 1]], "spatial_size": 2, "latent_rows_per_rank": [3, 2], "pixel_rows_per_rank": [24, 16]
    }
    assert metrics["input_shape"] == list(z.shape) and metrics["output_shape"] == [1, 3, 5, 40, 32]
    assert metrics["decode_seconds"] > 0 and len(metrics["decode_seconds_per_rank"]) == 2
    assert len(metrics["peak_memory_bytes"]) == 2 and all(b > 10**7 for b in metrics["peak_memory_bytes"])
    assert metrics["peak_memory_kind"] == "cpu_peak_rss"
    assert metrics["videos"] == ["video.mp4"] and metrics["tensor_file"] == "decoded.safetensors"
    assert not ROUND_TRIP_FIELDS & metrics.keys()  # latents in: no encode, nothing to compare against

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "no offline wandb run"
    no_leftovers(out)


@pytest.mark.timeout(300)
def test_two_process_video_round_trip_matches_one_process(tmp_path, vae):
    src = tmp_path / "clip.mp4"
    write_video(demo_video(frames=6, height=40, width=32), str(src))  # 6 frames: the 6th is past 1 + 4k
    out = tmp_path / "out"
    ok(launch(["--video", str(src), "--parallel", "on", "--save_tensor", "--output_dir", str(out)], tmp_path))

    video = read_video(str(src))[None, :, :5]  # the same decoded frames the recipe read, first 1 + 4 frames
    reference = decode_video(vae, encode_video(vae, video).mode())
    decoded = load_file(str(out / "decoded.safetensors"))["video"]
    assert decoded.shape == reference.shape == (1, 3, 5, 40, 32)
    assert rel_err(decoded, reference) <= F32_BAR
    check_mp4(out / "video.mp4", 5, 40, 32)

    metrics = json.loads((out / "metrics.json").read_text())
    assert (METRIC_FIELDS | ROUND_TRIP_FIELDS) <= metrics.keys()
    assert metrics["encode_seconds"] > 0 and metrics["parallel"]["shard"] is True
    assert metrics["input"]["kind"] == "video" and "encoding the first 5" in metrics["input"]["notes"][0]
    assert metrics["input_shape"] == [1, 3, 5, 40, 32] and metrics["latent_shape"][2:] == [2, 5, 4]
    psnr = 10 * torch.log10(4 / ((decoded.double() - video.double()) ** 2).mean()).item()
    assert abs(metrics["psnr"] - psnr) < 1e-6
    assert -1 <= metrics["ssim"] <= 1
    assert not (out / "wandb").exists()  # --report_to none
    no_leftovers(out)


@pytest.mark.timeout(300)
def test_auto_below_threshold_decodes_unsharded_once(tmp_path, vae, latents):
    path, z = latents
    out = tmp_path / "out"
    ok(launch(["--latents", str(path), "--auto_threshold", "1000000", "--save_tensor", "--output_dir", str(out)],
              tmp_path))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["parallel"]["requested"] == "auto" and metrics["parallel"]["shard"] is False
    assert "GFLOP per rank < threshold 1000000" in metrics["parallel"]["reason"]
    assert metrics["group_layout"]["spatial_groups"] == [[0], [1]] and metrics["world_size"] == 2
    decoded = load_file(str(out / "decoded.safetensors"))["video"]
    assert rel_err(decoded, decode_video(vae, z)) <= F32_BAR
    assert sorted(p.name for p in out.iterdir()) == ["decoded.safetensors", "metrics.json", "video.mp4"]


def _bad_inputs(tmp: Path, z_dim: int) -> dict:
    """name -> (flags, expected exit status, text the one message must contain)."""
    (tmp / "garbage.safetensors").write_bytes(b"\x07this is not a safetensors file")
    save_file({"latents": torch.randn(1, z_dim + 1, 2, 4, 4)}, str(tmp / "channels.safetensors"))
    save_file({"latents": torch.randn(1, z_dim, 2, 1, 4)}, str(tmp / "one_row.safetensors"))
    write_video(demo_video(frames=5, height=36, width=32), str(tmp / "odd.mp4"))
    return {
        "missing file": (["--latents", str(tmp / "missing.safetensors")], 1, "latents file not found"),
        "unreadable file": (["--latents", str(tmp / "garbage.safetensors")], 1, "cannot read latents file"),
        "channel mismatch": (["--latents", str(tmp / "channels.safetensors")], 1,
                             f"have {z_dim + 1} channels (dim 1 of (1, {z_dim + 1}, 2, 4, 4)), but the model's "
                             f"latent channels are {z_dim}"),
        "fewer rows than ranks": (["--latents", str(tmp / "one_row.safetensors"), "--parallel", "on"], 1,
                                  "1 latent rows (8 pixel rows) cannot be split over 2 ranks"),
        "video size": (["--video", str(tmp / "odd.mp4")], 1,
                       "is 36x32 (height x width); both must be multiples of the model's spatial factor 8. Crop or "
                       "resize to a height of 32 or 40"),
        "unknown dtype": (["--dtype", "float8"], 2, "argument --dtype: invalid choice: 'float8'"),
    }


BAD = ["missing file", "unreadable file", "channel mismatch", "fewer rows than ranks", "video size", "unknown dtype"]


@pytest.mark.timeout(280)
@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_once_cleanly(tmp_path, vae, case):
    flags, status, message = _bad_inputs(tmp_path, vae.config.z_dim)[case]
    out = tmp_path / "out"
    proc = launch([*flags, "--output_dir", str(out)], tmp_path)
    assert proc.returncode != 0
    # Every rank exits with the status; the launcher reports the first one it sees.
    assert f"exitcode  : {status}" in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "decode.py: error:" in line]
    assert len(lines) == 1, proc.stderr  # printed once, by the main rank
    assert message in lines[0], lines[0]
    # No traceback from the recipe or the library (the launcher's own failure summary is not ours).
    assert "parallel_vae/" not in proc.stderr and 'decode.py", line' not in proc.stderr, proc.stderr
    assert not (out / "video.mp4").exists() and not (out / "metrics.json").exists()
    if out.exists():
        no_leftovers(out)


# ---------------------------------------------------------------------------------------------------------------
# no launch: the single-process path and the flags
# ---------------------------------------------------------------------------------------------------------------


def _recipe_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("decode_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(200)
def test_single_process_in_process(tmp_path, vae, latents, capsys, monkeypatch):
    from accelerate.state import AcceleratorState

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = _recipe_module()
    path, z = latents
    out = tmp_path / "out"
    try:
        assert recipe.main(["--latents", str(path), "--output_dir", str(out), "--save_tensor", "--no_progress"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["world_size"] == 1 and metrics["parallel"]["shard"] is False
        assert rel_err(load_file(str(out / "decoded.safetensors"))["video"], decode_video(vae, z)) <= F32_BAR
        check_mp4(out / "video.mp4", 5, 40, 32)

        # --latents_normalized with the default model's config statistics, in bfloat16.
        out = tmp_path / "norm"
        assert recipe.main(["--latents", str(path), "--latents_normalized", "--dtype", "bfloat16", "--save_tensor",
                            "--output_dir", str(out), "--no_progress"]) == 0
        expected = decode_video(copy.deepcopy(vae).to(torch.bfloat16), denormalize_latents(z, vae))
        got = load_file(str(out / "decoded.safetensors"))["video"]
        assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
        assert json.loads((out / "metrics.json").read_text())["dtype"] == "bfloat16"

        # --pretrained: a diffusers pipeline folder written here.
        small = build_wan_vae("wan2.1", base_dim=8, z_dim=vae.config.z_dim, seed=9)
        small.save_pretrained(tmp_path / "pipe" / "vae")
        out = tmp_path / "pre"
        assert recipe.main(["--pretrained", str(tmp_path / "pipe"), "--latents", str(path), "--save_tensor",
                            "--output_dir", str(out), "--no_progress"]) == 0
        model = json.loads((out / "metrics.json").read_text())["model"]
        assert model["kind"] == "pretrained" and model["subfolder"] == "vae" and model["base_dim"] == 8
        assert torch.equal(load_file(str(out / "decoded.safetensors"))["video"], decode_video(small, z))

        bad = tmp_path / "bad"
        assert recipe.main(["--latents", str(path), "--latents_key", "nope", "--output_dir", str(bad)]) == 1
        err = capsys.readouterr().err
        assert err.count("decode.py: error:") == 1 and "has no entry 'nope'" in err
        assert not bad.exists()
    finally:
        AcceleratorState._reset_state(True)


def test_every_flag_has_help():
    parser = _recipe_module().build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 20
    for action in flags:
        assert action.help and len(action.help) > 15, action.option_strings
    text = parser.format_help()
    for flag in ("--pretrained", "--single_file", "--latents_normalized", "--video", "--parallel", "--report_to"):
        assert flag in text
    assert "decode_threshold.py" in text  # how the auto threshold was measured

"""Fault tolerance of the recipes (issue 11): a rank killed during save_state, a rerun into a used run folder, a
resume that would change the trajectory, corrupt checkpoints, unusable output paths, and file modes.

One 2-process launch carries the kill; everything that fails before training runs in this process (cheap), and
the resume that trains runs as one plain process."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from parallel_vae.jobs.finetune_job import latest_checkpoint
from tests.launch import REPO, accelerate_launch, check_ok, python_run

SMALL = ["--seeded", "wan2.1:8:4", "--frames", "5", "--height", "32", "--width", "32", "--val_data", "synthetic:2",
         "--data", "synthetic:2", "--validate_every", "0"]  # fmt: skip


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def in_process(monkeypatch, capsys):
    """Run a recipe's main() in this process; returns (exit status, stderr)."""
    from accelerate.state import AcceleratorState

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    modules = {}

    def run(name: str, argv: list[str]) -> tuple[int, str]:
        modules.setdefault(name, _recipe(name))
        try:
            code = modules[name].main(argv)
        finally:
            AcceleratorState._reset_state(True)
        return code, capsys.readouterr().err

    return run


def _modes(folder: Path) -> set[tuple[str, int]]:
    return {("d" if p.is_dir() else "f", stat.S_IMODE(p.stat().st_mode)) for p in [folder, *folder.rglob("*")]}


def _one_error(err: str, prog: str = "finetune.py") -> str:
    """The one error line; no traceback from our code (the launcher's own ChildFailedError report is not ours)."""
    lines = [line for line in err.splitlines() if f"{prog}: error:" in line]
    assert len(lines) == 1, err[-3000:]
    assert "parallel_vae/" not in err and f'{prog}", line' not in err, err[-3000:]
    return lines[0]


@pytest.mark.timeout(400)
def test_kill_during_save_state_rerun_and_resume(tmp_path, in_process):
    out = tmp_path / "run"
    ck = out / "checkpoints"
    args = SMALL + ["--max_steps", "3", "--checkpoint_every", "1", "--output_dir", str(out)]
    old_mask = os.umask(0o022)  # the launched ranks inherit it
    try:
        proc = accelerate_launch("tests/kill_during_save.py", args, tmp_path, env_extra={"PV_KILL_AT_SAVE": "step_000002"}, timeout=240)
    finally:
        os.umask(old_mask)
    assert proc.returncode != 0, proc.stderr[-3000:]
    # point 1: the checkpoint being saved is a temporary until complete; the previous one is untouched.
    assert sorted(os.listdir(ck)) == [".tmp-step_000002", "step_000001"], proc.stderr[-3000:]
    assert latest_checkpoint(str(out)) == str(ck / "step_000001")
    # point 6: the umask's modes (0644 / 0755), not the atomic writer's private 0600 / 0700.
    assert _modes(ck / "step_000001") == {("d", 0o755), ("f", 0o644)}

    # point 2: a rerun without --resume is refused, naming both ways on.
    code, err = in_process("finetune", args)
    assert code == 2 and "--resume latest" in _one_error(err) and "--overwrite" in _one_error(err)
    # ... and a resume that changes the trajectory (global batch 1 -> 2) is refused with the difference.
    code, err = in_process("finetune", args + ["--resume", "latest", "--batch_size", "2"])
    assert code == 2 and "global_batch_size: 1 -> 2" in _one_error(err)
    # point 1: an incomplete folder named explicitly says what is missing.
    fresh = ["--output_dir", str(tmp_path / "other")]
    code, err = in_process("finetune", SMALL + fresh + ["--resume", str(ck / ".tmp-step_000002")])
    assert code == 1 and "not a complete checkpoint" in _one_error(err) and "trainer_state.json" in _one_error(err)
    # point 4: truncated weights and optimizer state: one line naming the file.
    for name in ("model.safetensors", "optimizer.bin"):
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(ck / "step_000001", bad)
        data = (bad / name).read_bytes()
        (bad / name).write_bytes(data[: len(data) // 2])
        code, err = in_process("finetune", SMALL + fresh + ["--resume", str(bad)])
        line = _one_error(err)
        assert code == 1 and f"checkpoint file {bad / name} is truncated or corrupt" in line, line
    # point 3: unusable output paths fail before anything is loaded.
    (tmp_path / "a_file").write_text("x")
    code, err = in_process("finetune", SMALL + ["--output_dir", str(tmp_path / "a_file")])
    assert code == 1 and "--output_dir" in _one_error(err) and "is a file" in _one_error(err)
    code, err = in_process("finetune", SMALL + fresh + ["--export_dir", str(tmp_path / "a_file" / "final")])
    assert code == 1 and "--export_dir" in _one_error(err) and "cannot be written" in _one_error(err)
    assert not (tmp_path / "other").exists() or not os.listdir(tmp_path / "other")

    # The resume itself, on 1 process (S 2 -> 1 with the same D = 1: the same trajectory, so allowed).
    proc = python_run("recipes/finetune.py", args + ["--resume", "latest"], tmp_path)
    check_ok(proc)
    # point 11: one line saying where the model went
    assert f"finetune: final model in {out / 'final'} (diffusers from_pretrained loads it); 2 steps on 1 process" in proc.stdout
    # the stale temporary is gone, and the default retention (--checkpoints_total_limit 2) kept the newest two
    assert sorted(os.listdir(ck)) == ["step_000002", "step_000003"]
    summary = json.loads((out / "finetune_summary.json").read_text())
    # the summary keeps the step trained before the kill (carried by the checkpoint), then the resumed ones
    assert summary["start_step"] == 1 and [h["step"] for h in summary["history"]] == [1, 2, 3]
    recorded = json.loads((out / "run_config.json").read_text())
    assert {k: recorded[k] for k in ("world_size", "sp_degree", "dp_degree", "batch_size", "global_batch_size", "seed", "data")} == {
        "world_size": 1, "sp_degree": 1, "dp_degree": 1, "batch_size": 1, "global_batch_size": 1, "seed": 0, "data": "synthetic:2"
    }  # fmt: skip

    # --overwrite starts afresh: the old checkpoints go; --max_steps 0 validates and exports only.
    old_mask = os.umask(0o027)
    try:
        code, err = in_process("finetune", args + ["--overwrite", "--max_steps", "0"])
    finally:
        os.umask(old_mask)
    assert code == 0, err[-3000:]
    assert not ck.exists() and (out / "final" / "config.json").is_file()
    assert _modes(out / "final") == {("d", 0o750), ("f", 0o640)}  # point 6: the export follows the umask too
    assert stat.S_IMODE((out / "finetune_summary.json").stat().st_mode) == 0o640
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["history"] == [] and [v["step"] for v in summary["validation"]] == [0]


# ---------------------------------------------------------------------------------------------------------------
# decode: outputs as one unit, stale temporaries, non-finite output, the summary, comparison.mp4
# ---------------------------------------------------------------------------------------------------------------

DECODE = ["--seeded", "wan2.1:8:4", "--no_progress"]


@pytest.mark.timeout(300)
def test_decode_outputs_are_one_unit(tmp_path, in_process, monkeypatch, capsys):
    import imageio.v3 as iio
    import torch
    from safetensors.torch import save_file

    from parallel_vae.jobs.video import demo_video, write_video

    src = tmp_path / "clip.mp4"
    write_video(demo_video(frames=5, height=32, width=24), str(src))
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"from": "the previous run"}')
    (out / ".tmp-killed.mp4").write_bytes(b"half an mp4")  # a kill during the mp4 write
    args = DECODE + ["--video", str(src), "--output_dir", str(out)]

    # point 5: a kill between the renames (simulated at the rename of metrics.json) must not pair the new video
    # with the previous run's metrics.json.
    real_replace = os.replace

    def killed_at_metrics(src_path, dst_path):
        if str(dst_path) == str(out / "metrics.json"):
            raise KeyboardInterrupt
        return real_replace(src_path, dst_path)

    monkeypatch.setattr(os, "replace", killed_at_metrics)
    with pytest.raises(KeyboardInterrupt):
        in_process("decode", args)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (out / "metrics.json").exists(), "new outputs beside the previous run's metrics.json"

    # The next run clears what the killed ones left, and writes the unit; points 11, 12: summary, comparison.mp4.
    code, err = in_process("decode", args)
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["comparison.mp4", "metrics.json", "video.mp4"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["comparison"] == "comparison.mp4" and len(metrics["run_id"]) == 12
    assert iio.imread(out / "comparison.mp4").shape == (5, 64, 24, 3)  # input above reconstruction


@pytest.mark.timeout(120)
def test_decode_refuses_non_finite_output_and_directory_latents(tmp_path, in_process):
    import torch
    from safetensors.torch import save_file

    # point 10: float16 overflow (latents beyond its range) is an error with the dtype advice; nothing is written.
    big = tmp_path / "big.safetensors"
    save_file({"latents": torch.full((1, 4, 2, 4, 4), 1e6)}, str(big))
    fresh = tmp_path / "fp16"
    code, err = in_process("decode", DECODE + ["--latents", str(big), "--dtype", "float16", "--output_dir", str(fresh)])
    line = _one_error(err, "decode.py")
    assert code == 1 and "NaN or infinite" in line and "bfloat16 or float32" in line, line
    assert not fresh.exists() or not [p for p in fresh.iterdir() if not p.name.startswith(".")]
    # point 13: a directory given as --latents says so.
    code, err = in_process("decode", DECODE + ["--latents", str(tmp_path), "--output_dir", str(fresh)])
    assert code == 1 and "is a directory" in _one_error(err, "decode.py")


def test_decode_prints_one_summary(tmp_path, in_process, capsys):
    from parallel_vae.jobs.video import demo_video, write_video

    src = tmp_path / "clip.mp4"
    write_video(demo_video(frames=5, height=32, width=24), str(src))
    recipe = _recipe("decode")
    from accelerate.state import AcceleratorState

    try:
        assert recipe.main(DECODE + ["--video", str(src), "--output_dir", str(tmp_path / "o")]) == 0
    finally:
        AcceleratorState._reset_state(True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("decode: ")]
    assert len(lines) == 1, lines
    for text in (str(tmp_path / "o"), "video.mp4", "comparison.mp4", "1 process", "decode ", "peak memory", "PSNR", "SSIM"):
        assert text in lines[0], (text, lines[0])


def test_group_of_one_under_a_multi_process_launch_is_refused(monkeypatch):
    import torch.distributed as dist

    from parallel_vae import enable_spatial_parallelism, is_spatially_parallel
    from parallel_vae.jobs.models import build_seeded_vae

    assert not dist.is_initialized()
    vae = build_seeded_vae(layout="wan2.1", width=8, latent=4, seed=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE is 2 but torch.distributed is not initialized") as e:
        enable_spatial_parallelism(vae)
    assert "init_process_group(" in str(e.value) and not is_spatially_parallel(vae)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert is_spatially_parallel(enable_spatial_parallelism(vae))  # one process: the no-op path, as before


def test_merged_rank_errors_ignore_pointers():
    from parallel_vae.jobs.runtime import AgreedError, Runtime

    class TwoRanks(Runtime):
        distributed = True
        world_size = 2

        def gather_object(self, obj):
            return [("[mov,mp4 @ 0x55d0c1a2b3c0] moov atom not found", 1), ("[mov,mp4 @ 0x5612aa00ff10] moov atom not found", 1)]

    with pytest.raises(AgreedError) as e:
        TwoRanks(accelerator=None).agree(ValueError("x"))
    assert str(e.value) == "[mov,mp4 @ 0x…] moov atom not found"


@pytest.mark.timeout(300)
def test_timeout_is_validated_and_a_stalled_rank_fails_in_bounded_time(tmp_path):
    import time

    # point 7: --timeout 0 is a usage error before the process group exists (c10d crashed on it).
    proc = accelerate_launch("recipes/decode.py", DECODE + ["--timeout", "0", "--output_dir", str(tmp_path / "a")], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "--timeout must be a positive number of seconds, got 0.0" in _one_error(proc.stderr, "decode.py")
    assert "parallel_vae/" not in proc.stderr, proc.stderr[-3000:]
    # A rank that never arrives: rank 0 gives up after --timeout with one line, the launcher stops the other.
    start = time.monotonic()
    proc = accelerate_launch("tests/stall_rank.py", DECODE + ["--timeout", "4", "--output_dir", str(tmp_path / "b")], tmp_path, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and elapsed < 60, (elapsed, proc.stderr[-3000:])
    line = _one_error(proc.stderr, "decode.py")
    assert "rank 0 of 2 waited --timeout 4 s" in line, line


@pytest.mark.timeout(60)
def test_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    """point 8: no network, or HF_HUB_OFFLINE without a cached model: one message in seconds, not a minute of
    retries ending in 'config.json missing'."""
    import time

    from huggingface_hub import constants

    from parallel_vae.errors import InputError
    from parallel_vae.jobs.loading import load_pretrained

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for offline in (False, True):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        start = time.monotonic()
        with pytest.raises(InputError) as e:
            load_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
        assert time.monotonic() - start < 10
        assert "cannot reach the model hub" in str(e.value)
        assert "pass a local folder or set HF_HUB_OFFLINE=1 with a cached model" in str(e.value)
        assert ("HF_HUB_OFFLINE is set" in str(e.value)) == offline, str(e.value)


@pytest.mark.timeout(60)
def test_help_is_instant_and_printed_by_rank_0_only(tmp_path):
    """point 14: --help parses before torch/diffusers/deepspeed load (so it is instant), prints nothing on other
    ranks of a launch, and quotes the auto-threshold measurement of docs/recipes.md."""
    import subprocess
    import sys

    from parallel_vae.jobs.cli import DTYPE_NAMES, SEEDED_LAYOUT_NAMES
    from parallel_vae.jobs.loading import DTYPES
    from parallel_vae.jobs.models import SEEDED_LAYOUTS

    assert tuple(DTYPES) == DTYPE_NAMES and tuple(SEEDED_LAYOUTS) == SEEDED_LAYOUT_NAMES
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    recipes_doc = (REPO / "docs" / "recipes.md").read_text()
    for recipe in ("decode", "finetune"):
        script = str(REPO / "recipes" / f"{recipe}.py")
        proc = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], capture_output=True, text=True, env=env, timeout=30)
        assert proc.returncode == 0 and "--output_dir" in proc.stdout
        heavy = [m for m in ("torch", "diffusers", "deepspeed") if f"| {m}\n" in proc.stderr or f"| {m}." in proc.stderr]
        assert not heavy, heavy
        other = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env={**env, "RANK": "1"}, timeout=30)
        assert other.returncode == 0 and other.stdout == ""
        if recipe == "decode":
            text = " ".join(proc.stdout.split())
            for number in ("lost at 0.72 GFLOP per rank", "1.81x at 1.45", "1.82x at 7.1", "3.59x at 18.9"):
                assert number in text and number in " ".join(recipes_doc.split()), number


def _late_rank_worker(rank, world, delay):
    import time

    import torch

    import parallel_vae as pv
    from parallel_vae.jobs.models import build_wan_vae

    torch.set_num_threads(1)
    vae = build_wan_vae("wan2.1", base_dim=8, z_dim=4, seed=0)
    pv.enable_spatial_parallelism(vae, timeout=2.0)
    if rank == 1:
        time.sleep(delay)  # a rank that stopped (or is busy elsewhere) past the library's deadline
    start = time.monotonic()
    try:
        vae.decode(torch.zeros(1, 4, 1, 2, 2))
    except Exception as e:  # noqa: BLE001 - the test inspects what was raised
        return type(e).__name__, str(e), time.monotonic() - start
    return None


@pytest.mark.timeout(120)
def test_library_timeout_names_the_operation_and_the_missing_rank():
    """enable_spatial_parallelism(timeout=2): a rank that does not arrive at decode fails the others within about
    2 s (not the process group's 30 minutes), naming decode and, on gloo, the missing rank."""
    from tests.dist_harness import run_ranks

    results = run_ranks(_late_rank_worker, 2, 8.0, timeout=90, fresh=True)
    first = results[0].value
    assert first is not None, "rank 0 did not time out"
    kind, message, waited = first
    assert kind == "SpatialTimeoutError", (kind, message)
    assert message.startswith("decode:") and "Ranks 1 failed" in message and waited < 6, (message, waited)
    with pytest.raises(ValueError, match="positive number of seconds"):
        import parallel_vae as pv
        from parallel_vae.jobs.models import build_wan_vae

        pv.enable_spatial_parallelism(build_wan_vae("wan2.1", base_dim=8, z_dim=4), timeout=0)

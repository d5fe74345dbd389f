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
    lines = [line for line in err.splitlines() if f"{prog}: error:" in line]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
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
    assert sorted(os.listdir(ck)) == ["step_000001", "step_000002", "step_000003"]  # the stale temporary is gone
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["start_step"] == 1 and [h["step"] for h in summary["history"]] == [2, 3]
    assert json.loads((out / "run_config.json").read_text())["global_batch_size"] == 1

    # --overwrite starts afresh: the old checkpoints go; --max_steps 0 validates and exports only.
    code, err = in_process("finetune", args + ["--overwrite", "--max_steps", "0"])
    assert code == 0, err[-3000:]
    assert not ck.exists() and (out / "final" / "config.json").is_file()
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["history"] == [] and [v["step"] for v in summary["validation"]] == [0]

"""Run a recipe under ``accelerate launch`` on CPU for tests: N processes, gloo, no wandb login, a hang fails."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
CONFIGS = REPO / "accelerate_configs"


def free_port() -> int:
    # Other test runs on the same machine may hold accelerate's default port 29500.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(
    script: str,
    args: list[str],
    cwd: Path,
    *,
    config: str = "cpu_2proc.yaml",
    num_processes: int | None = None,
    timeout: float = 300,
    env_extra: dict | None = None,
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file accelerate_configs/<config> [--num_processes N] REPO/<script> <args>``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        CUDA_VISIBLE_DEVICES="",  # stay on CPU even where GPUs exist
        OMP_NUM_THREADS="1",
        NETRC=str(cwd / "no-netrc"),  # no wandb login: recipes must fall back to offline by themselves
        PYTHONPATH=str(REPO),
        **(env_extra or {}),
    )
    cmd = [str(ACCELERATE), "launch", "--config_file", str(CONFIGS / config), "--main_process_port", str(free_port())]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    cmd += [str(REPO / script), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def python_run(script: str, args: list[str], cwd: Path, *, timeout: float = 300) -> subprocess.CompletedProcess:
    """A recipe as one plain process (no launcher)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", NETRC=str(cwd / "no-netrc"), PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"

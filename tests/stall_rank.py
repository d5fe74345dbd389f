"""Fault injection for tests/test_faults.py: run recipes/decode.py, but rank 1 stops answering (sleeps) before it
reads its input, so rank 0 waits in a collective until --timeout."""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

import parallel_vae.jobs.decode_job as decode_job

_read_input = decode_job.read_input


def _stall(args, vae):
    if os.environ.get("RANK") == "1":
        time.sleep(3600)
    return _read_input(args, vae)


decode_job.read_input = _stall
recipe = Path(__file__).resolve().parents[1] / "recipes" / "decode.py"
sys.argv[0] = str(recipe)
runpy.run_path(str(recipe), run_name="__main__")

"""Fault injection for tests/test_faults.py: run recipes/finetune.py, but SIGKILL rank 0 right after accelerate's
save_state of the checkpoint named by PV_KILL_AT_SAVE returns, before the recipe has marked it complete."""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

from accelerate import Accelerator

_save_state = Accelerator.save_state


def _save_then_die(self, output_dir=None, **kwargs):
    out = _save_state(self, output_dir, **kwargs)
    if os.environ["PV_KILL_AT_SAVE"] in os.path.basename(str(output_dir)) and self.process_index == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return out


Accelerator.save_state = _save_then_die
recipe = Path(__file__).resolve().parents[1] / "recipes" / "finetune.py"
sys.argv[0] = str(recipe)
runpy.run_path(str(recipe), run_name="__main__")

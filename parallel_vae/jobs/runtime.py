"""Running a recipe under ``accelerate launch``: the process group, errors that every rank agrees on, one message.

Rules the recipes follow, in one place so that the decode and fine-tuning recipes behave the same:

* The process group is explicit: gloo on CPU, NCCL on GPUs, with a collective timeout, so that a rank that never
  arrives fails the run after ``timeout`` seconds instead of hanging it. (Without an explicit backend, accelerate
  on a GPU-less machine launched with ``--multi_gpu``, or under DeepSpeed on CPU, leaves the process count at 1.)
* Bad input is raised as :class:`~parallel_vae.errors.InputError` (or ``ShardingError`` / ``OSError``) inside a
  :meth:`Runtime.agreed` block. At the end of the block every rank exchanges its error, if any (one small
  all-gather), so all ranks take the same branch even when only one rank's file was unreadable; the main rank
  prints the message once and every rank exits non-zero. Other exceptions are bugs: they keep their traceback.
* The main rank prints before anyone exits (a barrier after the print): the launcher kills the remaining ranks as
  soon as one exits non-zero, which could otherwise swallow the message.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import netrc
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from ..errors import InputError
from .cli import DEFAULT_TIMEOUT_S, ArgumentParser, UsageError, add_runtime_args, exit_process  # torch-free
from ..core.sharding import ShardingError

__all__ = [
    "ArgumentParser",
    "UsageError",
    "AgreedError",
    "Runtime",
    "start_runtime",
    "run_recipe",
    "exit_process",
    "add_runtime_args",
    "wandb_mode",
    "DEFAULT_TIMEOUT_S",
    "NCCL_ENV_DEFAULTS",
    "set_nccl_env_defaults",
]

# The NCCL environment the recipes set before the process group exists (each only where the user has not set it;
# names as torch 2.13's ProcessGroupNCCL.hpp reads them). What a stalled peer looks like under NCCL: a collective
# is queued on the GPU stream and returns at once, so the Python code of the waiting ranks does not see the stall;
# ProcessGroupNCCL's watchdog thread notices that the work ran past the process group's timeout and, with
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (TearDown), aborts the communicators and ends the process with one line,
#     "[Rank r] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=.., OpType=ALLGATHER, ..) ran for
#      .. milliseconds before timing out", and the launcher (torchrun / accelerate) then stops the other ranks;
#   TORCH_NCCL_PROPAGATE_ERROR=1, the first rank that fails tells the others through the store, so they stop with
#     that error instead of each waiting out its own timeout;
#   TORCH_NCCL_DUMP_ON_TIMEOUT=0, no flight-recorder dump files are written next to the run (set it to 1, with
#     TORCH_NCCL_TRACE_BUFFER_SIZE > 0, to debug a desync).
# TORCH_NCCL_BLOCKING_WAIT is left off on purpose: it makes every wait() block the CPU thread until the GPU
# finishes, a host sync per collective, which is what the library avoids (no per-layer syncs). The library's own
# `timeout=` (enable_spatial_parallelism) still raises a Python SpatialTimeoutError at the start of an encode/decode.
NCCL_ENV_DEFAULTS = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_PROPAGATE_ERROR": "1",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
}


def set_nccl_env_defaults(environ=os.environ) -> dict:
    """Set :data:`NCCL_ENV_DEFAULTS` in ``environ`` where unset (before ``init_process_group``); returns the values
    in effect. A user's own setting always wins."""
    for name, value in NCCL_ENV_DEFAULTS.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in NCCL_ENV_DEFAULTS}

# How gloo and NCCL word a collective that ran past the process group's timeout.
_TIMED_OUT = re.compile(r"timed? ?out|timeout", re.IGNORECASE)
# An object address as C libraries print it ("@ 0x55d0c1a2b3c0"): a whole word, at least 6 hex digits, so that
# sizes and file names ("60x90", "clip_1280x720.mp4") keep their text.
_POINTER = re.compile(r"(?<![0-9A-Za-z_])0x[0-9a-fA-F]{6,}\b")

# Errors that mean "the user's input cannot be used"; anything else is a bug and keeps its traceback.
_INPUT_ERRORS = (InputError, ShardingError, OSError)


class AgreedError(Exception):
    """Raised identically on every rank after a failed :meth:`Runtime.agreed` block."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Runtime:
    """This process's place in the launch, and the collectives the recipes need."""

    accelerator: Any
    prog: str = "recipe"
    trackers_started: bool = field(default=False, init=False)

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        """The group the recipes parallelize over: the whole world (``None`` when not distributed)."""
        return dist.group.WORLD if self.distributed else None

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.distributed else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if self.distributed else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def backend(self) -> Optional[str]:
        return dist.get_backend() if self.distributed else None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_object(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def synchronize(self) -> None:
        """Wait for this rank's queued device work (for timings)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def agree(self, error: Optional[BaseException]) -> None:
        """Exchange this rank's error (or ``None``); if any rank failed, raise the same :class:`AgreedError` on all."""
        mine = None
        if error is not None:
            mine = (str(error) or type(error).__name__, 2 if isinstance(error, UsageError) else 1)
        found = self.gather_object(mine)
        failed = [(r, f) for r, f in enumerate(found) if f is not None]
        if not failed:
            return
        texts = {}
        for r, (text, _) in failed:
            # ffmpeg and other C libraries put object addresses in their messages ("[mov,mp4 @ 0x55d0c1a2]"):
            # the same error on every rank, said once.
            texts.setdefault(_POINTER.sub("0x…", text), []).append(r)
        if len(texts) == 1 and len(failed) == self.world_size:
            message = next(iter(texts))  # the same on every rank: say it once, without rank numbers
        else:
            parts = []
            for text, ranks in texts.items():
                who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
                parts.append(f"{who} of {self.world_size}: {text}")
            message = "; ".join(parts)
        raise AgreedError(message, exit_code=max(code for _, (_, code) in failed))

    @contextlib.contextmanager
    def agreed(self):
        """Run a block that may fail on bad input; every rank leaves it the same way (see the module docstring).

        Every rank must enter the block, even a rank with nothing to do in it: the exchange at its end is a
        collective.
        """
        try:
            yield
        except _INPUT_ERRORS as e:
            self.agree(e)
            raise AssertionError("unreachable: agree() raises when this rank failed")  # pragma: no cover
        self.agree(None)

    def fail(self, error: AgreedError) -> int:
        """Print ``error`` once (main rank), let every rank reach the same point, and return the exit status."""
        if self.is_main:
            print(f"{self.prog}: error: {error}", file=sys.stderr, flush=True)
        try:
            self.barrier()  # nobody exits (and gets the others killed by the launcher) before the message is out
        except Exception:
            pass
        self.close()
        return error.exit_code

    def close(self) -> None:
        """End the trackers, then take the process group down on every rank together.

        The trackers (main rank only) are finished directly, not through ``accelerator.end_training()``: that also
        destroys the process group, on the main rank alone, while the other ranks may still be waiting for it.
        Then a barrier: no rank closes its connections while another is still writing or reading (gloo tears its
        sockets down in ``destroy_process_group``, and a peer still inside a collective sees "connection closed").
        """
        if self.trackers_started:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.trackers_started = False
        if self.distributed:
            dist.barrier()
            dist.destroy_process_group()


def die_with_launcher() -> None:
    """Ask the kernel to SIGKILL this process when its parent (the launcher: ``accelerate launch`` / torchrun)
    dies, so that killing the launcher leaves no worker running on, writing outputs (Linux: PR_SET_PDEATHSIG;
    elsewhere a no-op). A parent already gone before the call (the process was re-parented) ends this one now."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent or parent == 1:
        os._exit(1)


def start_runtime(
    *, timeout_s: float = DEFAULT_TIMEOUT_S, log_with: Optional[str] = None, prog: str = "recipe", **accelerator_kwargs
) -> Runtime:
    """Create the ``Accelerator`` with an explicit process group (when launched with several processes).

    ``WORLD_SIZE`` (set by ``accelerate launch`` / torchrun for multi-process runs) decides whether there is a
    group to create: passing a backend to a single, unlaunched process makes accelerate ask for a world size that
    does not exist.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    handlers = []
    if cuda:
        set_nccl_env_defaults()  # read by ProcessGroupNCCL when the group is created below
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        die_with_launcher()
        handlers.append(
            InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        )
    # cpu=True without CUDA: a `--multi_gpu` (torchrun) launch on a GPU-less machine then becomes MULTI_CPU, so
    # accelerate's own main-process-only helpers (trackers, logging, prepare) know they are distributed; left
    # at its default it reports distributed_type NO and runs them on every rank. Not under a DeepSpeed launch:
    # there cpu=True would drop the DeepSpeed plugin (DeepSpeed itself runs on CPU, and is DEEPSPEED already).
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(
        cpu=not cuda and not deepspeed, log_with=log_with, kwargs_handlers=handlers, **accelerator_kwargs
    )
    return Runtime(accelerator, prog=prog)


def wandb_mode() -> str:
    """``online`` when wandb has credentials, else ``offline``; an explicit ``WANDB_MODE`` wins.

    Checked without calling ``wandb.login``, which would prompt for a key on a terminal.
    """
    explicit = os.environ.get("WANDB_MODE")
    if explicit:
        return explicit
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        if os.path.isfile(path) and netrc.netrc(path).authenticators(host):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def start_tracking(rt: Runtime, *, report_to: str, project: str, run_name: Optional[str], config: dict, dir: str) -> None:
    """``accelerator.init_trackers`` on the main rank for ``report_to`` (a no-op for ``none``); wandb runs offline
    without a login (:func:`wandb_mode`), writing under ``dir``/wandb."""
    if report_to == "none" or not rt.is_main:
        return  # trackers live on the main rank only
    init_kwargs = {}
    if report_to == "wandb":
        init_kwargs["wandb"] = {"name": run_name, "dir": dir, "mode": wandb_mode()}
    rt.accelerator.init_trackers(project, config=config, init_kwargs=init_kwargs)
    rt.trackers_started = True


def run_recipe(
    parser: ArgumentParser,
    job: Callable[[Runtime, argparse.Namespace], Any],
    argv: Optional[list[str]] = None,
    accelerator_kwargs: Optional[Callable[[argparse.Namespace], dict]] = None,
) -> int:
    """Parse ``argv``, start the runtime, run ``job(runtime, args)``, and turn agreed errors into an exit status.

    A usage error is also reported through the runtime, so that it too is printed once under a multi-process
    launch. Returns the process exit status (0 on success).
    """
    usage, args = None, None
    try:
        args = parser.parse_args(argv)
        timeout = getattr(args, "timeout", DEFAULT_TIMEOUT_S)
        if not (timeout > 0 and math.isfinite(timeout)):
            # checked before the process group exists: c10d itself crashes on a timeout of 0 or less
            raise UsageError(f"--timeout must be a positive number of seconds, got {timeout}")
    except UsageError as e:
        usage = e
    rt = start_runtime(
        timeout_s=DEFAULT_TIMEOUT_S if usage is not None else getattr(args, "timeout", DEFAULT_TIMEOUT_S),
        log_with=None if args is None or getattr(args, "report_to", "none") == "none" else args.report_to,
        prog=parser.prog,
        **(accelerator_kwargs(args) if accelerator_kwargs is not None and args is not None else {}),
    )
    try:
        with rt.agreed():
            if usage is not None:
                raise usage
        job(rt, args)
    except AgreedError as e:
        return rt.fail(e)
    except RuntimeError as e:
        if not (rt.distributed and _TIMED_OUT.search(str(e))):
            raise  # a bug: keep the traceback
        # A rank stopped or died while this one waited in a collective. The others may never arrive: no barrier,
        # no destroy_process_group (both would wait again); the launcher stops the remaining ranks.
        first = str(e).strip().splitlines()[0][:200]
        print(
            f"{parser.prog}: error: rank {rt.rank} of {rt.world_size} waited --timeout {args.timeout:g} s in a "
            f"collective that another rank never joined (stopped, killed or far slower): {first}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    rt.close()
    return 0

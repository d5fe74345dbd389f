"""Dependency checks: the diffusers range this library is tested against, and the extras the recipes need.

The library itself needs only torch, diffusers, safetensors and numpy. The adapters trust diffusers' classes (a
module is classified by its class) and re-state a few of diffusers' forwards, so a diffusers release outside the
tested range could change one of them without any error: :func:`check_diffusers` warns once, at enable time.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings

# Keep in step with pyproject.toml's `diffusers>=0.42,<0.43`.
TESTED_DIFFUSERS = ((0, 42), (0, 43))  # [low, high)

# What each extra of pyproject.toml provides, as import names.
EXTRAS = {
    "recipes": ("accelerate", "imageio", "imageio_ffmpeg", "skimage", "tqdm", "wandb"),
    "train": ("deepspeed", "transformers"),
    "bench": ("matplotlib",),
    "docs": ("mkdocs", "material"),
}

_warned = False


def _release(version: str) -> tuple:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def diffusers_in_tested_range(version: str) -> bool:
    low, high = TESTED_DIFFUSERS
    return low <= _release(version) < high


def check_diffusers() -> None:
    """Warn once per process when the installed diffusers is outside the tested range."""
    global _warned
    if _warned:
        return
    import diffusers

    _warned = True
    if not diffusers_in_tested_range(diffusers.__version__):
        low, high = TESTED_DIFFUSERS
        warnings.warn(
            f"parallel_vae is tested with diffusers>={low[0]}.{low[1]},<{high[0]}.{high[1]}; diffusers "
            f"{diffusers.__version__} is installed. The family adapters classify diffusers' modules by class and "
            "re-state a few of their forwards, so a changed layer may not raise: check the exactness tests "
            "(tests/test_families.py) against this release, or install a tested diffusers.",
            RuntimeWarning,
            stacklevel=3,
        )


def missing(extra: str) -> list:
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require_extra(extra: str, what: str) -> None:
    """Exit with one line naming the extra to install when ``what`` (a recipe) runs without it."""
    absent = missing(extra)
    if absent:
        sys.stderr.write(
            f"error: {what} needs the [{extra}] extra ({', '.join(absent)} not installed): "
            f"pip install 'parallel_vae[{extra}]' (from a checkout: pip install -e '.[{extra}]')\n"
        )
        raise SystemExit(2)


def import_optional(module: str, extra: str, what: str):
    """Import ``module`` for an optional feature, or raise an ImportError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs {module}, part of the [{extra}] extra: pip install 'parallel_vae[{extra}]'"
        ) from exc

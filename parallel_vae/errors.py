"""The error type for bad user input (files, flags, shapes), as opposed to bugs.

Recipes turn an :class:`InputError` into one clear message and a non-zero exit (see :mod:`parallel_vae.jobs.runtime`);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """A file, flag or tensor shape the user supplied cannot be used; the message says what would work."""

"""Atomic file writes: write a temporary file in the destination folder, then ``os.replace`` it into place.

A reader (or a crash, or an error on the way) never sees half a file: the destination is either the previous
complete file, the new complete file, or absent.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["atomic_path"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str, suffix: str | None = None):
    """Yield a temporary path next to ``path``; on a clean exit it replaces ``path``, on an error it is removed.

    The temporary name ends in ``suffix`` (default: ``path``'s extension), since writers such as ffmpeg pick the
    format from it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if suffix is None:
        suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        # mkstemp creates the file private (0600); give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

"""Atomic file writes: write a temporary file in the destination folder, then ``os.replace`` it into place.

A reader (or a crash, or an error on the way) never sees half a file: the destination is either the previous
complete file, the new complete file, or absent.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["atomic_path", "publish_modes", "clear_stale", "TMP_PREFIX"]

# Every temporary this package writes starts with this, so that the next run can clear what a killed run left.
TMP_PREFIX = ".tmp-"


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
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=folder)
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


def publish_modes(path: str) -> None:
    """Give ``path`` (a file, or a folder and everything under it) the modes a plain ``open()`` / ``mkdir`` would:
    0666 / 0777 less the umask. ``mkstemp`` / ``mkdtemp`` and safetensors create files private (0600 / 0700), which
    a teammate on shared storage cannot read."""
    mask = _umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if not os.path.isdir(path):
        os.chmod(path, file_mode)
        return
    os.chmod(path, dir_mode)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), dir_mode)
        for f in files:
            os.chmod(os.path.join(root, f), file_mode)


def clear_stale(folder: str) -> list[str]:
    """Remove the temporaries (``.tmp-*`` files and folders) a killed run left directly in ``folder``; returns their
    names. Only for folders one run writes at a time (a run's output folder)."""
    import shutil

    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        if not name.startswith(TMP_PREFIX):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed.append(name)
    return removed

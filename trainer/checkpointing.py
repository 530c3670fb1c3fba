"""Crash-safe checkpoint folders: flush every file, then rename the folder into place."""

from __future__ import annotations

import os
import shutil


def _fsync(path: str) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def publish_checkpoint(staged: str, final: str) -> None:
    """Flush the staged files to disk, then rename the folder into place (atomic within one file system)."""
    for folder, _, files in os.walk(staged):
        for file in files:
            _fsync(os.path.join(folder, file))
        _fsync(folder)
    trash = None
    if os.path.exists(final):  # the same step saved again (a run resumed from an earlier checkpoint)
        trash = f"{staged}.replaced"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(staged, final)
    _fsync(os.path.dirname(final))
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    remove_if_empty(os.path.dirname(staged))


def remove_if_empty(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:
        pass

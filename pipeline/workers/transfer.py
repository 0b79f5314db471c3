"""A clip's frames from a GPU worker to the app's process through a file in shared memory (tmpfs).

Pickled through the worker's pipe, a 480x832x49 clip (59 MB; 224 MB at 720x1280x81) is copied four
times, and the app's side reads it in pipe-sized pieces (64 KiB), each of which must take the GIL
back: while another lane's thread runs Python, every piece waits for it, and two lanes receiving at
once slow each other down (measured on 2 cores: 0.27 s for 59 MB alone, 0.56 s beside one busy
thread). Through a file in /dev/shm the worker writes the frames with one write and the app reads
them into its own array with one read, both without the GIL.

The folder belongs to one worker group (made by the app, named with its pid, removed when the group
closes; folders of apps that are gone are removed at the next start). Where there is no /dev/shm
(not Linux) or it is full (a container's default is 64 MB), the frames go through the pipe as before.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import sys
import tempfile
from typing import Any

import numpy as np

from pipeline.workers import protocol as p

log = logging.getLogger(__name__)

SHM_ROOT = "/dev/shm"
PREFIX = "wan-studio-frames-"
FRAMES_DIR_ENV = "WAN_STUDIO_FRAMES_DIR"  # the group's folder, in each worker's environment
MIN_BYTES = 1 << 20  # smaller values (previews, a Load's None) go through the pipe

_names = itertools.count()


def make_dir(root: str = SHM_ROOT) -> str | None:
    """A new folder for one worker group's frames under `root`, or None where there is no tmpfs to
    use (the frames then go through the pipe). Removes the folders of app processes that are gone."""
    if not sys.platform.startswith("linux") or not os.path.isdir(root):
        return None
    _remove_stale(root)
    try:
        return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root)
    except OSError as exc:
        log.info("no folder for frames in %s (%s): frames go through the workers' pipes", root, exc)
        return None


def _remove_stale(root: str) -> None:
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        pid = name[len(PREFIX):].split("-", 1)[0] if name.startswith(PREFIX) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear(folder: str | None) -> None:
    """Remove the files in `folder` (a restarted group: what a killed worker left half-written)."""
    if folder is None:
        return
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            log.debug("could not remove %s", name, exc_info=True)


def remove(folder: str | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def put(value: Any, folder: str | None) -> Any:
    """Worker side: a large array becomes a `FramesFile` in `folder`; anything else, or when the file
    cannot be written (no folder, tmpfs full), stays as it is (it goes through the pipe)."""
    if folder is None or not isinstance(value, np.ndarray) or value.nbytes < MIN_BYTES:
        return value
    array = np.ascontiguousarray(value)
    path = os.path.join(folder, f"{os.getpid()}-{next(_names)}.frames")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserve every page first: a tmpfs that fills up while a mapping or write touches a
            # page it cannot give kills the process (SIGBUS); here it raises ENOSPC instead.
            os.posix_fallocate(fd, 0, array.nbytes)
            with os.fdopen(fd, "wb", closefd=False) as fh:
                array.tofile(fh)
        finally:
            os.close(fd)
    except OSError as exc:
        log.info("frames go through the pipe: cannot write %s (%s)", path, exc)
        _unlink(path)
        return value
    return p.FramesFile(path, tuple(array.shape), array.dtype.str)


def take(value: Any) -> Any:
    """App side: the array a `FramesFile` holds, read into memory of this process and the file
    removed; any other value as it is."""
    if not isinstance(value, p.FramesFile):
        return value
    try:
        # Inside the try: an app without the RAM for the frames (MemoryError) removes the file too.
        dtype = np.dtype(value.dtype)
        count = int(np.prod(value.shape))
        out = np.fromfile(value.path, dtype=dtype, count=count)
        if out.size != count:
            raise OSError(f"{value.path} ended after {out.nbytes} of {count * dtype.itemsize} bytes")
    finally:
        _unlink(value.path)
    return out.reshape(value.shape)


def discard(value: Any) -> None:
    """App side: a reply that will not be used (its job failed on another rank) frees its file."""
    if isinstance(value, p.FramesFile):
        _unlink(value.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        log.debug("could not remove %s", path, exc_info=True)

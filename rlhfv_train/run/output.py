"""A run's output folder: one run at a time (a lock), writable and with room for the next checkpoint, checked before
any work.

The lock is an flock on output_dir/run.lock, which records its holder (pid, host, start time, command). The operating
system drops an flock when its process ends, however it ends (kill -9 too), so a lock left by a dead run is normally
no obstacle; a network file system can keep a crashed machine's lock, hence the message's advice to delete the file
when the holder it names is gone. Within one process the lock is re-entrant: a second train() on the same folder (the
tests, a notebook) takes it again.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import warnings

LOCK_NAME = "run.lock"
_held: dict[str, "OutputLock"] = {}  # realpath of the folder -> this process's lock on it


class FolderBusy(ValueError):
    """Another run holds the output folder."""


class OutputLock:
    def __init__(self, folder: str):
        self.folder, self.path, self._file, self._users = folder, os.path.join(folder, LOCK_NAME), None, 0

    def acquire(self) -> "OutputLock":
        if self._users == 0:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                handle.seek(0)
                holder = handle.read().strip()
                handle.close()
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise FolderBusy(f"{self.folder} is in use by another run ({_describe(holder)}); wait for it to end "
                                 "or pick another --output-dir. If that run is gone (a crashed machine on a network "
                                 f"file system can leave its lock behind), delete {self.path}") from None
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}))
            handle.flush()
            self._file = handle
        self._users += 1
        return self

    def release(self) -> None:
        self._users -= 1
        if self._users == 0 and self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
            _held.pop(os.path.realpath(self.folder), None)


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def claim(folder: str) -> OutputLock:
    """Creates `folder` if needed, checks that files can be written there, and takes its lock (FolderBusy when another
    run has it). Before any work: a read-only or busy folder fails here, not after the data generation."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"--output-dir {folder}: cannot write there ({exc.strerror or exc}); pick a writable "
                         "folder") from None
    key = os.path.realpath(folder)
    lock = _held.get(key) or _held.setdefault(key, OutputLock(folder))
    return lock.acquire()


def check_room(folder: str, *, known: dict[str, int], estimated: int) -> None:
    """Refuses to start when the free space cannot hold one more copy of the files in `known` (name -> bytes of the
    current file: a save writes the new file beside the old one); warns when the size is only `estimated` (no
    checkpoint yet) and the estimate does not fit."""
    free = shutil.disk_usage(folder).free
    need = sum(known.values())
    if known and free < need:
        raise ValueError(f"--output-dir {folder}: {free / 2**20:.1f} MiB free, but the next save needs "
                         f"{need / 2**20:.1f} MiB (the size of {', '.join(sorted(known))}); free some space")
    if not known and free < estimated:
        warnings.warn(f"--output-dir {folder}: {free / 2**20:.1f} MiB free; the first checkpoint is estimated at "
                      f"{estimated / 2**20:.1f} MiB and may not fit (a failed save keeps the previous checkpoint)",
                      RuntimeWarning, stacklevel=2)

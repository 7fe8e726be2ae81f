"""The files a run writes and reads back — checkpoint.pt, sft.pt, ref_cache/refs-*.pt — written whole or not at all,
and verified when read.

Writing (save_verified): torch.save into path + ".tmp", flushed to disk, read back and checked, then os.replace onto
path. A kill, a crash or a full disk at any moment leaves the previous file at path as it was; a failed write raises
SaveFailed, which names the file, the cause and what is still intact.

Reading (load_verified): a torch.save file is a zip archive in which every entry carries the CRC-32 checksum of its
bytes, computed when it was written; every entry is checked against it before torch.load, so a flipped byte, a
truncated or empty file or a damaged header raises DamagedFile (a ValueError: the command-line tools print its one line
and exit with status 2) naming the file, what is wrong and what to do — never a resume on garbage. A read that the disk
or the file system fails (EIO, a permission, a stale network mount) raises UnreadableFile instead: that says nothing of
the file's bytes, and the advice is never to delete it.
"""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import time
import zipfile

import torch


class DamagedFile(ValueError):
    """A file of the run cannot be read back as written."""

    def __init__(self, path: str, problem: str, advice: str):
        super().__init__(f"{path} is damaged ({problem}); {advice}")
        self.path, self.problem, self.advice = path, problem, advice


class SaveFailed(OSError):
    """A file of the run could not be written; what was at its path before is intact."""


class UnreadableFile(OSError):
    """A file of the run could not be read because the disk or the file system failed, not because its bytes are
    wrong: it may well be intact."""

    def __init__(self, path: str, exc: OSError):
        super().__init__(exc.errno, f"could not read {path} ({exc.strerror or exc}): the disk or the file system "
                                    "failed, which says nothing about the file itself; do not delete it. Check the "
                                    "disk or the mount (dmesg, permissions), then run again")
        self.path = path

    def __str__(self) -> str:
        return self.strerror


# errors of the read itself (the device, the permissions, the mount), as opposed to bytes that are not an archive
READ_FAILURES = {errno.EIO, errno.EACCES, errno.EPERM, errno.ENXIO, errno.ENODEV, errno.ESTALE, errno.ETIMEDOUT,
                 errno.EBUSY, errno.ENOMEDIUM, errno.EREMOTEIO}


def _raise_if_read_failed(exc: BaseException, path: str) -> None:
    if isinstance(exc, OSError) and exc.errno in READ_FAILURES:
        raise UnreadableFile(path, exc) from exc


def archive_problem(path: str) -> str | None:
    """None when `path` is a torch.save archive whose entries all match their recorded checksums, else what is wrong
    (UnreadableFile when the read itself fails)."""
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every entry and compares its CRC-32 with the one recorded at write
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        _raise_if_read_failed(exc, path)
        return f"not a readable torch.save archive of {size} bytes: {exc}"
    if bad is not None:
        return f"the checksum of its entry {bad!r} does not match its bytes"
    return None


# what torch.load raises on a damaged file (an unpickler reading garbage can fail in many ways)
LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, ImportError, IndexError,
               pickle.UnpicklingError)


# the files this process verified, with what identified them then: a run checks what --resume will read before any
# work, and reads it much later; one CRC pass over a multi-GB checkpoint is enough while the file stays as it was.
# Only a file last modified over a second before its check is remembered: a write after the check then gives it a
# later modification time even where the file system's clock is coarse
_SETTLED_NS = 10**9
_VERIFIED: dict[str, tuple[int, int, int, int]] = {}


def _identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def verify(path: str, *, advice: str, legacy_ok: bool = False) -> None:
    """Raises DamagedFile(path, what is wrong, `advice`) unless every entry of the torch.save archive at `path`
    matches its checksum (one read of the file, no unpickling; none when this process verified the same file, unchanged
    since: same inode, size and modification time). legacy_ok: a file that is no zip archive at all passes (torch's
    legacy format, in a file the run did not write, e.g. --init-weights); every file a run writes is one."""
    key = os.path.abspath(path)
    identity = _identity(path)
    if _VERIFIED.get(key) == identity:
        return
    try:
        with open(path, "rb") as f:
            archive = f.read(2) in (b"", b"PK")  # a zip archive (or an empty file) from its first bytes, even truncated
    except OSError as exc:
        _raise_if_read_failed(exc, path)
        raise
    problem = archive_problem(path) if archive or not legacy_ok else None
    if problem is not None:
        _VERIFIED.pop(key, None)
        raise DamagedFile(path, problem, advice)
    if time.time_ns() - identity[3] > _SETTLED_NS:
        _VERIFIED[key] = identity


def load_verified(path: str, *, advice: str, legacy_ok: bool = False, map_location="cpu", mmap: bool = False):
    """torch.load of a file written by save_verified (or any torch.save archive), after verify(); raises
    DamagedFile(path, what is wrong, `advice`). mmap: tensors are mapped, not read (to look at the small entries)."""
    verify(path, advice=advice, legacy_ok=legacy_ok)
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except LOAD_ERRORS as exc:
        _raise_if_read_failed(exc, path)
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DamagedFile(path, f"torch.load failed: {first_line}", advice) from None


def save_verified(path: str, state, *, what: str) -> None:
    """Writes `state` to `path` whole or not at all (see the module docstring); `what` names the file in errors
    ("checkpoint", "SFT weights")."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        problem = archive_problem(tmp)
        if problem is not None:
            raise OSError(errno.EIO, f"it reads back wrong ({problem})")
    except (OSError, RuntimeError) as exc:  # a full disk surfaces from torch.save as a RuntimeError
        _failed(exc, tmp, path, what)
    _rename(tmp, path, what)


def write_text_whole(path: str, text: str, *, what: str) -> None:
    """Replaces the text file at `path` by `text`, whole or not at all (a new file, flushed, then renamed over the
    old one): a kill or a full disk at any moment leaves the old file as it was."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        _failed(exc, tmp, path, what)
    _rename(tmp, path, what)


def _rename(tmp: str, path: str, what: str) -> None:
    try:
        os.replace(tmp, path)
    except OSError as exc:
        _failed(exc, tmp, path, what)


def _failed(exc: BaseException, tmp: str, path: str, what: str):
    """Raises SaveFailed for a write of `path` through `tmp` that failed with `exc`, after removing `tmp`."""
    _remove_quietly(tmp)
    kept = f"the previous {what} at {path} is intact" if os.path.exists(path) else f"nothing was at {path} before"
    raise SaveFailed(f"could not write the {what} {path} ({cause_of(exc, path)}); {kept}") from exc


def cause_of(exc: BaseException, path: str) -> str:
    """What made a write of `path` fail, in a few words (with the free space when the disk is full)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "unexpected pos" in str(exc):
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        return f"the disk is full: {free / 2**20:.1f} MiB free"
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass

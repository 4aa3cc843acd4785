"""Writing files so that a reader, or a rerun after a crash, sees the old file or the new one, never half."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

PART_SUFFIX = ".part"
# This machine, as part names record it: a pid means something only on the machine that wrote it.
_HOST = re.sub(r"[^\w-]", "-", socket.gethostname()) or "host"

# Writes that fail for want of room, and how to say so: the run can go on once there is room (exit status 1).
NO_ROOM = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "no disk quota left",
    errno.EFBIG: "the file size limit (ulimit -f) is too small",
}


def no_room(error: BaseException) -> str | None:
    """What ran out when ``error`` is a write that found no room (full disk, quota, file size limit), else None."""
    return NO_ROOM.get(error.errno) if isinstance(error, OSError) else None


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Raise ``PermissionError`` naming ``option`` when the folder ``path`` cannot be written or made, creating
    nothing: its nearest existing ancestor must be a folder this process may write in."""
    path = Path(path)
    existing = next(folder for folder in (path.absolute(), *path.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):  # a read-only file system refuses even root
        why = "it is" if existing == path.absolute() else f"{existing} is"
        raise PermissionError(
            f"cannot write to {path} ({option}): {why} not writable (read-only file system or no permission)"
        )


class FolderLock:
    """Exclusive use of a folder by one process, until ``release()`` or the process ends (``kill -9`` included:
    the kernel drops the lock with the process)."""

    NAME = ".spiking-lm.lock"

    def __init__(self, folder: str | os.PathLike, what: str) -> None:
        path = Path(folder) / self.NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a+")  # noqa: SIM115 (held open for as long as the lock)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip()
            self._file.close()
            raise FileExistsError(
                f"{folder} is in use by another {what}{f' ({holder})' if holder else ''}; wait"
                " for it to end, or choose another folder"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def release(self) -> None:
        self._file.close()


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[IO[bytes]], object]) -> None:
    """Write ``data`` (text, bytes, or a function writing to a binary file) to ``path`` atomically.

    The content goes to a temporary file in the same folder, which is then renamed
    over ``path``: readers, and concurrent writers such as several DDP ranks, only
    ever see a missing or a complete file. Not ``tempfile.mkstemp``: its files are
    private (0600) whatever the umask, and results, caches and checkpoints are meant
    to be shared like any other file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}@{_HOST}.{uuid.uuid4().hex}{PART_SUFFIX}")
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:  # a failed write names no file
            e.filename = str(path)
        raise


# What write_atomic names its temporary files: ".<name>.<writer pid>@<host>.<32 hex digits>.part" (files of
# earlier versions lack "@<host>").
_PART_NAME = re.compile(rf"^\..+\.(?P<pid>\d+)(@(?P<host>[\w-]+))?\.[0-9a-f]{{32}}{re.escape(PART_SUFFIX)}$")


def _running(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def remove_stale_parts(folder: str | os.PathLike, *, idle_s: float = 600.0, max_age_s: float = 86400.0) -> list[Path]:
    """Delete the temporary files that killed ``write_atomic`` calls left in ``folder``; return their paths.

    A part is stale when its writer (the pid and host in its name) was on this machine and no longer runs;
    when it comes from another machine (or names none) and its pid runs nowhere here and nothing has written to
    it for ``idle_s`` seconds, which protects a live writer on another machine sharing the folder; or when it is
    older than ``max_age_s`` whatever its pid says (that pid may have been reused since).
    """
    now = time.time()
    removed = []
    for path in sorted(Path(folder).glob(f".*{PART_SUFFIX}")):
        match = _PART_NAME.match(path.name)
        if match is None:
            continue
        try:
            age = now - path.stat().st_mtime
            gone = not _running(int(match["pid"]))
            if age > max_age_s or gone and (match["host"] == _HOST or age > idle_s):
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # its writer finished, or another cleaner came first
            continue
    return removed

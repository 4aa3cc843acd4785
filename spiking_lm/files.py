"""Writing files so that a reader, or a rerun after a crash, sees the old file or the new one, never half."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

PART_SUFFIX = ".part"


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}{PART_SUFFIX}")
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# What write_atomic names its temporary files: ".<name>.<writer pid>.<32 hex digits>.part".
_PART_NAME = re.compile(rf"^\..+\.(?P<pid>\d+)\.[0-9a-f]{{32}}{re.escape(PART_SUFFIX)}$")


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

    A part is stale when its writer (the pid in its name) no longer runs here and nothing has written to it
    for ``idle_s`` seconds, or when it is older than ``max_age_s`` whatever its pid says. The idle time
    protects a live writer on another machine sharing the folder (a pid means nothing across machines), and
    the age limit a part whose pid has since been reused.
    """
    now = time.time()
    removed = []
    for path in sorted(Path(folder).glob(f".*{PART_SUFFIX}")):
        match = _PART_NAME.match(path.name)
        if match is None:
            continue
        try:
            age = now - path.stat().st_mtime
            if age > max_age_s or (age > idle_s and not _running(int(match["pid"]))):
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # its writer finished, or another cleaner came first
            continue
    return removed

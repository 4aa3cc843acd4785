"""Writing files so that a reader, or a rerun after a crash, sees the old file or the new one, never half."""

from __future__ import annotations

import os
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

"""The atomic writer and the cleanup of the temporary files that killed writers leave behind."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spiking_lm.files import PART_SUFFIX, remove_stale_parts, write_atomic


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _part(folder: Path, name: str, pid: int, age_s: float) -> Path:
    """A temporary file as write_atomic names them, last written ``age_s`` seconds ago."""
    path = folder / f".{name}.{pid}.{'a' * 32}{PART_SUFFIX}"
    path.write_bytes(b"half a file")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_write_atomic_leaves_no_part_on_failure(tmp_path: Path) -> None:
    def crash(f):
        f.write(b"half")
        raise RuntimeError("killed mid-write")

    write_atomic(tmp_path / "x.txt", "old")
    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "x.txt", crash)
    assert (tmp_path / "x.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_remove_stale_parts_spares_live_and_recent_writers(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale = _part(tmp_path, "a.npy", dead, age_s=3600)  # writer gone, untouched for an hour
    fresh_dead = _part(tmp_path, "b.npy", dead, age_s=5)  # no writer here, but written to just now (elsewhere?)
    live = _part(tmp_path, "c.npy", os.getpid(), age_s=3600)  # this process may still be writing it
    ancient = _part(tmp_path, "d.npy", os.getpid(), age_s=3 * 86400)  # its pid has surely been reused since
    unrelated = tmp_path / ".notes.part"
    unrelated.write_text("not ours")
    assert remove_stale_parts(tmp_path) == sorted([stale, ancient])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh_dead.name, live.name, unrelated.name])
    assert remove_stale_parts(tmp_path / "missing") == []

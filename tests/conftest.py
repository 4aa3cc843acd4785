"""Test setup: run Triton kernels under the interpreter on CPU-only machines, keep W&B offline."""

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch

# The interpreter must be chosen before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Runs and caches from tests stay out of the user's home and W&B's servers.
os.environ.setdefault("WANDB_MODE", "offline")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint of 2 tiny training steps, shared by the tests of a module (which only read it)."""
    from test_train import fit

    tmp_path = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPIKING_LM_CACHE_DIR", str(tmp_path / "cache"))
        mp.chdir(tmp_path)
        return fit(tmp_path, steps=2) / "checkpoints" / "last.ckpt"


# W&B's run file (``run-<id>.wandb``) is a leveldb-style log: a 7-byte file header, then 32 KiB blocks of
# records, each a 7-byte header (CRC-32 of type and data, length, type) and its data; a record too long for
# its block is split into FIRST, MIDDLE... and LAST pieces, and a block's last < 7 bytes are padding.
# wandb 0.31 ships no reader of its own.
WANDB_FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
WANDB_BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """The records of a W&B run file, decoded into ``wandb.proto.wandb_internal_pb2.Record`` messages."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:7] == WANDB_FILE_HEADER, f"{path} is not a W&B run file"
    records, pos, pieces = [], 7, b""
    while pos + 7 <= len(data):
        if WANDB_BLOCK - pos % WANDB_BLOCK < 7:
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        body = data[pos + 7:pos + 7 + length]
        assert len(body) == length and zlib.crc32(bytes([kind]) + body) == checksum, f"{path}: bad record at {pos}"
        pos += 7 + length
        if kind in (FIRST, MIDDLE):
            pieces = body if kind == FIRST else pieces + body
            continue
        assert kind in (FULL, LAST), f"{path}: record type {kind} at {pos}"
        record = Record()
        record.ParseFromString(pieces + body if kind == LAST else body)
        records.append(record)
        pieces = b""
    assert pos == len(data), f"{path} ends inside a record"
    return records


def _items(items) -> dict:
    """``HistoryItem``/``SummaryItem``/``ConfigItem`` messages as {key: value}; a nested key (a logged dict, such
    as a histogram's ``_type``, ``bins`` and ``values``) rebuilds the dict."""
    values = {}
    for item in items:
        *outer, key = item.nested_key or [item.key]
        parent = values
        for name in outer:
            parent = parent.setdefault(name, {})
        parent[key] = json.loads(item.value_json)
    return values


class OfflineRun:
    """An offline W&B run folder (``offline-run-*``) read back from its run file."""

    def __init__(self, folder: Path):
        self.folder = folder
        (path,) = folder.glob("run-*.wandb")
        self.records = wandb_records(path)

    def of(self, kind: str) -> list:
        """The records of one kind (``history``, ``summary``, ``config``, ``artifact``, ...), in order."""
        return [getattr(r, kind) for r in self.records if r.WhichOneof("record_type") == kind]

    @property
    def history(self) -> list[dict]:
        """One {key: value} row per ``wandb.log`` call."""
        return [_items(h.item) for h in self.of("history")]

    def logged(self, key: str) -> list:
        """The values of ``key`` over the history, in order."""
        return [row[key] for row in self.history if key in row]

    @property
    def summary(self) -> dict:
        summary = {}
        for update in self.of("summary"):
            summary.update(_items(update.update))
        return summary

    @property
    def config(self) -> dict:
        """The config ``wandb.init`` started with, updated by later ``config`` records."""
        config = {}
        for update in [run.config for run in self.of("run")] + self.of("config"):
            config.update(_items(update.update))
        return config

    def media(self, value: dict) -> Path:
        """The file of a logged image or table (its history value)."""
        return self.folder / "files" / value["path"]


@pytest.fixture
def offline_run():
    """``offline_run(folder)``: the ``OfflineRun`` of a W&B run folder, or of the one run under a folder."""

    def read(folder: Path) -> OfflineRun:
        import wandb

        # run.finish() returns before W&B's service process has written out the run file; a run of this
        # process is complete once the service is shut down (a run in a subprocess, once that exits).
        wandb.teardown()
        if not folder.name.startswith("offline-run-"):
            (folder,) = folder.glob("**/offline-run-*")
        return OfflineRun(folder)

    return read

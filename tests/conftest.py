"""Test setup (Triton under the interpreter on CPU-only machines, W&B offline) and the helpers tests share.

Test modules import the helpers with ``from conftest import ...`` (never from each other): the tiny configs
(``TINY``, ``tiny``), running ``fit`` and reading its losses, expecting a CLI error (``fails``), and the kernel
tests' devices and gradient check. Fixtures: ``isolated`` (a test's own cache and working folder), ``ckpt``
(a shared tiny checkpoint) and ``offline_run`` (a W&B run file read back).
"""

import csv
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

# The interpreter must be chosen before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Runs and caches from tests stay out of the user's home and W&B's servers.
os.environ.setdefault("WANDB_MODE", "offline")

# Imported after the settings above, which must precede triton's and wandb's imports.
from spiking_lm.cli import main  # noqa: E402
from spiking_lm.config import ModelConfig, NeuronConfig  # noqa: E402
from spiking_lm.train.module import LitLM  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KERNEL_DEVICES = [
    d
    if d == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    else pytest.param(
        d,
        marks=pytest.mark.skip(
            reason="CPU tensors reach the kernels only under TRITON_INTERPRET=1, which conftest sets without a GPU"
        ),
    )
    for d in DEVICES
]
FP32_TOL = {"rtol": 1e-5, "atol": 1e-6}
TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


# The CLI in a process of its own, as a user runs it.
SPIKING_LM = [sys.executable, "-m", "spiking_lm.cli"]


def spiking_lm_process(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``spiking-lm ARGV`` in a process of its own (which must succeed), with a W&B service of its own: its W&B
    run file is whole once it exits. WANDB_SERVICE, when earlier tests of this process left it set, can name a
    service that wandb.teardown() has shut down, and a run attached to it is never written."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return subprocess.run([*SPIKING_LM, *argv], check=True, env=env, **kwargs)


def tiny_fit(root) -> list[str]:
    """``spiking-lm`` arguments of a ``configs/tiny.yaml`` fit into the run folder ``root``, without a logger."""
    return ["fit", "--config", TINY, "--trainer.default_root_dir", str(root), "--trainer.logger", "false"]


def tiny(**overrides) -> ModelConfig:
    """A small model config whose neurons fire at initialisation (the default thresholds barely do at this width)."""
    kw = dict(
        vocab_size=16,
        block_size=8,
        n_layer=2,
        n_head=2,
        n_embd=16,
        timesteps=3,
        backend="torch",
        attn_neuron=NeuronConfig(threshold=0.02),
        qkv_neuron=NeuronConfig(threshold=0.05),
        mlp_neuron=NeuronConfig(threshold=0.1),
        proj_in_neuron=NeuronConfig(threshold=0.05),
    )
    return ModelConfig(**{**kw, **overrides})


def fit(tmp_path: Path, *extra: str, steps: int = 6, name: str = "run") -> Path:
    """Run ``spiking-lm fit`` on the tiny config with a CSV logger in ``tmp_path/name``; return that run folder."""
    root = tmp_path / name
    main(
        [
            "fit",
            "--config",
            TINY,
            "--trainer.default_root_dir",
            str(root),
            "--trainer.max_steps",
            str(steps),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir",
            str(root),
            "--trainer.logger.version",
            "0",
            *extra,
        ]
    )
    return root


def metrics_csv(root: Path) -> Path:
    (path,) = root.glob("*/version_0/metrics.csv")
    return path


def logged(root: Path, key: str) -> dict[int, float]:
    """{step: value} of one metric in a run folder's CSV log."""
    with open(metrics_csv(root)) as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def train_losses(root: Path) -> dict[int, float]:
    return logged(root, "train_loss")


def assert_grad_close(got, want, name):
    """Parameter gradients sum over neurons and steps in another order than autograd's, so their error
    scales with the largest entry, not with each (possibly cancelled) one."""
    largest = want.abs().max().item() if name != "x" and want.numel() else 0.0
    atol = max(FP32_TOL["atol"], FP32_TOL["rtol"] * largest)
    torch.testing.assert_close(got, want, rtol=FP32_TOL["rtol"], atol=atol, msg=lambda m: f"grad of {name}: {m}")


def ckpt_step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def fails(capsys, argv: list[str]) -> tuple[int, str]:
    """Run ``spiking-lm argv`` expecting an error exit; return (status, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, err


def poison(monkeypatch, kind: str, steps: set[int]) -> None:
    """Make the training loss (``kind="loss"``) or only its gradient (``"grad"``) NaN at the given steps."""
    forward = LitLM.forward

    def poisoned(self, idx, targets=None, firing=None):
        logits, loss = forward(self, idx, targets, firing)
        if self.training and self.trainer.global_step in steps:
            if kind == "loss":
                loss = loss * float("nan")
            else:  # sqrt'(0) = inf: finite forward, NaN gradient for the tied embedding
                w = self.model.lm_head.weight
                loss = loss + 0 * torch.sqrt(w.sum() - w.sum().detach())
        return logits, loss

    monkeypatch.setattr(LitLM, "forward", poisoned)


class Exploit:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_exploit(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint-shaped file whose unpickling would create ``marker``."""
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Exploit(marker)}, path)
    return path, marker


def first_max(t, dim, keepdim=False):
    """torch.amax whose gradient goes to the first key attaining the max, as the kernels' does."""
    first = t.gather(dim, t.argmax(dim, keepdim=True))
    return first if keepdim else first.squeeze(dim)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """The test's own token cache and working folder (runs write relative paths), both under ``tmp_path``."""
    monkeypatch.setenv("SPIKING_LM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint of 2 tiny training steps, shared by the tests of a module (which only read it)."""
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
        body = data[pos + 7 : pos + 7 + length]
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

"""The ``spiking-lm`` command end to end on CPU: fit, resume, generate, W&B offline, DDP."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spiking_lm.cli import main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def fit(tmp_path: Path, *extra: str, steps: int = 6, name: str = "run") -> Path:
    """Run ``spiking-lm fit`` on the tiny config with a CSV logger; return the run folder."""
    root = tmp_path / name
    main([
        "fit", "--config", TINY,
        "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", str(steps),
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(root),
        "--trainer.logger.version", "0",
        *extra,
    ])
    return root


def metrics_csv(root: Path) -> Path:
    (path,) = root.glob("*/version_0/metrics.csv")
    return path


def train_losses(root: Path) -> dict[int, float]:
    with open(metrics_csv(root)) as f:
        return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(f) if r.get("train_loss")}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKING_LM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("attention,mlp", [("softmax", "gelu"), ("spiking", "lif")])
def test_fit_lowers_the_loss(tmp_path, attention, mlp):
    root = fit(tmp_path, "--model.gpt.attention", attention, "--model.gpt.mlp_activation", mlp,
               "--model.optim.lr", "1e-2", "--trainer.val_check_interval", "20", steps=40)
    losses = list(train_losses(root).values())
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    with open(metrics_csv(root)) as f:
        columns = next(csv.reader(f))
    assert {"val_loss", "val_ppl", "val_bpc", "train/device/items_per_sec", "lr"} <= set(columns)  # tokens/s
    assert ("train_firing_rate/layer0.mlp" in columns) == (mlp == "lif")
    assert (root / "checkpoints" / "last.ckpt").is_file()


def test_resume_continues_the_same_run(tmp_path):
    full = train_losses(fit(tmp_path, steps=8, name="full"))
    # Stop the first leg after 4 of the 8 planned steps, so its LR schedule is the full run's.
    first = fit(tmp_path, "--trainer.limit_train_batches", "4", "--trainer.max_epochs", "1", steps=8,
                name="resumed")
    resumed = train_losses(fit(tmp_path, "--ckpt_path", str(first / "checkpoints" / "last.ckpt"), steps=8,
                               name="resumed"))
    assert min(resumed) <= 4 and max(resumed) == 7
    for step in range(4, 8):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6)


def logged_values(log: bytes, key: str) -> list[float]:
    """Values of one metric in a W&B run file: each history item is the key, then its value as JSON.

    (Protobuf field 16, ``value_json``, is tagged 0x82 0x01 and followed by a one-byte length here.)
    """
    pattern = re.escape(key.encode()) + rb"\x82\x01(.)"
    return [float(log[m.end():m.end() + m.group(1)[0]]) for m in re.finditer(pattern, log, re.DOTALL)]


def _run_cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPIKING_LM_CACHE_DIR": str(tmp_path / "cache"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "spiking_lm.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_wandb_offline_run_holds_firing_rates_and_the_console_stays_clean(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["WANDB_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "spiking_lm.cli", "fit", "--config", TINY],
        cwd=tmp_path, env={**env, "SPIKING_LM_CACHE_DIR": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # stdout is a pipe here: plain progress lines, no bar redrawn with carriage returns.
    assert "\r" not in result.stdout and "\r" not in result.stderr
    assert "step 6/6 | train_loss" in result.stdout and "validation at step 3 |" in result.stdout
    assert "anonymous" not in result.stderr
    runs = list((tmp_path / "runs" / "tiny" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "W&B should have fallen back to an offline run"
    log = runs[0].read_bytes()
    for site in ("layer0.attn", "layer0.mlp", "mean_neuron_weighted", "mean_layer_mean"):
        values = logged_values(log, f"val_firing_rate/{site}")
        assert len(values) >= 2 and all(0.0 <= v <= 1.0 for v in values), (site, values)  # history + summary
    assert len(logged_values(log, "train_loss")) >= 6


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    result = _run_cli(
        tmp_path, "fit", "--config", TINY, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "ddp"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6

"""DDP on 2 CPU processes (gloo): a resume reproduces the uninterrupted run, the training metrics are every rank's,
and the strategies that spawn or fork their processes are refused up front."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import SPIKING_LM, TINY

from spiking_lm.data import TextDataModule

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


@pytest.fixture(autouse=True)
def _setup(isolated, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def fit_command(root, *extra: str) -> list[str]:
    return [
        *SPIKING_LM,
        "fit",
        "--config",
        TINY,
        "--trainer.default_root_dir",
        str(root),
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


def logged(root, key: str) -> dict[int, float]:
    (path,) = root.glob("*/version_0/metrics.csv")
    with open(path) as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


def run(command: list[str], cwd) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def ckpt_step(path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


# Dropout draws random masks every step, a checkpoint every 3 steps and a validation every 4 fall in between.
RESUMABLE = [
    *DDP,
    "--trainer.max_steps",
    "18",
    "--model.gpt.dropout",
    "0.1",
    "--trainer.val_check_interval",
    "4",
    "--checkpoint.every_n_train_steps",
    "3",
]


@pytest.mark.slow
def test_ddp_kill_9_then_resume_matches_the_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    # Its own session, so that the kill reaches the second rank too.
    proc = subprocess.Popen(
        fit_command(killed, *RESUMABLE),
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = killed / "checkpoints" / "last.ckpt"
    try:
        while proc.poll() is None and not (last.is_file() and ckpt_step(last) >= 9):
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    killed_at = ckpt_step(last)
    assert 9 <= killed_at < 18 and killed_at % 3 == 0
    ranks = torch.load(last, weights_only=True)["callbacks"]["TrainingRNG"]["rng_per_rank"]
    assert len(ranks) == 2  # each rank's random stream is in the checkpoint

    run(fit_command(killed, *RESUMABLE, "--ckpt_path", "last"), tmp_path)
    full = tmp_path / "full"
    run(fit_command(full, *RESUMABLE), tmp_path)
    resumed, uninterrupted = logged(killed, "train_loss"), logged(full, "train_loss")
    assert sorted(resumed) == list(range(killed_at, 18))
    for step, loss in resumed.items():
        assert loss == pytest.approx(uninterrupted[step], abs=1e-6), step
    weights = [
        torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for root in (killed, full)
    ]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_ddp_training_metrics_are_every_ranks(tmp_path):
    # Before the first update both ranks hold the same weights: 2 ranks x 4 windows are one process's 8 windows.
    first_step = ["--trainer.max_steps", "1", "--trainer.val_check_interval", "1"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run(fit_command(ddp, *DDP, *first_step), tmp_path)
    run(fit_command(single, *first_step, "--data.batch_size", "8"), tmp_path)
    for key in (
        "train_loss",
        "train_firing_rate/layer0.attn",
        "train_firing_rate/layer0.mlp",
        "train_firing_rate/mean_neuron_weighted",
    ):
        assert logged(ddp, key)[0] == pytest.approx(logged(single, key)[0], rel=1e-5), key


def batches(world: int, rank: int, global_step: int, max_steps: int) -> list[torch.Tensor]:
    data = TextDataModule(source="python-docs", block_size=8, batch_size=2)
    data.trainer = SimpleNamespace(
        accumulate_grad_batches=1, global_step=global_step, max_steps=max_steps, world_size=world, global_rank=rank
    )
    data.setup()
    return [x for x, _ in data.train_dataloader()]


def test_ddp_batches_depend_on_the_step_alone(tmp_path):
    full = [batches(2, rank, 0, 12) for rank in (0, 1)]
    # The first batches do not depend on max_steps; a rank resumed at step 9 sees what it would have seen.
    for rank in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(batches(2, rank, 0, 6), full[rank][:6], strict=True))
        assert all(torch.equal(a, b) for a, b in zip(batches(2, rank, 9, 12)[:3], full[rank][9:], strict=True))
    # Rank r's step n is global batch 2n + r, the batch one process of twice the size would split.
    single = batches(1, 0, 0, 24)
    assert all(torch.equal(full[n % 2][n // 2], single[n]) for n in range(24))


@pytest.mark.slow  # each starts the fit machinery: 25-29 s apiece on the loaded 2-core machine
@pytest.mark.parametrize(
    "strategy",
    [
        ["--trainer.strategy", "ddp_spawn"],
        ["--trainer.strategy", "ddp_fork"],
        ["--trainer.strategy", "lightning.pytorch.strategies.DDPStrategy", "--trainer.strategy.start_method", "spawn"],
    ],
)
def test_spawned_or_forked_processes_are_refused_up_front(tmp_path, strategy):
    result = subprocess.run(
        [
            *SPIKING_LM,
            "fit",
            "--config",
            TINY,
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            *strategy,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "starts its processes by" in result.stderr and "use --trainer.strategy ddp" in result.stderr
    assert result.stderr.startswith("spiking-lm: error: --trainer.strategy") or "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()

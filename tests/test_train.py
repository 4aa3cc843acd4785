"""The ``spiking-lm`` command end to end on CPU: fit, resume, generate, W&B offline, DDP."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from conftest import TINY, fit, metrics_csv, train_losses

from spiking_lm.checkpoint import load_model
from spiking_lm.cli import main

pytestmark = pytest.mark.usefixtures("isolated")


@pytest.mark.parametrize("attention,mlp", [("softmax", "gelu"), ("spiking", "lif")])
@pytest.mark.slow
def test_fit_lowers_the_loss(tmp_path, attention, mlp):
    root = fit(
        tmp_path,
        "--model.gpt.attention",
        attention,
        "--model.gpt.mlp_activation",
        mlp,
        "--model.optim.lr",
        "1e-2",
        "--trainer.val_check_interval",
        "20",
        steps=40,
    )
    losses = list(train_losses(root).values())
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    with open(metrics_csv(root)) as f:
        columns = next(csv.reader(f))
    assert {"val_loss", "val_ppl", "val_bpc", "train/device/items_per_sec", "lr"} <= set(columns)  # tokens/s
    assert ("train_firing_rate/layer0.mlp" in columns) == (mlp == "lif")
    assert ("val_dead_frac/layer0.mlp" in columns) == (mlp == "lif")
    ratios = validation_values(root, "val_energy/ratio_vs_dense")
    assert len(ratios) == 2 and (ratios == [1.0, 1.0]) == (attention == "softmax")  # the baseline is its own dense
    assert (root / "checkpoints" / "last.ckpt").is_file()


def validation_values(root: Path, column: str) -> list[float]:
    with open(metrics_csv(root)) as f:
        return [float(r[column]) for r in csv.DictReader(f) if r.get(column)]


def test_validation_counts_dead_neurons(tmp_path):
    # A threshold no input reaches silences the MLP's neurons; attention's still fire.
    root = fit(tmp_path, "--model.gpt.mlp_neuron.threshold", "1e3", "--trainer.val_check_interval", "2", steps=2)
    assert validation_values(root, "val_dead_frac/layer0.mlp") == [1.0]
    assert validation_values(root, "val_saturated_frac/layer0.mlp") == [0.0]
    assert validation_values(root, "val_dead_frac/layer0.attn")[0] < 1.0


@pytest.mark.slow
def test_resume_continues_the_same_run(tmp_path):
    full = train_losses(fit(tmp_path, steps=8, name="full"))
    # Stop the first leg after 4 of the 8 planned steps, so its LR schedule is the full run's.
    first = fit(tmp_path, "--trainer.limit_train_batches", "4", "--trainer.max_epochs", "1", steps=8, name="resumed")
    resumed = train_losses(
        fit(tmp_path, "--ckpt_path", str(first / "checkpoints" / "last.ckpt"), steps=8, name="resumed")
    )
    assert min(resumed) <= 4 and max(resumed) == 7
    for step in range(4, 8):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6)


def _run_cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPIKING_LM_CACHE_DIR": str(tmp_path / "cache"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "spiking_lm.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _bin_of(histogram: dict, value: float) -> int:
    """Neurons in the bin of a logged ``wandb.Histogram`` that holds ``value``; 0 outside its range."""
    bins, counts = histogram["bins"], histogram["values"]
    inside = [
        n for lo, hi, n in zip(bins[:-1], bins[1:], counts, strict=True) if lo <= value < hi or value == hi == bins[-1]
    ]
    return inside[0] if inside else 0


@pytest.mark.slow
def test_wandb_offline_run_carries_the_science_and_the_console_stays_clean(tmp_path, offline_run):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_DIR=str(tmp_path), WANDB_DATA_DIR=str(tmp_path / "wandb-data"))  # artifacts are staged there
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spiking_lm.cli",
            "fit",
            "--config",
            TINY,
            "--trainer.logger.init_args.log_model",
            "all",
            "--checkpoint.every_n_train_steps",
            "2",
        ],
        cwd=tmp_path,
        env={**env, "SPIKING_LM_CACHE_DIR": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # stdout is a pipe here: plain progress lines, no bar redrawn with carriage returns.
    assert "\r" not in result.stdout and "\r" not in result.stderr
    assert "step 6/6 | train_loss" in result.stdout and "validation at step 3 |" in result.stdout
    assert "anonymous" not in result.stderr
    assert len(list((tmp_path / "runs" / "tiny" / "wandb").glob("offline-run-*"))) == 1, "W&B should be offline"
    run = offline_run(tmp_path / "runs" / "tiny" / "wandb")

    assert len(run.logged("train_loss")) == 6
    validations = [row for row in run.history if "val_loss" in row]
    assert len(validations) == 2  # at steps 3 and 6
    for site in ("layer0.attn", "layer0.mlp", "mean_neuron_weighted", "mean_layer_mean"):
        assert all(0.0 <= row[f"val_firing_rate/{site}"] <= 1.0 for row in validations), site
    assert run.summary["val_loss"] == validations[-1]["val_loss"]
    assert (run.config["energy_preset"], run.config["e_mac_pj"], run.config["e_ac_pj"]) == ("fp32", 4.6, 0.9)
    # Neurons per site: 2 heads (spiking_lm.firing); 4 x 16 MLP channels. Attention (refractory 1, S = 2)
    # fires at most once per token: rate 0.5.
    neurons, top_rate = {"layer0.attn": 2, "layer0.mlp": 64}, {"layer0.attn": 0.5, "layer0.mlp": 1.0}
    for row in validations:
        for site, count in neurons.items():
            histogram = row[f"val_neuron_rate/{site}"]
            assert histogram["_type"] == "histogram" and sum(histogram["values"]) == count
            dead, saturated = row[f"val_dead_frac/{site}"], row[f"val_saturated_frac/{site}"]
            assert 0 <= dead + saturated <= 1
            # The fractions and the histogram are counted apart: dead neurons sit at rate 0, saturated ones at the top.
            assert _bin_of(histogram, 0.0) >= round(dead * count)
            assert _bin_of(histogram, top_rate[site]) >= round(saturated * count)
        all_dead = row["val_dead_frac/all"]
        assert all_dead == pytest.approx(sum(row[f"val_dead_frac/{s}"] * n for s, n in neurons.items()) / 66)
        assert row["val_energy/pj_per_token"] > 0 and row["val_energy/ratio_vs_dense"] == pytest.approx(
            row["val_energy/pj_per_token"] / row["val_energy/dense_pj_per_token"], rel=1e-6
        )
        raster = row["val_raster"]
        image = matplotlib.image.imread(run.media(raster))
        assert raster["_type"] == "image-file" and image.shape[:2] == (raster["height"], raster["width"])

    # log_model all: every checkpoint written is a model artifact, each one that generates on its own (vocabulary
    # inside). last.ckpt is written at steps 2, 4 and 6 (every 2 steps) and after the validations at 3 and 6: at
    # step 6 again, so that it knows the best checkpoint of that validation (issue 19 defect 8).
    artifacts = run.of("artifact")
    assert sorted(json.loads(a.metadata)["original_filename"].split("-val")[0] for a in artifacts) == [
        "best-step3",
        "best-step6",
        "last.ckpt",
        "last.ckpt",
        "last.ckpt",
        "last.ckpt",
        "last.ckpt",
    ]
    for artifact in artifacts:
        assert artifact.type == "model" and "latest" in artifact.aliases
        (entry,) = artifact.manifest.contents
        model, tokenizer, _ = load_model(entry.local_path)
        assert entry.path == "model.ckpt" and tokenizer.vocab_size == model.config.vocab_size > 1


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    result = _run_cli(
        tmp_path,
        "fit",
        "--config",
        TINY,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path / "ddp"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--measure.energy_preset", "fp64", "--measure.energy_preset must be one of fp32, fp16, int8, got 'fp64'"),
        ("--measure.windows", "-1", "--measure.windows and --measure.raster_sites must be >= 0"),
    ],
)
def test_bad_measure_options_are_refused_before_anything_is_written(tmp_path, capsys, option, value, message):
    root = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                TINY,
                "--trainer.logger",
                "false",
                "--trainer.default_root_dir",
                str(root),
                option,
                value,
            ]
        )
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not root.exists()

"""``spiking-lm evaluate`` on tiny checkpoints of both variants, on their own text and on another one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from spiking_lm.cli import main
from spiking_lm.train.export import export

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
# Thresholds at which the tiny model's neurons fire from the start (the defaults barely do at width 16).
FIRING = ["--model.gpt.attn_neuron.threshold", "0.02", "--model.gpt.mlp_neuron.threshold", "0.1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKING_LM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def fit(root: Path, *extra: str) -> Path:
    """Two steps of the tiny config, validated at the end; the last checkpoint."""
    main(["fit", "--config", TINY, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2",
          "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
          "--trainer.logger", "false", *extra])
    return root / "checkpoints" / "last.ckpt"


def evaluate(capsys, ckpt: Path, out: Path, *extra: str) -> tuple[dict, str]:
    capsys.readouterr()
    main(["evaluate", "--ckpt", str(ckpt), "--out", str(out), "--batches", "2", "--no-progress", *extra])
    return json.loads((out / "evaluate.json").read_text()), capsys.readouterr().out


def trainer_val_loss(ckpt: Path) -> float:
    callbacks = torch.load(ckpt, weights_only=True)["callbacks"]
    (state,) = [s for s in callbacks.values() if "current_score" in s]
    return float(state["current_score"])


@pytest.mark.parametrize("attention, mlp", [("softmax", "gelu"), ("spiking", "lif")])
def test_evaluate_reports_every_variant(tmp_path, capsys, attention, mlp):
    ckpt = fit(tmp_path / "run", "--model.gpt.attention", attention, "--model.gpt.mlp_activation", mlp, *FIRING)
    result, table = evaluate(capsys, ckpt, tmp_path / "eval")
    for word in ("val loss", "perplexity", "bits/char", "pJ/token", "lm_head"):
        assert word in table
    # --batches 2 x the checkpoint's batch size are exactly the windows the trainer validated on.
    assert result["val_loss"] == pytest.approx(trainer_val_loss(ckpt), abs=1e-5)
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["bpc"] == pytest.approx(result["val_loss"] / math.log(2))
    assert result["windows"] == 8 and result["tokens"] == 8 * 16 and result["step"] == 2
    assert result["source"] == "python-docs" and result["tokens_per_s"] > 0
    energy = result["energy"]
    assert energy["pj_per_token"] == pytest.approx(energy["mac_per_token"] * 4.6 + energy["ac_per_token"] * 0.9)
    if attention == "softmax":
        assert result["variant"] == "softmax/gelu" and result["timesteps"] == 1
        assert result["firing_rates"] == {} and result["mean_firing_rate"] is None and result["dead_frac"] is None
        assert energy["ac_per_token"] == 0 and energy["ratio_vs_dense"] == pytest.approx(1.0)
    else:
        assert result["variant"] == "spiking/lif" and result["timesteps"] == 2
        assert set(result["firing_rates"]) == set(result["health"]) == {"layer0.attn", "layer0.mlp"}
        assert 0 < result["mean_firing_rate"] < 1 and "layer0.mlp" in table
        assert energy["ac_per_token"] > 0 and energy["ratio_vs_dense"] > 0
        assert all(0 <= h["dead_frac"] <= 1 and 0 <= h["saturated_frac"] <= 1 for h in result["health"].values())

        # Another text, in the checkpoint's vocabulary; then one with a character the vocabulary lacks.
        other = tmp_path / "other.txt"
        other.write_text("The for statement is used to iterate over the elements of a sequence.\n" * 40)
        result, _ = evaluate(capsys, ckpt, tmp_path / "eval_other", "--data.source", str(other))
        assert result["source"] == str(other) and math.isfinite(result["val_loss"])
        # An export folder keeps no data settings: the text must be named.
        folder = export(str(ckpt), str(tmp_path / "export"))
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", "--ckpt", str(folder), "--no-progress"])
        assert exit_info.value.code == 2 and "--data.source" in capsys.readouterr().err
        exported, _ = evaluate(capsys, folder, tmp_path / "eval_export", "--data.source", "python-docs",
                               "--batch-size", "4")
        assert exported["val_loss"] == pytest.approx(trainer_val_loss(ckpt), abs=1e-5) and exported["step"] is None

        other.write_text("\u2603 snow " * 200)
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", "--ckpt", str(ckpt), "--data.source", str(other), "--no-progress"])
        assert exit_info.value.code == 2 and "\u2603" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "missing.ckpt"], "checkpoint not found"),
    (["--ckpt", "missing.ckpt", "--out", "afile"], "is a file"),
    (["--ckpt", "missing.ckpt", "--batches", "0"], "--batches"),
])
def test_evaluate_rejects_bad_input(tmp_path, capsys, argv, message):
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me"

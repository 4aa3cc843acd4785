"""``spiking-lm evaluate`` on tiny checkpoints of every variant, on their own text and on another one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import fit

from spiking_lm.cli import main
from spiking_lm.train.export import export

# Thresholds at which the tiny model's neurons fire from the start (the defaults barely do at width 16).
FIRING = ["--model.gpt.attn_neuron.threshold", "0.02", "--model.gpt.mlp_neuron.threshold", "0.1"]


pytestmark = pytest.mark.usefixtures("isolated")


def trained(tmp_path: Path, *extra: str) -> Path:
    """The last checkpoint of two steps of the tiny config, validated at the end."""
    return fit(tmp_path, "--trainer.val_check_interval", "2", *extra, steps=2) / "checkpoints" / "last.ckpt"


def evaluate(capsys, ckpt: Path, out: Path, *extra: str) -> tuple[dict, str]:
    capsys.readouterr()
    main(["evaluate", "--ckpt", str(ckpt), "--out", str(out), "--batches", "2", "--progress", "false", *extra])
    return json.loads((out / "evaluate.json").read_text()), capsys.readouterr().out


def trainer_val_loss(ckpt: Path) -> float:
    callbacks = torch.load(ckpt, weights_only=True)["callbacks"]
    (state,) = [s for s in callbacks.values() if "current_score" in s]
    return float(state["current_score"])


@pytest.mark.parametrize("mlp", ["gelu", "lif"])
@pytest.mark.parametrize("attention", ["softmax", "spiking", "none"])
@pytest.mark.slow
def test_evaluate_reports_every_variant(tmp_path, capsys, attention, mlp):
    ckpt = trained(tmp_path, "--model.gpt.attention", attention, "--model.gpt.mlp_activation", mlp, *FIRING)
    result, table = evaluate(capsys, ckpt, tmp_path / "eval")
    for word in ("val loss", "perplexity", "bits/char", "pJ/token", "lm_head"):
        assert word in table
    # --batches 2 x the checkpoint's batch size are exactly the windows the trainer validated on.
    assert result["val_loss"] == pytest.approx(trainer_val_loss(ckpt), abs=1e-5)
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["bpc"] == pytest.approx(result["val_loss"] / math.log(2))
    assert result["windows"] == 8 and result["tokens"] == 8 * 16 and result["step"] == 2
    assert result["source"] == "python-docs" and result["tokens_per_s"] > 0
    assert result["variant"] == f"{attention}/{mlp}"
    energy = result["energy"]
    assert energy["pj_per_token"] == pytest.approx(energy["mac_per_token"] * 4.6 + energy["ac_per_token"] * 0.9)
    assert any(name.startswith("layer0.attn.") for name in energy["layers"]) == (attention != "none")
    # the default e_mac / e_ac are the fp32 preset; every preset has its line
    assert energy["presets"]["fp32"]["ratio_vs_dense"] == pytest.approx(energy["ratio_vs_dense"])
    assert all(f"  {name} " in table for name in ("fp32", "fp16", "int8"))
    sites = {f"layer0.{site}" for site, spiking in (("attn", attention == "spiking"), ("mlp", mlp == "lif")) if spiking}
    assert set(result["firing_rates"]) == set(result["health"]) == sites
    if not sites:
        assert result["timesteps"] == 1 and result["mean_firing_rate"] is None and result["dead_frac"] is None
        assert energy["ac_per_token"] == 0
        # The dense counterpart has softmax attention: without attention the model costs less.
        assert (
            energy["ratio_vs_dense"] == pytest.approx(1.0) if attention == "softmax" else energy["ratio_vs_dense"] < 1
        )
    else:
        assert result["timesteps"] == 2 and 0 < result["mean_firing_rate"] < 1
        assert all(site in table for site in sites)
        assert energy["ac_per_token"] > 0 and energy["ratio_vs_dense"] > 0
        assert all(0 <= h["dead_frac"] <= 1 and 0 <= h["saturated_frac"] <= 1 for h in result["health"].values())


def test_evaluate_another_text_and_an_export(tmp_path, capsys):
    ckpt = trained(tmp_path, *FIRING)
    # Another text, in the checkpoint's vocabulary.
    other = tmp_path / "other.txt"
    other.write_text("The for statement is used to iterate over the elements of a sequence.\n" * 40)
    result, table = evaluate(
        capsys, ckpt, tmp_path / "eval_other", "--data.source", str(other), "--memory_pj_per_byte", "160"
    )
    int8 = result["energy"]["presets"]["int8"]
    assert int8["pj_per_token"] == pytest.approx(
        int8["memory_pj_per_token"]
        + int8["compute_ratio_vs_dense"] * (int8["dense_pj_per_token"] - int8["dense_memory_pj_per_token"])
    )
    assert int8["memory_pj_per_token"] == pytest.approx(160 * int8["bytes_per_token"]) and "160 pJ/B" in table
    assert result["source"] == str(other) and math.isfinite(result["val_loss"])
    assert result["unknown_chars"] == {"policy": "error", "count": 0}
    # An export folder keeps no data settings: the text must be named.
    folder = export(str(ckpt), str(tmp_path / "export"))
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--ckpt", str(folder), "--progress", "false"])
    assert exit_info.value.code == 2 and "--data.source" in capsys.readouterr().err
    exported, _ = evaluate(
        capsys, folder, tmp_path / "eval_export", "--data.source", "python-docs", "--batch_size", "4"
    )
    assert exported["val_loss"] == pytest.approx(trainer_val_loss(ckpt), abs=1e-5) and exported["step"] is None


def test_unknown_characters_are_refused_skipped_or_mapped(tmp_path, capsys):
    ckpt = trained(tmp_path)
    vocab = torch.load(ckpt, weights_only=True)["tokenizer"]["chars"]
    assert "\u2603" not in vocab and " " in vocab
    other = tmp_path / "other.txt"
    other.write_text("The for statement \u2603 iterates over a sequence.\n" * 40)  # one unknown per line
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--ckpt", str(ckpt), "--data.source", str(other), "--progress", "false"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "1 character(s) not in the char tokenizer vocabulary: '\u2603'" in err
    assert "--data.unknown skip" in err

    skipped, table = evaluate(capsys, ckpt, tmp_path / "skip", "--data.source", str(other), "--data.unknown", "skip")
    assert skipped["unknown_chars"] == {"policy": "skip", "count": 40}
    assert "40 character(s) of the text outside the vocabulary, skipped" in table
    mapped, table = evaluate(capsys, ckpt, tmp_path / "map", "--data.source", str(other), "--data.unknown", " ")
    assert mapped["unknown_chars"] == {"policy": " ", "count": 40} and "mapped to ' '" in table
    # Skipping shortens the text by the unknown characters; mapping keeps its length.
    assert skipped["windows"] == mapped["windows"] and skipped["val_loss"] != mapped["val_loss"]

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--ckpt", str(ckpt), "--data.source", str(other), "--data.unknown", "\u2603"])
    assert (
        exit_info.value.code == 2
        and "neither one of error, skip nor a character of the vocabulary" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ckpt", "missing.ckpt"], "checkpoint not found"),
        (["--ckpt", "missing.ckpt", "--out", "afile"], "is a file"),
        (["--ckpt", "missing.ckpt", "--batches", "0"], "--batches"),
        (["--ckpt", "missing.ckpt", "--e_mac", ".nan"], "--e_mac nan"),
        (["--ckpt", "missing.ckpt", "--device", "tpu"], "--device tpu: torch knows no such device"),
        (["--ckpt", "missing.ckpt", "--device", "cuda:99"], "--device cuda:99 is not available on this machine"),
        (["--ckpt", "missing.ckpt", "--batch-size", "4"], "--batch-size"),
    ],
)
def test_evaluate_rejects_bad_input(tmp_path, capsys, argv, message):
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("spiking-lm: error: ") and message in err
    assert (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.slow
def test_evaluate_logs_its_json_and_tables_to_wandb(tmp_path, capsys, offline_run):
    ckpt = trained(tmp_path, *FIRING)
    result, _ = evaluate(capsys, ckpt, tmp_path / "eval", "--wandb", "true")
    run = offline_run(tmp_path / "eval" / "wandb")
    summary = run.summary
    assert {key: summary[key] for key in result} == result  # the whole JSON, nested parts included
    assert run.config["checkpoint"] == str(ckpt) and run.config["model"]["n_embd"] == 16
    (row,) = [row for row in run.history if "sites" in row]
    sites = json.loads(run.media(row["sites"]).read_text())
    assert sites["columns"] == ["site", "firing_rate", "neurons", "dead_frac", "saturated_frac", "max_spikes_per_token"]
    assert {r[0]: r[1] for r in sites["data"]} == result["firing_rates"]
    assert {r[0]: r[3] for r in sites["data"]} == {name: h["dead_frac"] for name, h in result["health"].items()}
    layers = json.loads(run.media(row["energy_layers"]).read_text())
    energy_layers = result["energy"]["layers"]
    assert {r[0]: r[3] for r in layers["data"]} == {name: layer["pj"] for name, layer in energy_layers.items()}

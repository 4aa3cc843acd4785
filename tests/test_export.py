"""``spiking-lm export`` and loading its folder: safetensors weights, JSON config and vocabulary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import fails, write_exploit
from safetensors.torch import load_file

from spiking_lm.checkpoint import load_model
from spiking_lm.cli import main


def generate(capsys, model: Path) -> str:
    capsys.readouterr()
    main(["generate", "--ckpt", str(model), "--prompt", "The for", "--max_new_tokens", "40", "--seed", "7"])
    return capsys.readouterr().out


def test_export_then_generate_gives_the_same_text(tmp_path, capsys, ckpt):
    out = tmp_path / "shared"
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    saved = torch.load(ckpt, weights_only=True)
    assert json.loads((out / "config.json").read_text()) == saved["hyper_parameters"]["gpt"]
    assert json.loads((out / "vocab.json").read_text()) == saved["tokenizer"]
    weights = load_file(out / "model.safetensors")
    assert torch.equal(weights["lm_head.weight"], saved["state_dict"]["model.lm_head.weight"])
    assert generate(capsys, out) == generate(capsys, ckpt)

    model, tokenizer, hparams = load_model(str(out))
    assert not model.training and tokenizer.to_dict() == saved["tokenizer"]
    assert hparams == {"gpt": saved["hyper_parameters"]["gpt"]}


def test_export_never_overwrites_without_force(tmp_path, capsys, ckpt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    status, err = fails(capsys, ["export", "--ckpt", str(ckpt), "--out", str(out)])
    assert status == 2 and "is not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--force", "true"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt", "vocab.json"]
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left behind

    status, err = fails(capsys, ["export", "--ckpt", str(ckpt), "--out", str(out / "notes.txt")])
    assert status == 2 and "is a file" in err


@pytest.mark.parametrize("command", ["generate", "export"])
def test_broken_checkpoints_are_refused(tmp_path, capsys, ckpt, command):
    whole = ckpt.read_bytes()
    text, truncated = tmp_path / "notes.ckpt", tmp_path / "truncated.ckpt"
    text.write_text("these are my notes, not a checkpoint")
    truncated.write_bytes(whole[: len(whole) // 2])
    evil, marker = write_exploit(tmp_path)
    for path, message in (
        (text, "is not a readable checkpoint"),
        (truncated, "is not a readable checkpoint"),
        (tmp_path / "missing.ckpt", "checkpoint not found"),
        (evil, "was refused"),
    ):
        argv = ["--ckpt", str(path)] + (["--out", str(tmp_path / "out")] if command == "export" else [])
        status, err = fails(capsys, [command, *argv])
        assert status == 2 and str(path) in err and message in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_an_export_that_does_not_match_its_config_is_refused(tmp_path, capsys, ckpt):
    out = tmp_path / "shared"
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "n_embd": 32}))
    status, err = fails(capsys, ["generate", "--ckpt", str(out)])
    assert status == 2 and "holds weights of another model than config.json describes" in err

    (out / "config.json").write_text(json.dumps({**config, "colour": "blue"}))
    status, err = fails(capsys, ["generate", "--ckpt", str(out)])
    assert status == 2 and "is not a spiking-lm model config" in err and "colour" in err

    (out / "model.safetensors").write_bytes(b"short")
    (out / "config.json").write_text(json.dumps(config))
    status, err = fails(capsys, ["generate", "--ckpt", str(out)])
    assert status == 2 and "model.safetensors is not a readable safetensors file" in err

    (out / "vocab.json").unlink()
    status, err = fails(capsys, ["generate", "--ckpt", str(out)])
    assert status == 2 and f"{out} is not a spiking-lm export: it has no vocab.json" in err


def test_export_files_are_shared_alike(tmp_path, ckpt):
    out = tmp_path / "shared"
    umask = os.umask(0o022)
    try:
        main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    finally:
        os.umask(umask)
    # safetensors alone writes its file 0600.
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "model.safetensors": 0o644,
        "config.json": 0o644,
        "vocab.json": 0o644,
    }


def test_a_vocabulary_of_another_size_is_refused(tmp_path, capsys, ckpt):
    out = tmp_path / "shared"
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    vocab = json.loads((out / "vocab.json").read_text())
    size = len(vocab["chars"])
    for chars in (vocab["chars"][: size // 2], vocab["chars"] + "\u2603"):
        (out / "vocab.json").write_text(json.dumps({**vocab, "chars": chars}))
        status, err = fails(capsys, ["generate", "--ckpt", str(out), "--prompt", vocab["chars"][0]])
        assert status == 2 and f"the vocabulary has {len(chars)} tokens but the model's embedding has {size}" in err
        assert str(out / "vocab.json") in err

"""``spiking-lm export``: a checkpoint's model as safetensors weights plus JSON config and vocabulary."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_model

from spiking_lm.checkpoint import CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE, load_model
from spiking_lm.files import check_writable


def _save_weights(model, path: Path, dest: Path) -> None:
    """``save_model`` to ``path``, its I/O errors raised as the ``OSError`` they are, naming ``dest`` (safetensors
    names neither the file nor the errno)."""
    try:
        save_model(model, str(path))
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        number = int(code[1]) if code else errno.EIO
        raise OSError(number, os.strerror(number), str(dest)) from e


def export(ckpt: str, out: str, force: bool = False) -> Path:
    """Write a checkpoint's model as model.safetensors, config.json and vocab.json.

    generate and evaluate load the folder without unpickling anything. An existing non-empty folder is
    refused unless ``force``; then only those three files are replaced.
    Each file appears whole under its name or not at all.

    Args:
        ckpt: checkpoint written by spiking-lm fit
        out: folder to write (created if missing; must be empty unless --force)
        force: replace the model files of a non-empty --out
    """
    dest = Path(out)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"--out {dest} is a file; give a folder to export into")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise FileExistsError(
            f"--out {dest} is not empty; choose another folder or pass --force to replace"
            f" its {WEIGHTS_FILE}, {CONFIG_FILE} and {VOCAB_FILE}"
        )
    check_writable(dest, "--out")
    model, tokenizer, _ = load_model(ckpt)
    dest.mkdir(parents=True, exist_ok=True)
    # Written beside the destination, then renamed into it: a rename never leaves half a file.
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        _save_weights(model, staging / WEIGHTS_FILE, dest / WEIGHTS_FILE)
        (staging / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2) + "\n", encoding="utf-8")
        (staging / VOCAB_FILE).write_text(json.dumps(tokenizer.to_dict(), ensure_ascii=False) + "\n", encoding="utf-8")
        # safetensors writes its file private (0600); the weights are shared like their config.
        shutil.copymode(staging / CONFIG_FILE, staging / WEIGHTS_FILE)
        for name in (WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE):
            os.replace(staging / name, dest / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"exported {ckpt} to {dest}")
    return dest

"""``spiking-lm export``: a checkpoint's model as safetensors weights plus JSON config and vocabulary."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_model

from spiking_lm.checkpoint import CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE, load_model


def export(ckpt: str, out: str, force: bool = False) -> Path:
    """Write a checkpoint's model as model.safetensors, config.json and vocab.json, loadable by generate and
    evaluate without unpickling anything.

    An existing non-empty folder is refused unless ``force``; then only those three files are replaced.
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
        raise FileExistsError(f"--out {dest} is not empty; choose another folder or pass --force to replace"
                              f" its {WEIGHTS_FILE}, {CONFIG_FILE} and {VOCAB_FILE}")
    model, tokenizer, _ = load_model(ckpt)
    dest.mkdir(parents=True, exist_ok=True)
    # Written beside the destination, then renamed into it: a rename never leaves half a file.
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        save_model(model, str(staging / WEIGHTS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2) + "\n", encoding="utf-8")
        (staging / VOCAB_FILE).write_text(json.dumps(tokenizer.to_dict(), ensure_ascii=False) + "\n",
                                          encoding="utf-8")
        # safetensors writes its file private (0600); the weights are shared like their config.
        shutil.copymode(staging / CONFIG_FILE, staging / WEIGHTS_FILE)
        for name in (WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE):
            os.replace(staging / name, dest / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"exported {ckpt} to {dest}")
    return dest

"""``spiking-lm export``: a checkpoint's model as safetensors weights plus JSON config and vocabulary."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_model

from spiking_lm.checkpoint import CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE, load_model


def export(ckpt: str, out: str, force: bool = False) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``vocab.json`` of ``ckpt`` into the folder ``out``.

    An existing non-empty ``out`` is refused unless ``force``; then only those three files are replaced.
    Each file appears whole under its name or not at all.
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
        for name in (WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE):
            os.replace(staging / name, dest / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="spiking-lm export",
        description="Write a checkpoint's model as model.safetensors, config.json and vocab.json,"
                    " loadable by generate and evaluate without unpickling anything.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint written by spiking-lm fit")
    p.add_argument("--out", required=True, help="folder to write (created if missing; must be empty)")
    p.add_argument("--force", action="store_true", help="replace the model files of a non-empty --out")
    args = p.parse_args(argv)
    print(f"exported {args.ckpt} to {export(args.ckpt, args.out, args.force)}")

"""Loading a trained model and its vocabulary from a checkpoint or an export folder, without running pickled code."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import asdict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors_model

from spiking_lm.config import ModelConfig
from spiking_lm.model import GPT
from spiking_lm.tokenizers import tokenizer_from_dict

# The files of a folder written by ``spiking-lm export``.
WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE = "model.safetensors", "config.json", "vocab.json"


def _refusal_reason(error: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler stumbled on, without torch's advice to load with ``weights_only=False``."""
    paragraphs = [p.strip() for p in str(error).split("\n\n") if p.strip()]
    return " ".join(p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation")))


def read_checkpoint(path: str, mmap: bool = False) -> dict:
    """``torch.load`` with ``weights_only=True``: a pickle that would execute code is refused.

    ``mmap`` maps the tensors instead of reading them, for a quick look at a large checkpoint.
    """
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, CONFIG_FILE)):
            raise IsADirectoryError(
                f"{path} is a spiking-lm export folder, which holds the model alone: training,"
                " validate and test need a checkpoint of spiking-lm fit (a .ckpt file); generate"
                " and evaluate read export folders"
            )
        last = os.path.join(path, "checkpoints", "last.ckpt")
        hint = f" (this looks like a run folder: {last})" if os.path.isfile(last) else ""
        raise IsADirectoryError(f"{path} is a folder; give a checkpoint file{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # torch.save writes a zip archive; a truncated one has lost its directory at the end.
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable checkpoint (truncated or another format)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} was refused: it holds more than tensors and plain values, and loading it could run code"
            f" ({_refusal_reason(e)})"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable checkpoint (truncated or another format): {e}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{path} is not a spiking-lm checkpoint: it has no model weights and settings")
    return ckpt


def _model_config(config: dict, where: str) -> ModelConfig:
    try:
        return ModelConfig(**config)
    except TypeError as e:
        raise ValueError(f"{where} is not a spiking-lm model config: {e}") from e


def _load_checkpoint_file(path: str) -> tuple[GPT, object, dict]:
    ckpt = read_checkpoint(path)
    hparams = ckpt["hyper_parameters"]
    if "tokenizer" not in ckpt or "gpt" not in hparams:
        raise ValueError(f"{path} is not a spiking-lm checkpoint: it lacks the model config or the vocabulary")
    model = GPT(_model_config(hparams["gpt"], path))
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{path} holds weights of another model or config: {e}") from e
    return model, tokenizer_from_dict(ckpt["tokenizer"]), hparams


def _read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{folder} is not a spiking-lm export: it has no {name}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} should hold a JSON object")
    return value


def _load_export(folder: str) -> tuple[GPT, object, dict]:
    config = _model_config(_read_json(folder, CONFIG_FILE), os.path.join(folder, CONFIG_FILE))
    vocab = _read_json(folder, VOCAB_FILE)
    try:
        tokenizer = tokenizer_from_dict(vocab)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(folder, VOCAB_FILE)} is not a spiking-lm vocabulary: {e!r}") from e
    weights = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{folder} is not a spiking-lm export: it has no {WEIGHTS_FILE}")
    model = GPT(config)
    try:
        load_safetensors_model(model, weights)
    except SafetensorError as e:
        raise ValueError(f"{weights} is not a readable safetensors file (truncated or another format): {e}") from e
    except RuntimeError as e:
        raise ValueError(f"{weights} holds weights of another model than {CONFIG_FILE} describes: {e}") from e
    return model, tokenizer, {"gpt": asdict(config)}


def load_model(path: str) -> tuple[GPT, object, dict]:
    """Rebuild the GPT of a ``spiking-lm fit`` checkpoint or a ``spiking-lm export`` folder.

    Returns (model in eval mode, tokenizer, hyperparameters); an export holds only the model's, under ``"gpt"``.
    """
    model, tokenizer, hparams = _load_export(path) if os.path.isdir(path) else _load_checkpoint_file(path)
    bad = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        raise ValueError(
            f"{path} holds non-finite weights (NaN or inf in {', '.join(bad[:3])}"
            f"{' and more' if len(bad) > 3 else ''}): the run diverged before it was saved; use a"
            " checkpoint from before the divergence"
        )
    # Token ids index the embedding: a vocabulary of another size would sample or read past it.
    if tokenizer.vocab_size != model.config.vocab_size:
        where = os.path.join(path, VOCAB_FILE) if os.path.isdir(path) else path
        raise ValueError(
            f"{where}: the vocabulary has {tokenizer.vocab_size} tokens but the model's embedding"
            f" has {model.config.vocab_size}; the vocabulary must be the one the model was trained with"
        )
    return model.eval(), tokenizer, hparams

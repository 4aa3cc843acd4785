"""Loading a trained model and its vocabulary from a Lightning checkpoint, without running pickled code."""

from __future__ import annotations

import os
import pickle
import zipfile

import torch

from spiking_lm.config import ModelConfig
from spiking_lm.model import GPT
from spiking_lm.tokenizers import tokenizer_from_dict


def read_checkpoint(path: str) -> dict:
    """``torch.load`` with ``weights_only=True``: a pickle that would execute code is refused."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} was refused: it is not a plain checkpoint of weights and settings ({e})") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable checkpoint (truncated or another format): {e}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{path} is not a spiking-lm checkpoint: it has no model weights and settings")
    return ckpt


def load_model(path: str) -> tuple[GPT, object, dict]:
    """Rebuild the GPT of a ``spiking-lm fit`` checkpoint; return (model in eval mode, tokenizer, hparams)."""
    ckpt = read_checkpoint(path)
    hparams = ckpt["hyper_parameters"]
    if "tokenizer" not in ckpt or "gpt" not in hparams:
        raise ValueError(f"{path} is not a spiking-lm checkpoint: it lacks the model config or the vocabulary")
    model = GPT(ModelConfig(**hparams["gpt"]))
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{path} holds weights of another model or config: {e}") from e
    return model.eval(), tokenizer_from_dict(ckpt["tokenizer"]), hparams

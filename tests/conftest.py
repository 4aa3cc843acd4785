"""Test setup: run Triton kernels under the interpreter on CPU-only machines, keep W&B offline."""

import os
from pathlib import Path

import pytest
import torch

# The interpreter must be chosen before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Runs and caches from tests stay out of the user's home and W&B's servers.
os.environ.setdefault("WANDB_MODE", "offline")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint of 2 tiny training steps, shared by the tests of a module (which only read it)."""
    from test_train import fit

    tmp_path = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPIKING_LM_CACHE_DIR", str(tmp_path / "cache"))
        mp.chdir(tmp_path)
        return fit(tmp_path, steps=2) / "checkpoints" / "last.ckpt"

"""Test setup: run Triton kernels under the interpreter on CPU-only machines, find the shared data."""

import os
from pathlib import Path

import torch

# The interpreter must be chosen before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests never download: Tiny Shakespeare comes from the shared data folder beside the repository.
_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if _SHARED_DATA.is_dir():
    os.environ.setdefault("SPIKING_LM_DATA_DIR", str(_SHARED_DATA))

# Runs and caches from tests stay out of the user's home and W&B's servers.
os.environ.setdefault("WANDB_MODE", "offline")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

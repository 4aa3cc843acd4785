"""Test setup: run Triton kernels under the interpreter on CPU-only machines, keep W&B offline."""

import os

import torch

# The interpreter must be chosen before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Runs and caches from tests stay out of the user's home and W&B's servers.
os.environ.setdefault("WANDB_MODE", "offline")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

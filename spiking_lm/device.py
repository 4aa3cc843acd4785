"""The device a command runs on, checked before any work starts."""

from __future__ import annotations

import torch


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a torch device that works here; None picks CUDA when available, else the CPU.

    A device torch does not know, or one this machine lacks (``cuda`` without a GPU, ``cuda:3`` on a
    one-GPU machine), raises ``ValueError`` naming it and the devices there are.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = "cpu" + (f", cuda (x{torch.cuda.device_count()})" if torch.cuda.is_available() else "")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: torch knows no such device; devices here: {here}") from None
    try:
        # A device that cannot hold a tensor is no use to a model; meta tensors hold no values.
        torch.empty(0, device=device)
        usable = device.type != "meta"
    except (RuntimeError, AssertionError):
        usable = False
    if not usable:
        raise ValueError(f"--device {name} is not available on this machine; devices here: {here}")
    return device

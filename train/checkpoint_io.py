"""Checkpoint files: written whole or not at all, read without running pickled code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from spiking_lm.checkpoint import read_checkpoint
from spiking_lm.files import no_room, write_atomic
from spiking_lm.train.faults import TrainingFault


class DiskFull(TrainingFault):
    """No room for a checkpoint (full disk, quota, file size limit); the message names the file and what is
    still whole."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all, and read without running pickled code.

    A save goes to a hidden temporary file in the same folder, is flushed to disk, then renamed over
    the target, so a kill at any moment leaves the previous checkpoint intact and no ``*.ckpt`` is
    ever half written. Loading (``--ckpt_path`` included) always uses ``torch.load(weights_only=True)``:
    everything spiking-lm stores is tensors and plain containers, so torch's default allow-list
    suffices, and a file that needs more is refused whatever ``weights_only`` asks for.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            # Remote stores have their own transactions; Lightning's writer uses them.
            super().save_checkpoint(checkpoint, path, storage_options)
            return

        def write(f) -> None:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())

        dest = Path(path)
        try:
            write_atomic(dest, write)
        except OSError as e:
            if (reason := no_room(e)) is None:
                raise
            kept = f"{dest} is unchanged and whole" if dest.is_file() else f"no earlier {dest.name} was there"
            raise DiskFull(f"{reason} to write {dest}: {kept}; make room, then resume with --ckpt_path last") from e
        # The rename itself must reach the disk before an older checkpoint may be deleted.
        folder = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return read_checkpoint(str(path))

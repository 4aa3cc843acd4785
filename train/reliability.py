"""What keeps long runs safe: atomic checkpoints, exact resumes and a guard against non-finite steps."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from spiking_lm.checkpoint import read_checkpoint
from spiking_lm.files import write_atomic


class TrainingFault(RuntimeError):
    """Training cannot go on (e.g. non-finite steps); the message says why and what was kept."""


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
        write_atomic(dest, write)
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


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` follows ``every_n_train_steps`` from the first step and ends at the last.

    Lightning defers step-triggered saves until the monitored metric exists, i.e. until the first
    validation, and skips the final save once any checkpoint was written; a run killed early could then
    not be resumed, and one ending between validations would lose its last steps. So ``last.ckpt`` is
    saved on time anyway (the best-model copy still waits for the metric).
    """

    def _save_last_now(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._every_n_train_steps > 0 and trainer.global_step % self._every_n_train_steps == 0:
            self._save_last_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_now(trainer)


def _rng_state() -> dict[str, Any]:
    """The global torch, CUDA (current device), numpy and Python generators, as tensors and plain values.

    numpy's key is stored as a tensor, not an ndarray, so checkpoints stay loadable with ``weights_only``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class TrainingRNG(Callback):
    """Gives the training steps a random stream of their own, carried in checkpoints.

    Validation and the creation of data loaders draw from the global generators too, and a resumed run
    does those at other moments than an uninterrupted one. So each training batch starts from the
    state the previous one ended with, and that state is what a checkpoint stores: dropout then draws
    the same masks whether or not the run was stopped and resumed in between.
    """

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._state is not None:
            _set_rng_state(self._state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._state = _rng_state()

    def state_dict(self) -> dict[str, Any]:
        return {} if self._state is None else {"rng": self._state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = state_dict.get("rng")


def _describe_sites(model) -> str:
    rates = {name: float(rate) for name, rate in model.firing_rates().items()}
    if not rates:
        return "the model has no spiking sites"
    marks = {0.0: " (silent)", 1.0: " (saturated)"}
    listed = ", ".join(f"{name} {rate:.3f}{marks.get(rate, '')}" for name, rate in rates.items())
    return f"firing rates of the last forward: {listed}"


class NonFiniteGuard:
    """Stops the run at a non-finite loss or gradient, or skips that step, a limited number of times in a row.

    The check runs before the optimizer step, so the parameters and optimizer state are still those of
    the last good step. A skipped step drops every gradient: AdamW then leaves the parameters, its
    moments and its step counters alone, while the learning-rate schedule moves on.
    """

    def __init__(self, skip: bool, max_consecutive_skips: int) -> None:
        self.skip, self.max_consecutive_skips = skip, max_consecutive_skips
        self._bad_loss: torch.Tensor | None = None  # over the micro-batches of the coming optimizer step
        self._skips_in_a_row = 0
        self._skipped = 0

    def observe_loss(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def check(self, module: L.LightningModule) -> None:
        """Before the optimizer step: pass a finite step, drop the gradients of one to skip, or raise."""
        trainer = module.trainer
        bad_loss, self._bad_loss = self._bad_loss, None
        # Under fp16 the grad scaler expects overflowing gradients and skips those steps itself.
        grads = [] if getattr(trainer.precision_plugin, "scaler", None) is not None else [
            (name, p.grad) for name, p in module.named_parameters() if p.grad is not None
        ]
        flags = torch.stack([
            bad_loss if bad_loss is not None else torch.zeros((), dtype=torch.bool, device=module.device),
            *(~torch.isfinite(g).all() for _, g in grads),
        ]).tolist()  # one device sync for the loss and every gradient
        # Every rank must take the same branch, or the next collective hangs.
        if not trainer.strategy.reduce_boolean_decision(any(flags), all=False):
            self._skips_in_a_row = 0
            return
        step = trainer.global_step
        names = [name for (name, _), bad in zip(grads, flags[1:], strict=True) if bad]
        if flags[0]:
            what = "the loss is not finite"
        elif names:
            what = f"gradients are not finite in {', '.join(names[:5])}{' and more' if len(names) > 5 else ''}"
        else:
            what = "another process met a non-finite loss or gradient"
        self._skips_in_a_row += 1
        if self.skip and self._skips_in_a_row <= self.max_consecutive_skips:
            for p in module.parameters():
                p.grad = None
            self._skipped += 1
            module.log("skipped_steps", float(self._skipped))
            rank_zero_warn(f"step {step}: {what}; step skipped ({self._skips_in_a_row} in a row,"
                           f" at most {self.max_consecutive_skips})")
            return
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        kept = (f"the last good checkpoint, {ckpt}, is kept: resume from it with --ckpt_path last"
                if ckpt and os.path.isfile(ckpt) else "no checkpoint had been written yet")
        if self.skip:
            what += f" ({self._skips_in_a_row} non-finite steps in a row)"
            remedy = "e.g. with a lower --model.optim.lr"
        else:
            remedy = "e.g. with a lower --model.optim.lr, or with --model.faults.skip_nonfinite true to skip such steps"
        raise TrainingFault(
            f"training stopped at step {step}: {what}; {_describe_sites(module.model)}."
            f" Nothing of this step was saved; {kept} ({remedy})."
        )


def out_of_memory_message(error: BaseException) -> str:
    """What ran out and which settings lower the memory a step needs."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"out of GPU memory ({first_line}). A step's memory grows with --data.batch_size,"
        " --data.block_size (quadratically under attention) and --model.gpt.timesteps; lower one of them,"
        " keeping the tokens per optimizer step with --trainer.accumulate_grad_batches, or train in"
        " --trainer.precision bf16-mixed."
    )

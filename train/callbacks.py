"""Callbacks of a run: its checkpoints, the random stream of its training steps, and plain progress lines."""

from __future__ import annotations

import os
import random
import sys
from typing import Any, Literal
from weakref import proxy

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from spiking_lm.files import remove_stale_parts


def _moved(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """``ModelCheckpoint`` state with every path under ``old`` re-rooted under ``new``."""

    def move(path):
        return new + path[len(old) :] if isinstance(path, str) and path.startswith(old + os.sep) else path

    state = {key: move(value) for key, value in state.items()}
    state["best_k_models"] = {move(path): score for path, score in state.get("best_k_models", {}).items()}
    state["dirpath"] = new
    return state


class RunCheckpoint(ModelCheckpoint):
    """The run's checkpoints: ``last.ckpt`` on a step schedule, and the best by the monitored metric.

    ``last.ckpt`` keeps that one name (no ``last-v1.ckpt``), so ``--ckpt_path last`` always finds the newest
    state. It is written every ``every_n_train_steps`` from the first step, after each validation and at
    the end, but only while the module calls its state sound (``LitLM.unsound_state``: finite, bounded
    weights and loss), so after a divergence it still holds the state from before it. The best checkpoints
    are Lightning's top-k after each validation. A run copied or moved to another folder tracks the best
    checkpoints of its new folder.

    Args:
        dirpath: folder of the checkpoints; the CLI sets ``<default_root_dir>/checkpoints``.
        filename: name pattern of the best checkpoints.
        monitor: metric that ranks the best checkpoints.
        mode: ``min`` or ``max`` of the monitored metric is best.
        save_top_k: how many best checkpoints to keep (0: none).
        save_last: write ``last.ckpt``; ``link`` is refused, a kill could leave the link missing.
        every_n_train_steps: write ``last.ckpt`` every this many optimizer steps (0: only at validation and end).
        verbose: log each save.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "best-step{step}-val{val_loss:.4f}",
        monitor: str = "val_loss",
        mode: Literal["min", "max"] = "min",
        save_top_k: int = 1,
        save_last: bool | Literal["link"] = True,
        every_n_train_steps: int = 0,
        verbose: bool = False,
    ) -> None:
        if save_last == "link":
            raise ValueError(
                "--checkpoint.save_last link would make last.ckpt a symlink, which a kill during a"
                " save can leave missing; use --checkpoint.save_last true"
            )
        if every_n_train_steps < 0:
            raise ValueError(
                f"--checkpoint.every_n_train_steps must be >= 0 (0: at validation and at the end"
                f" only), got {every_n_train_steps}"
            )
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            verbose=verbose,
            save_last=False,
            save_top_k=save_top_k,
            mode=mode,
            auto_insert_metric_name=False,
        )
        self.write_last, self.every_n_train_steps = save_last, every_n_train_steps
        self._last_step_written: int | None = None
        self._refused = False  # warned once that the state is unsound

    @property
    def last_path(self) -> str:
        return os.path.join(self.dirpath, f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero and os.path.isdir(self.dirpath):
            remove_stale_parts(self.dirpath)  # left by a save that was killed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath and os.path.isdir(self.dirpath):
            state_dict = _moved(state_dict, old, self.dirpath)  # a copied or moved run continues where it now is
        super().load_state_dict(state_dict)

    def write_last_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, again: bool = False) -> None:
        """Write ``last.ckpt`` unless it holds this step already (``again``: even then) or the state is unsound."""
        written = self._last_step_written == trainer.global_step and not again
        if (
            not self.write_last
            or trainer.sanity_checking
            or trainer.fast_dev_run
            or trainer.state.fn != TrainerFn.FITTING
            or written
        ):
            return
        check = getattr(pl_module, "unsound_state", None)
        # Every rank must take the same branch: saving is a collective.
        reason = trainer.strategy.broadcast(check() if check else None)
        if reason is not None:
            if not self._refused:
                kept = (
                    f"{self.last_model_path} keeps step {self._last_step_written}"
                    if self._last_step_written is not None
                    else "none was written yet"
                )
                rank_zero_warn(f"step {trainer.global_step}: {reason}; last.ckpt is not written while it is, {kept}")
            self._refused = True
            return
        trainer.save_checkpoint(self.last_path, self.save_weights_only)
        self.last_model_path, self._last_step_written = self.last_path, trainer.global_step
        for logger in trainer.loggers:  # as ModelCheckpoint does after its saves: W&B's log_model logs it
            logger.after_save_checkpoint(proxy(self))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if os.path.isfile(self.last_path):  # resumed: that file is the state we start from
            self.last_model_path, self._last_step_written = self.last_path, trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        scheduled = self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0
        if scheduled or self._stop_requested(trainer):
            self.write_last_checkpoint(trainer, pl_module)

    @staticmethod
    def _stop_requested(trainer: L.Trainer) -> bool:
        """Whether a SIGTERM reached any process: Lightning stops after this step, so the state is saved now."""
        if trainer.world_size > 1:  # saving is a collective: every rank must decide alike
            return trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False)
        return trainer.received_sigterm

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A SIGTERM (how schedulers and ``timeout`` stop jobs): keep the state, and say which step it holds.

        Stopped during a validation, the step before it is saved now (the training steps save themselves in
        ``on_train_batch_end``); with several processes only there, where the ranks agree on it.
        """
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.world_size == 1:
            self.write_last_checkpoint(trainer, pl_module)
        if self._last_step_written is not None and os.path.isfile(self.last_path):
            exception.add_note(f"{self.last_path} holds step {self._last_step_written}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # Again when a scheduled save wrote this step before the validation: last.ckpt must know the best
        # checkpoint that the validation just wrote, or a resume from it would leave that one behind.
        self.write_last_checkpoint(trainer, pl_module, again=True)

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        # A non-finite validation loss is never among the best (Lightning would rank NaN as inf and save it).
        if current is not None and not torch.isfinite(current).all():
            return False
        return super().check_monitor_top_k(trainer, current)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.write_last_checkpoint(trainer, pl_module)


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
    the same masks whether or not the run was stopped and resumed in between. Under DDP every rank's
    state is stored, and each rank resumes from its own.
    """

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._state is not None:
            _set_rng_state(self._state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._state = _rng_state()

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is made, before rank 0 writes it.
        if not _distributed():
            return {} if self._state is None else {"rng": self._state}
        states: list[dict[str, Any] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, self._state)
        return {} if states[0] is None else {"rng": states[0], "rng_per_rank": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("rng_per_rank") or []
        # Resumed with as many processes: each rank its own state; otherwise the first rank's.
        same_world = _distributed() and len(states) == torch.distributed.get_world_size()
        self._state = states[torch.distributed.get_rank()] if same_world else state_dict.get("rng")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class ProgressLines(ProgressBar):
    """Progress as one plain line about every 5% of the steps and after each validation.

    For a console that is a file or a pipe, where tqdm's bars, redrawn with carriage returns, would
    fill the log with thousands of updates.
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _line(self, trainer: L.Trainer, what: str) -> None:
        metrics = self.get_metrics(trainer, trainer.lightning_module)
        metrics.pop("v_num", None)
        shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        sys.stdout.write(f"{what}{' | ' + shown if shown else ''}\n")
        sys.stdout.flush()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, trainer.max_steps
        every = max(trainer.log_every_n_steps, total // 20 if total > 0 else 0, 1)
        if self._enabled and (step % every == 0 or step == total):
            self._line(trainer, f"step {step}/{total}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._line(trainer, f"validation at step {trainer.global_step}")

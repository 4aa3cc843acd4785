"""Faults during training: non-finite steps, diverging weights, out of memory; and what the user is told."""

from __future__ import annotations

import math
import os
import signal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from spiking_lm.checkpoint import read_checkpoint


class TrainingFault(RuntimeError):
    """Training cannot go on (e.g. non-finite steps); the message says why and what was kept."""


class Terminated(RuntimeError):
    """A SIGTERM stopped the command; the message says what was kept and how to resume."""

    exit_status = 128 + signal.SIGTERM  # what a shell reports for a process that SIGTERM ended


def _describe_sites(rates: dict[str, torch.Tensor]) -> str:
    rates = {name: float(rate) for name, rate in rates.items()}
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

    def __init__(self, skip: bool, max_consecutive_skips: int, max_abs_weight: float) -> None:
        self.skip, self.max_consecutive_skips, self.max_abs_weight = skip, max_consecutive_skips, max_abs_weight
        self._bad_loss: torch.Tensor | None = None  # over the micro-batches of the coming optimizer step
        self._last_loss: torch.Tensor | None = None
        self._skips_in_a_row = 0
        self._skipped = 0
        self._steps = 0  # optimizer steps checked in this process, skipped ones included

    def observe_loss(self, loss: torch.Tensor) -> None:
        self._last_loss = loss.detach()
        bad = ~torch.isfinite(self._last_loss)
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def unsound(self, module: L.LightningModule) -> str | None:
        """Why the current weights are not worth a checkpoint (diverged), or None when they are.

        Sound: every weight finite and within ``max_abs_weight``, and the last training loss finite and
        at most twice a uniform guess's (2 ln V), which a model that still learns never exceeds.
        """
        largest = max(p.detach().abs().max() for p in module.parameters())  # NaN propagates through max
        if not largest <= self.max_abs_weight:
            return f"the weights diverged (max |w| = {float(largest):.3g}, bound {self.max_abs_weight:g})"
        if self._last_loss is not None:
            loss, bound = float(self._last_loss), 2 * math.log(module.model.config.vocab_size)
            if not loss <= bound:
                return f"the training loss diverged ({loss:.4g}, above 2 ln(vocab size) = {bound:.3g})"
        return None

    def check_outcome(self, module: L.LightningModule, val_loss: float | None, last_checkpoint: str | None) -> None:
        """After training: raise when the run learned nothing usable (every step skipped, a NaN validation, or
        weights that diverged)."""
        if last_checkpoint and os.path.isfile(last_checkpoint):
            kept = (
                f"{last_checkpoint} holds step {read_checkpoint(last_checkpoint, mmap=True)['global_step']},"
                " from before: resume from it with --ckpt_path last and a lower --model.optim.lr"
            )
        else:
            kept = (
                "no sound checkpoint was written: --ckpt_path last starts the run over (with a lower --model.optim.lr)"
            )
        if self._steps and self._skipped == self._steps:
            raise TrainingFault(
                f"all {self._steps} training steps of this run were skipped as non-finite, so the"
                f" model did not train; {kept}"
            )
        if val_loss is not None and not math.isfinite(val_loss):
            raise TrainingFault(
                f"the final validation loss is {val_loss}: the model diverged ({self._skipped} steps skipped); {kept}"
            )
        if (reason := self.unsound(module)) is not None:
            raise TrainingFault(f"training ended, but {reason}; {kept}")

    def check(self, module: L.LightningModule) -> None:
        """Before the optimizer step: pass a finite step, drop the gradients of one to skip, or raise."""
        trainer = module.trainer
        bad_loss, self._bad_loss = self._bad_loss, None
        # Under fp16 the grad scaler expects overflowing gradients and skips those steps itself.
        grads = (
            []
            if getattr(trainer.precision_plugin, "scaler", None) is not None
            else [(name, p.grad) for name, p in module.named_parameters() if p.grad is not None]
        )
        flags = torch.stack(
            [
                bad_loss if bad_loss is not None else torch.zeros((), dtype=torch.bool, device=module.device),
                *(~torch.isfinite(g).all() for _, g in grads),
            ]
        ).tolist()  # one device sync for the loss and every gradient
        # Every rank must take the same branch, or the next collective hangs.
        self._steps += 1
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
            rank_zero_warn(
                f"step {step}: {what}; step skipped ({self._skips_in_a_row} in a row,"
                f" at most {self.max_consecutive_skips})"
            )
            return
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        step_of = read_checkpoint(ckpt, mmap=True)["global_step"] if ckpt and os.path.isfile(ckpt) else None
        kept = (
            f"the last sound checkpoint, {ckpt} (step {step_of}), is kept: resume from it with --ckpt_path last"
            if step_of is not None
            else "no sound checkpoint had been written yet: --ckpt_path last starts over"
        )
        if self.skip:
            what += f" ({self._skips_in_a_row} non-finite steps in a row)"
            remedy = "e.g. with a lower --model.optim.lr"
        else:
            remedy = "e.g. with a lower --model.optim.lr, or with --model.faults.skip_nonfinite true to skip such steps"
        raise TrainingFault(
            f"training stopped at step {step}: {what}; {_describe_sites(module.last_rates)}."
            f" Nothing of this step was saved; {kept} ({remedy})."
        )


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed, on the GPU or in main memory."""
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)
    )


def out_of_memory_message(error: BaseException, command: str | None = None) -> str:
    """What ran out and which settings of ``command`` (fit by default) lower the memory a step needs."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    first_line = first_line.split("DefaultCPUAllocator: ")[-1]  # drop the allocator's source location
    device = "GPU" if isinstance(error, torch.cuda.OutOfMemoryError) else "CPU"
    if command == "evaluate":
        return (
            f"out of {device} memory ({first_line}). A batch's memory grows with --batch_size (windows per"
            " batch; the checkpoint's by default), the model's block size and timesteps: lower --batch_size,"
            " or evaluate with --device cpu"
        )
    return (
        f"out of {device} memory ({first_line}). A step's memory grows with --data.batch_size,"
        " --data.block_size (quadratically under attention) and --model.gpt.timesteps; lower one of them,"
        " keeping the tokens per optimizer step with --trainer.accumulate_grad_batches, or train in"
        " --trainer.precision bf16-mixed."
    )

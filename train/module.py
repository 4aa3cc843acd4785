"""The LightningModule that trains a ``GPT`` (spiking or softmax) as a character/byte language model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from spiking_lm.config import ModelConfig
from spiking_lm.firing import FiringCounts
from spiking_lm.model import GPT
from spiking_lm.train.callbacks import TrainingRNG
from spiking_lm.train.curriculum import CurriculumConfig, SiteCurriculum
from spiking_lm.train.distill import DistillConfig, Teacher, distill_loss
from spiking_lm.train.faults import NonFiniteGuard
from spiking_lm.train.lightning_adapter import FitThroughputMonitor

WANDB_RUN_ID = "wandb_run_id"
"""Checkpoint key of the W&B run a checkpoint was logged to."""


@dataclass
class OptimConfig:
    """AdamW with warm-up then cosine decay, stepped every optimizer step."""

    lr: float = 1e-3
    """Peak learning rate, reached at the end of warm-up."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay (the trainer's max_steps)."""
    warmup_steps: int = 100
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to weight matrices and embeddings only."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    neuron_lr: float | None = None
    """Peak learning rate of the neurons' own parameters (learned thresholds, decays and amplitudes), on the same
    schedule scaled to it; None trains them at lr. Thresholds move little at lr (issue 17)."""

    def __post_init__(self):
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"optim needs lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.neuron_lr is not None and not self.neuron_lr > 0:
            raise ValueError(f"optim.neuron_lr must be > 0 or None, got {self.neuron_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"optim.weight_decay must be finite and >= 0, got {self.weight_decay}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"optim.betas must each be in [0, 1), got {self.betas}")


@dataclass
class FiringConfig:
    """Firing-rate regularizer: weight * sum over sites of (rate - target)^2, added to the loss."""

    reg_weight: float = 0.0
    """Weight lambda of the regularizer; 0 turns it off (and keeps no graph for it)."""
    target: float = 0.1
    """Firing rate each site is pulled toward."""

    def __post_init__(self):
        if self.reg_weight < 0 or not 0 <= self.target <= 1:
            raise ValueError(f"firing needs reg_weight >= 0 and target in [0, 1], got {self.reg_weight}, {self.target}")


@dataclass
class FaultConfig:
    """What a step with a non-finite loss or gradient does: stop the run (default) or skip the step."""

    skip_nonfinite: bool = False
    """Skip such a step (no parameter or optimizer update) instead of stopping the run."""
    max_consecutive_skips: int = 10
    """Stop anyway after this many skipped steps in a row."""
    max_abs_weight: float = 1e4
    """last.ckpt is written only while every weight is finite and at most this large in magnitude (and the
    loss finite and below 2 ln(vocab size)), so after a divergence it still holds the state from before."""

    def __post_init__(self):
        if self.max_consecutive_skips < 1:
            raise ValueError(f"faults.max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")
        if not 0 < self.max_abs_weight < math.inf:
            raise ValueError(f"faults.max_abs_weight must be finite and > 0, got {self.max_abs_weight}")


def _flat(settings: dict, prefix: str = ""):
    """(dotted name, value) of nested settings, e.g. ``mlp_neuron.beta``."""
    for key, value in settings.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _batch_size(batch) -> int:
    return batch[0].size(0)


def _tokens(batch) -> int:
    return batch[0].numel()


def _config(cls, value):
    """A fresh dataclass from an instance (the CLI; the defaults are shared) or a dict (checkpoint hparams)."""
    return cls(**(asdict(value) if isinstance(value, cls) else value))


class LitLM(L.LightningModule):
    """Trains a GPT from ``spiking_lm.model`` and logs loss, perplexity, bits per symbol and firing rates.

    Args:
        gpt: the architecture; ``vocab_size`` is filled in from the data module.
        optim: optimizer and learning-rate schedule.
        firing: the firing-rate regularizer.
        faults: what to do at a non-finite loss or gradient.
        distill: knowledge distillation from a trained teacher checkpoint.
        curriculum: when the spike-driven input sites (or the Q/K/V neurons) switch on.
        compile: run the model through ``torch.compile``.
    """

    def __init__(
        self,
        gpt: ModelConfig = ModelConfig(),
        optim: OptimConfig = OptimConfig(),
        firing: FiringConfig = FiringConfig(),
        faults: FaultConfig = FaultConfig(),
        distill: DistillConfig = DistillConfig(),
        curriculum: CurriculumConfig = CurriculumConfig(),
        compile: bool = False,
    ):
        super().__init__()
        gpt, optim, firing = _config(ModelConfig, gpt), _config(OptimConfig, optim), _config(FiringConfig, firing)
        faults, distill = _config(FaultConfig, faults), _config(DistillConfig, distill)
        curriculum = _config(CurriculumConfig, curriculum)
        self.save_hyperparameters(
            {
                "gpt": asdict(gpt),
                "optim": asdict(optim),
                "firing": asdict(firing),
                "faults": asdict(faults),
                "distill": asdict(distill),
                "curriculum": asdict(curriculum),
                "compile": compile,
            }
        )
        self.gpt_config, self.optim, self.firing = gpt, optim, firing
        self.guard = NonFiniteGuard(faults.skip_nonfinite, faults.max_consecutive_skips, faults.max_abs_weight)
        self.model = GPT(gpt)
        curriculum.check(self.model)
        self.curriculum = curriculum
        self.last_rates: dict[str, torch.Tensor] = {}  # of the last training step, for a fault's message
        if compile:
            self.model.compile()  # in place, so checkpoints keep the plain parameter names
        self.distill = distill
        # Not a submodule: the teacher is neither trained nor saved in the student's checkpoints.
        self.__dict__["teacher"] = Teacher(distill.teacher) if distill.teacher else None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, firing: FiringCounts | None = None):
        return self.model(idx, targets, firing=firing)

    def configure_callbacks(self):
        # Here rather than in the CLI, so that any trainer of this module resumes exactly and logs tokens/s
        # (as train/items_per_sec, averaged over the last 10 optimizer steps).
        callbacks = [TrainingRNG(), FitThroughputMonitor(batch_size_fn=_batch_size, length_fn=_tokens, window_size=10)]
        if self.curriculum.sites_from_step:
            callbacks.append(SiteCurriculum(self.curriculum.sites_from_step, self.curriculum.sites))
        return callbacks

    # Read by ThroughputMonitor, which warns when it is missing. Not estimated: a spiking layer's work
    # depends on its firing (see eval/energy.py), not on the parameter count alone.
    flops_per_batch = None

    def unsound_state(self) -> str | None:
        """Why the current state must not become ``last.ckpt`` (it diverged), or None."""
        return self.guard.unsound(self)

    def on_fit_start(self):
        self.log_param_count()
        if self.teacher is not None:
            self.teacher.check_vocab(self.trainer.datamodule.tokenizer.to_dict())
            self.teacher.model.to(self.device)

    def log_param_count(self):
        n = self.model.num_params()
        for logger in self.loggers:
            logger.log_hyperparams({"params": n})

    def _log_firing(self, prefix: str, firing: FiringCounts, on_step: bool):
        if on_step and self.trainer.world_size > 1:
            firing = self._all_ranks(firing)
        rates = firing.rates()
        if not rates:
            return
        metrics = {f"{prefix}firing_rate/{site}": rate for site, rate in rates.items()}
        for kind, rate in firing.mean_rate().items():
            metrics[f"{prefix}firing_rate/mean_{kind}"] = rate
        self.log_dict(metrics, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)

    def _all_ranks(self, firing: FiringCounts) -> FiringCounts:
        """The counts of every rank's forward summed, so that the rates are formed from them all (validation's
        epoch means are synced by ``log_dict``). Every rank's batch has the same shape, so the same neuron-steps."""
        spikes = self.all_gather(torch.stack([site.spikes for site in firing.sites.values()]).double()).sum(0)
        world = self.trainer.world_size
        summed = FiringCounts()
        for (name, site), count in zip(firing.sites.items(), spikes, strict=True):
            summed.add(name, count, site.neuron_steps * world, site.timesteps)
        return summed

    def training_step(self, batch, batch_idx):
        x, y = batch  # (B, L), (B, L)
        # Differentiable counts only for the regularizer, so no graph is kept for them otherwise.
        firing = FiringCounts(rate_grad=self.firing.reg_weight > 0)
        logits, loss = self(x, y, firing)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)  # the mean over the ranks' batches
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits, _ = self.teacher.model(x)  # (B, L, V)
            kd = distill_loss(logits, teacher_logits, self.distill.temperature)
            self.log("train_distill_loss", kd)
            loss = (1 - self.distill.weight) * loss + self.distill.weight * kd
        if self.firing.reg_weight > 0:
            penalty = firing.penalty(self.firing.target)
            self.log("train_rate_penalty", penalty)
            loss = loss + self.firing.reg_weight * penalty
        self._log_firing("train_", firing, on_step=True)
        self.last_rates = firing.rates()
        self.log("lr", self.lr_schedulers().get_last_lr()[0])
        self.guard.observe_loss(loss)
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.guard.check(self)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        firing = FiringCounts()
        _, loss = self(x, y, firing)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self._log_firing("val_", firing, on_step=False)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self(x, y)
        self.log("test_loss", loss, sync_dist=True)
        return loss

    def _log_derived(self, split: str):
        loss = self.trainer.callback_metrics.get(f"{split}_loss")
        if loss is None:
            return
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        unit = {"byte": "bpb", "subword": "bpt"}.get(getattr(tokenizer, "kind", "char"), "bpc")
        self.log(f"{split}_ppl", torch.exp(loss))
        self.log(f"{split}_{unit}", loss / math.log(2))

    def on_validation_epoch_end(self):
        self._log_derived("val")

    def on_test_epoch_end(self):
        self._log_derived("test")

    def _param_groups(self) -> list[dict]:
        """(decay, no_decay) and, with ``optim.neuron_lr`` set, a third group of the neurons' own parameters."""
        neuron = set(self.model.neuron_parameters()) if self.optim.neuron_lr is not None else set()
        params = [p for p in self.model.parameters() if p.requires_grad and p not in neuron]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.optim.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        if neuron:
            groups.append({"params": list(neuron), "weight_decay": 0.0, "lr": self.optim.neuron_lr})
        return groups

    def _base_lrs(self, groups: int) -> list[float]:
        return [self.optim.lr, self.optim.lr, self.optim.neuron_lr or self.optim.lr][:groups]

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self._param_groups(), lr=self.optim.lr, betas=self.optim.betas, fused=torch.cuda.is_available()
        )
        total = self.trainer.max_steps
        if total is None or total < 1:
            raise ValueError("set --trainer.max_steps: the cosine learning-rate schedule decays over it")
        o = self.optim

        def lr_factor(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / (o.warmup_steps + 1)
            progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
            return (o.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (o.lr - o.min_lr)) / o.lr

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        # The vocabulary travels with the weights so generate/evaluate need no data.
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and getattr(dm, "tokenizer", None) is not None:
            checkpoint["tokenizer"] = dm.tokenizer.to_dict()
        # A resumed run logs into the same W&B run (see the CLI).
        for logger in self.loggers:
            if isinstance(logger, WandbLogger) and logger.version is not None:
                checkpoint[WANDB_RUN_ID] = logger.version
                break

    def on_load_checkpoint(self, checkpoint):
        self.check_same_model(checkpoint)
        self._apply_optim_settings(checkpoint)

    def check_same_model(self, checkpoint) -> None:
        """Refuse a checkpoint of another architecture (the CLI asks before a resume starts anything).

        Settings that change no tensor (dropout, optimizer, backend) may differ on resume; shapes may not.
        """
        mine = {k: v.shape for k, v in self.state_dict().items()}
        theirs = {k: v.shape for k, v in checkpoint["state_dict"].items()}
        if mine != theirs:
            saved = dict(_flat(checkpoint["hyper_parameters"].get("gpt", {})))
            differ = [
                f"{k}={saved[k]!r} there, {v!r} here"
                for k, v in _flat(asdict(self.gpt_config))
                if k in saved and saved[k] != v
            ]
            raise ValueError(
                "the checkpoint holds another model than this run builds"
                + (f" ({'; '.join(differ)})" if differ else "")
                + ": resume with the settings it was trained with, or start a new run in another"
                " --trainer.default_root_dir"
            )

    def _apply_optim_settings(self, checkpoint) -> None:
        """Make this run's optimizer settings win over the checkpoint's; its moments and step counts carry over.

        The learning-rate schedule restarts from the checkpoint's ``base_lrs``, so those are replaced, and the
        current learning rate is scaled with them.
        """
        for sched in checkpoint.get("lr_schedulers", []):
            sched["base_lrs"] = self._base_lrs(len(sched.get("base_lrs", [])))
        for state in checkpoint.get("optimizer_states", []):
            # (decay, no_decay[, neuron]), as configure_optimizers builds them
            for group, lr in zip(state["param_groups"], self._base_lrs(len(state["param_groups"])), strict=True):
                group["lr"] *= lr / group["initial_lr"]  # initial_lr: the schedule's base, set by LambdaLR
                group.update(initial_lr=lr, betas=self.optim.betas)
            state["param_groups"][0]["weight_decay"] = self.optim.weight_decay

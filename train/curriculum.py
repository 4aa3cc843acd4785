"""A curriculum for spike-driven models: train on real inputs first, then switch the input sites on."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import lightning as L

from spiking_lm.model import GPT


@dataclass
class CurriculumConfig:
    """When the spike-driven input sites start firing; off (on from the first step) by default."""

    sites_from_step: int = 0
    """Optimizer step from which the spike-driven input sites (``spiking_qkv_in``/``proj_in``/``fc_in``) fire.
    Before it they pass their real input through, so the model first learns as the spiking default, then goes on
    with its inputs as spikes, in the same run and learning-rate schedule (fine-tuning into the spike code, as
    quantisation-aware training starts from a trained float model). Validation always runs with the sites, so
    every val_loss and checkpoint is the spike-driven model's. 0: the sites fire from the start."""

    def __post_init__(self):
        step = self.sites_from_step
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"curriculum.sites_from_step must be an integer >= 0, got {step!r}")

    def check(self, model: GPT) -> None:
        if self.sites_from_step and not model.input_sites():
            raise ValueError(
                f"curriculum.sites_from_step is {self.sites_from_step}, but the model has no spike-driven input "
                "site to switch on: set spiking_qkv_in, spiking_proj_in or spiking_fc_in, or leave it at 0"
            )


class SiteCurriculum(L.Callback):
    """Keeps the model's input sites passing their input through for training steps before ``sites_from_step``."""

    def __init__(self, sites_from_step: int):
        self.sites_from_step = sites_from_step
        self.sites = []

    def setup(self, trainer, pl_module, stage):
        self.sites = pl_module.model.input_sites()  # once, not on every training step

    def _passthrough(self, on: bool) -> None:
        for site in self.sites:
            site.passthrough = on

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._passthrough(trainer.global_step < self.sites_from_step)

    def on_validation_start(self, trainer, pl_module):
        self._passthrough(False)

    def on_fit_end(self, trainer, pl_module):
        self._passthrough(False)

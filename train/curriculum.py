"""A curriculum for spike-driven models: train on real inputs first, then switch the input sites on."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import lightning as L

from spiking_lm.model import GPT, INPUT_SITES

# The kinds of LIF site that can pass their input through: the spike-driven inputs of linear layers and the
# Q/K/V neurons. The others are the model's nonlinearities (attention's score neurons, the MLP's activation).
SWITCHABLE_SITES = ("qkv_in", "qkv", "proj_in", "fc_in")


@dataclass
class CurriculumConfig:
    """When the spike-driven input sites start firing; off (on from the first step) by default."""

    sites_from_step: int = 0
    """Optimizer step from which the ``sites`` fire. Before it they pass their real input through, so the model
    first learns as the spiking default, then goes on with its inputs as spikes, in the same run and
    learning-rate schedule (fine-tuning into the spike code, as quantisation-aware training starts from a
    trained float model). Validation always runs with the sites, so every val_loss and checkpoint is the
    spike-driven model's. 0: the sites fire from the start."""

    sites: list[str] = field(default_factory=lambda: list(INPUT_SITES))
    """The kinds of site held off until ``sites_from_step``, from qkv_in, qkv (the Q/K/V neurons of
    ``spiking_qkv``), proj_in and fc_in; by default the spike-driven inputs."""

    def __post_init__(self):
        step = self.sites_from_step
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"curriculum.sites_from_step must be an integer >= 0, got {step!r}")
        unknown = [kind for kind in self.sites if kind not in SWITCHABLE_SITES]
        if unknown or not self.sites:
            raise ValueError(
                f"curriculum.sites must name sites from {', '.join(SWITCHABLE_SITES)}, got {list(self.sites)!r}"
            )

    def check(self, model: GPT) -> None:
        if self.sites_from_step and not model.sites_of(self.sites):
            raise ValueError(
                f"curriculum.sites_from_step is {self.sites_from_step}, but the model has no site of the kinds in "
                f"curriculum.sites ({', '.join(self.sites)}) to switch on: set spiking_qkv_in, spiking_proj_in, "
                "spiking_fc_in or spiking_qkv to match, or leave sites_from_step at 0"
            )


class SiteCurriculum(L.Callback):
    """Keeps the model's ``kinds`` of site passing their input through for training steps before
    ``sites_from_step``."""

    def __init__(self, sites_from_step: int, kinds: list[str]):
        self.sites_from_step, self.kinds = sites_from_step, kinds
        self.sites = []

    def setup(self, trainer, pl_module, stage):
        self.sites = pl_module.model.sites_of(self.kinds)  # once, not on every training step

    def _passthrough(self, on: bool) -> None:
        for site in self.sites:
            site.passthrough = on

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._passthrough(trainer.global_step < self.sites_from_step)

    def on_validation_start(self, trainer, pl_module):
        self._passthrough(False)

    def on_fit_end(self, trainer, pl_module):
        self._passthrough(False)

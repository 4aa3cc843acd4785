"""What each validation of ``fit`` measures beyond the loss: firing per neuron, neuron health, energy, a raster.

``ValidationMeasures`` is a Lightning callback that ``spiking_lm.cli`` adds to ``fit`` as the ``--measure.*``
options (train/ does not import eval/, so the callback lives beside the measurements it reuses). At the
end of each validation during ``fit`` it runs one more forward, without gradients, on the first
``windows`` windows of the first validation batch, its per-neuron spike counts and attention products
coming back through the model's collector (``spiking_lm.firing.FiringCounts``), priced and judged by
``spiking_lm.eval.energy`` and ``spiking_lm.eval.health`` as in ``spiking-lm evaluate``, and logs:

- ``val_dead_frac/<site>`` and ``val_saturated_frac/<site>`` (and ``/all``, over all neurons);
- ``val_energy/pj_per_token``, the dense counterpart's ``val_energy/dense_pj_per_token`` and their ratio
  ``val_energy/ratio_vs_dense``, at the pJ per MAC and AC of ``energy_preset``, which the run's config names;

to every logger, and to W&B alone, in the same history row as ``val_loss``:

- ``val_neuron_rate/<site>``: a ``wandb.Histogram`` over the site's neurons of each neuron's firing rate
  (spikes per neuron-step);
- ``val_raster``: a ``wandb.Image`` of the spikes of ``raster_sites`` sites over the start of the first window.
"""

from __future__ import annotations

import io

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from spiking_lm.eval import health
from spiking_lm.eval.energy import PRESETS, OpCounter, count_dense
from spiking_lm.firing import FiringCounts
from spiking_lm.model import GPT

ENERGY_PRESETS = {name: (preset.e_mac, preset.e_ac) for name, preset in PRESETS.items()}


def spread(names: list[str], count: int) -> list[str]:
    """Up to ``count`` of ``names``, evenly spread from the first to the last."""
    if count >= len(names):
        return names
    return [names[i] for i in np.linspace(0, len(names) - 1, count).round().astype(int)]


def neuron_rates(firing: FiringCounts) -> dict[str, np.ndarray]:
    """Per site, each neuron's spikes per neuron-step over the forwards ``firing`` collected."""
    return {name: site.neuron_rates().cpu().numpy() for name, site in firing.sites.items()}


class ValidationMeasures(Callback):
    """Neuron health, energy per token, firing-rate histograms and a spike raster at each validation of fit.

    Args:
        windows: validation windows measured, from the first validation batch (0: measure nothing).
        energy_preset: the energy per operation (pJ per MAC and per AC) that energy per token is counted at.
        raster_sites: sites drawn in the spike raster, evenly spread over the model (0: no raster).
        raster_tokens: tokens of the first window drawn in the raster.
    """

    def __init__(
        self, windows: int = 8, energy_preset: str = "fp32", raster_sites: int = 3, raster_tokens: int = 32
    ) -> None:
        if min(windows, raster_sites) < 0 or raster_tokens < 1:
            raise ValueError(
                f"--measure.windows and --measure.raster_sites must be >= 0 and --measure.raster_tokens"
                f" >= 1, got {windows}, {raster_sites} and {raster_tokens}"
            )
        if energy_preset not in ENERGY_PRESETS:
            raise ValueError(
                f"--measure.energy_preset must be one of {', '.join(ENERGY_PRESETS)}, got {energy_preset!r}"
            )
        self.windows, self.energy_preset = windows, energy_preset
        self.raster_sites, self.raster_tokens = raster_sites, raster_tokens
        self._inputs: torch.Tensor | None = None  # (windows, L): this validation's measured windows
        self._dense: dict[int, float] = {}  # window length -> the dense counterpart's pJ per token

    def _active(self, trainer: L.Trainer) -> bool:
        return (
            self.windows > 0
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and trainer.is_global_zero
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        e_mac, e_ac = ENERGY_PRESETS[self.energy_preset]
        for logger in trainer.loggers:
            logger.log_hyperparams({"energy_preset": self.energy_preset, "e_mac_pj": e_mac, "e_ac_pj": e_ac})

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._active(trainer) and batch_idx == 0 and dataloader_idx == 0:
            self._inputs = batch[0][: self.windows].clone()

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer) or self._inputs is None:
            return
        x, self._inputs = self._inputs, None
        model: GPT = pl_module.model
        firing = FiringCounts(per_neuron=True, products=True)
        with OpCounter(model, firing) as ops:
            model(x, firing=firing)
        site_health = health.site_health(model, firing)
        scalars = {}
        for name, h in {**site_health, "all": health.overall(site_health)}.items():
            if h["dead_frac"] is not None:
                scalars[f"val_dead_frac/{name}"] = h["dead_frac"]
                scalars[f"val_saturated_frac/{name}"] = h["saturated_frac"]
        scalars.update(self._energy(model, ops, x.shape[1]))
        pl_module.log_dict(scalars, rank_zero_only=True)
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if wandb_loggers and firing.sites:
            media = self._media(trainer, model, firing, x[:1])
            for logger in wandb_loggers:  # joins the row that Lightning logs val_loss in, after this hook
                logger.experiment.log(media, commit=False)

    def _energy(self, model: GPT, ops: OpCounter, length: int) -> dict[str, float]:
        e_mac, e_ac = ENERGY_PRESETS[self.energy_preset]
        if length not in self._dense:
            self._dense[length] = count_dense(model.config, length, e_mac, e_ac)["pj_per_token"]
        pj, dense = ops.report(e_mac, e_ac)["pj_per_token"], self._dense[length]
        return {
            "val_energy/pj_per_token": pj,
            "val_energy/dense_pj_per_token": dense,
            "val_energy/ratio_vs_dense": pj / dense,
        }

    def _media(self, trainer: L.Trainer, model: GPT, firing: FiringCounts, first: torch.Tensor) -> dict:
        import wandb

        media = {f"val_neuron_rate/{name}": wandb.Histogram(rates) for name, rates in neuron_rates(firing).items()}
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if self.raster_sites and tokenizer is not None:
            media["val_raster"] = wandb.Image(self._raster(model, tokenizer, first, trainer.global_step))
        return media

    def _raster(self, model: GPT, tokenizer, first: torch.Tensor, step: int):
        from PIL import Image

        from spiking_lm.eval import plots

        idx = first[:, : self.raster_tokens]  # (1, L)
        trains = health.spike_trains(model, idx)
        shown = {name: trains[name] for name in spread(list(trains), self.raster_sites)}
        tokens = [tokenizer.decode([t]) for t in idx[0].tolist()]
        png = plots.raster(
            shown, tokens, model.config.timesteps, f"step {step}: spikes of sampled neurons over a validation window"
        )
        return Image.open(io.BytesIO(png))

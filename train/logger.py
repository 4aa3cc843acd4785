"""W&B logging that falls back to offline mode by itself."""

from __future__ import annotations

import os

from lightning.pytorch.loggers import WandbLogger

from spiking_lm.train.lightning_adapter import drop_wandb_anonymous
from spiking_lm.wandb_mode import wandb_offline


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` whose ``offline`` defaults to what the machine allows.

    Offline runs land in ``<save_dir>/wandb/offline-run-*``; upload them later with
    ``wandb sync <that folder>``. ``log_model`` works offline too: the checkpoints (which carry the
    tokenizer) become model artifacts of the offline run. The CLI sets an unset ``save_dir`` to the
    trainer's ``default_root_dir``, so that one option moves everything a run writes.
    """

    def __init__(
        self,
        project: str = "spiking-lm",
        name: str | None = None,
        save_dir: str | None = None,
        tags: list[str] | None = None,
        group: str | None = None,
        offline: bool | None = None,
        **kwargs,
    ):
        save_dir = save_dir or "runs"
        os.makedirs(save_dir, exist_ok=True)
        offline = wandb_offline() if offline is None else offline
        # Offline goes to wandb.init as its mode: Lightning refuses log_model with offline=True, although an
        # offline run keeps its artifacts and `wandb sync` uploads them with the rest.
        if offline and not kwargs.get("mode"):
            kwargs["mode"] = "offline"
        super().__init__(project=project, name=name, save_dir=save_dir, tags=tags, group=group, **kwargs)
        drop_wandb_anonymous(self)

"""The one place that touches Lightning internals; ``tests/test_lightning_adapter.py`` fails when they change.

Bounded by the lightning range in pyproject. Keep this file small: prefer public hooks.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn


def drop_wandb_anonymous(logger: WandbLogger) -> None:
    """Stop ``logger`` passing ``anonymous`` to ``wandb.init``.

    Lightning's ``WandbLogger`` always passes it (``None`` unless set), and W&B >= 0.19 warns on every run
    that the setting has no effect. The arguments wait in ``_wandb_init`` until the run starts.
    """
    init = logger._wandb_init
    if "anonymous" not in init:
        raise RuntimeError(
            "WandbLogger no longer keeps its wandb.init arguments in _wandb_init['anonymous'];"
            " update spiking_lm.train.lightning_adapter"
        )
    if init["anonymous"] is None:
        del init["anonymous"]


def replace_option_help(cli: LightningCLI, subcommand: str, dest: str, text: str) -> None:
    """Give the option ``dest`` of ``cli``'s ``subcommand`` the --help ``text``.

    LightningCLI builds a subcommand's options from the Trainer method's signature and docstring, and keeps
    each subcommand's parser in ``_subcommand_parsers``; jsonargparse keeps argparse's ``_actions``.
    """
    actions = [action for action in cli._subcommand_parsers[subcommand]._actions if action.dest == dest]
    if len(actions) != 1:
        raise RuntimeError(
            f"LightningCLI's {subcommand} parser no longer has one {dest} option;"
            " update spiking_lm.train.lightning_adapter"
        )
    actions[0].help = text


class FitThroughputMonitor(ThroughputMonitor):
    """``ThroughputMonitor`` that logs no validation rows during fit.

    Lightning logs them at the validation batch index, which sends a W&B run's step axis backwards (W&B then
    drops them, with a warning). The validation batches are still timed (``_update``), so that the training
    throughput leaves the validation time out. ``_evaluation_loop`` is where the parent reads that index.
    """

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args, **kwargs) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)
        elif trainer.is_global_zero and not trainer.sanity_checking:
            self._update(trainer, pl_module, batch, trainer._evaluation_loop.batch_progress.total.ready)

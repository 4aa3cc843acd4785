"""``spiking-lm fit|validate|test``: the LightningCLI of the model and its data (run by ``spiking_lm.cli``)."""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from spiking_lm.checkpoint import read_checkpoint
from spiking_lm.data import TextDataModule
from spiking_lm.train.module import WANDB_RUN_ID, LitLM
from spiking_lm.train.reliability import RunCheckpoint

# Field docstrings of the config dataclasses become --help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

# The data module starts after the batches a restored trainer consumed (spiking_lm.data), so Lightning's
# warning that a mid-epoch resume replays data does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

class RunConfigSaver(SaveConfigCallback):
    """Saves the run's ``config.yaml``, refusing (as a usage error) to replace an earlier run's.

    fit saves it once the checkpoint to resume from has loaded, so a refused resume leaves the run's
    config as it was.
    """

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer, pl_module):
        if not (self.overwrite or self.already_saved) and self.save_to_log_dir:
            path = os.path.join(trainer.log_dir, self.config_filename)
            if trainer.strategy.broadcast(trainer.is_global_zero and os.path.isfile(path)):
                raise FileExistsError(
                    f"{path} holds the config of an earlier run; pass --ckpt_path last to resume that run, or"
                    " choose another --trainer.default_root_dir (or logger save_dir)"
                )
        super().setup(trainer, pl_module, "fit")


def _logger_configs(logger) -> list:
    """The ``class_path``/``init_args`` entries of a parsed ``trainer.logger`` value."""
    entries = logger if isinstance(logger, list) else [logger]
    return [entry for entry in entries if hasattr(entry, "class_path")]


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


# --ckpt_path values that name no file (besides "last", resolved here).
_KEYWORDS = ("best", "hpc", "registry")


class SpikingLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val_loss",
            "checkpoint.mode": "min",
            "checkpoint.save_top_k": 1,
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-step{step}-val{val_loss:.4f}",
            "checkpoint.auto_insert_metric_name": False,
        })
        # One source of truth: the data decides the vocabulary and the context length.
        parser.link_arguments("data.block_size", "model.gpt.block_size")
        parser.link_arguments("data.vocab_size", "model.gpt.vocab_size", apply_on="instantiate")

    def _parse_ckpt_path(self):
        """Settle the run folder and ``--ckpt_path`` before anything is built.

        Replaces LightningCLI's step of the same name, which copies a checkpoint's model settings over
        those given: a resumed fit keeps the given ones (a lower learning rate, skipping faults), and a
        checkpoint of another architecture is refused when it loads (``LitLM.on_load_checkpoint``).
        validate and test still take the checkpoint's settings.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        cfg = self.config[subcommand]
        # Checkpoints go to a fixed folder per run so that --ckpt_path last finds them again.
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = os.path.join(cfg.trainer.default_root_dir or "runs", "checkpoints")
        if cfg.checkpoint.save_last == "link":
            raise ValueError("--checkpoint.save_last link would make last.ckpt a symlink, which a kill during a"
                             " save can leave missing; use --checkpoint.save_last true")
        folder = Path(cfg.checkpoint.dirpath)
        if cfg.ckpt_path == "last":
            last = folder / f"{RunCheckpoint.CHECKPOINT_NAME_LAST}{RunCheckpoint.FILE_EXTENSION}"
            if not last.is_file():
                raise FileNotFoundError(
                    f"--ckpt_path last: there is no {last} to resume; start a new run without --ckpt_path,"
                    " or point --trainer.default_root_dir at the run to resume"
                )
            cfg.ckpt_path = str(last)
        # A local file is checked now, before a logger or config file is written; Lightning resolves
        # its keywords and remote paths itself.
        local = cfg.ckpt_path and "://" not in cfg.ckpt_path and cfg.ckpt_path.split(":")[0] not in _KEYWORDS
        ckpt = read_checkpoint(cfg.ckpt_path, mmap=True) if local else None
        if subcommand != "fit":
            if ckpt is not None:
                super()._parse_ckpt_path()
            # Evaluating a run must not replace the config it was trained with.
            self.save_config_kwargs = {"config_filename": f"{subcommand}_config.yaml", "overwrite": True}
            return
        if cfg.ckpt_path is None:
            earlier = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
            if earlier:
                raise FileExistsError(
                    f"{folder} already holds checkpoints of an earlier run ({', '.join(earlier[:3])}"
                    f"{', ...' if len(earlier) > 3 else ''}); pass --ckpt_path last to resume it, or choose"
                    " another --trainer.default_root_dir for a new run"
                )
        elif ckpt is not None:
            self._continue_wandb_run(cfg, ckpt.get(WANDB_RUN_ID))
        self.save_config_kwargs = {"overwrite": cfg.ckpt_path is not None}

    @staticmethod
    def _continue_wandb_run(cfg, run_id: str | None) -> None:
        """Point a W&B logger without an explicit id at the run the checkpoint was logged to."""
        if run_id is None:
            return
        for entry in _logger_configs(cfg.trainer.logger):
            args = entry.init_args
            if issubclass(_import(entry.class_path), WandbLogger) and not (args.get("id") or args.get("version")):
                args.id, args.resume = run_id, "allow"

    def after_fit(self):
        metrics = self.trainer.callback_metrics
        if "val_loss" not in metrics or not self.trainer.is_global_zero:
            return
        line = f"final val loss {metrics['val_loss']:.4f} | val perplexity {metrics['val_ppl']:.2f}"
        rate = metrics.get("val_firing_rate/mean_neuron_weighted")
        line += f" | mean firing rate {rate:.3f}" if rate is not None else " | no spiking sites (softmax + GELU)"
        print(line)
        print(f"checkpoints: {self.trainer.checkpoint_callback.dirpath}")


def _trainer_defaults() -> dict:
    return {
        "logger": {"class_path": "spiking_lm.train.logger.AutoWandbLogger"},
        "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
        "default_root_dir": "runs",
        "plugins": [{"class_path": "spiking_lm.train.reliability.AtomicCheckpointIO"}],
    }


def lightning_cli(args: list[str] | None = None, **kwargs) -> SpikingLMCLI:
    """Run ``spiking-lm fit|validate|test`` on ``args`` (default: the command line); kwargs go to LightningCLI."""
    return SpikingLMCLI(LitLM, TextDataModule, args=args, trainer_defaults=_trainer_defaults(),
                        save_config_callback=RunConfigSaver, **kwargs)

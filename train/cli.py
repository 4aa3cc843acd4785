"""The ``spiking-lm`` command: LightningCLI's fit/validate/test, plus the commands in ``COMMANDS``."""

from __future__ import annotations

import importlib
import os
import sys

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from spiking_lm.data import TextDataModule
from spiking_lm.train.module import LitLM

# Field docstrings of the config dataclasses become --help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

USAGE_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, UnicodeDecodeError)


class SpikingLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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

    def before_instantiate_classes(self):
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        # Checkpoints go to a fixed folder per run so that --ckpt_path last finds them again.
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = os.path.join(cfg.trainer.default_root_dir or "runs", "checkpoints")

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
    }


# Commands beside LightningCLI's own, each a module with ``main(argv)``; imported only when used.
COMMANDS = {
    "generate": "spiking_lm.train.generate",
    "export": "spiking_lm.train.export",
    "evaluate": "spiking_lm.eval.evaluate",
    "sweep": "spiking_lm.eval.sweep",
}


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` defaults to the command line."""
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        if words and words[0] in COMMANDS:
            importlib.import_module(COMMANDS[words[0]]).main(words[1:])
            return
        SpikingLMCLI(
            LitLM, TextDataModule, args=argv, trainer_defaults=_trainer_defaults(),
            save_config_kwargs={"overwrite": True},
        )
    except USAGE_ERRORS as e:
        if os.environ.get("SPIKING_LM_DEBUG"):
            raise
        print(f"spiking-lm: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

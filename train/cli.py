"""``spiking-lm fit|validate|test``: the LightningCLI of the model and its data (run by ``spiking_lm.cli``)."""

from __future__ import annotations

import contextlib
import importlib
import os
import shlex
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.exceptions import SIGTERMException

from spiking_lm.checkpoint import read_checkpoint
from spiking_lm.data import TextDataModule
from spiking_lm.files import FolderLock, check_writable
from spiking_lm.train.callbacks import ProgressLines, RunCheckpoint
from spiking_lm.train.console import quiet_upstream
from spiking_lm.train.faults import Terminated
from spiking_lm.train.lightning_adapter import replace_option_help
from spiking_lm.train.module import WANDB_RUN_ID, LitLM

# The data module starts after the batches a restored trainer consumed (spiking_lm.data), so Lightning's
# warning that a mid-epoch resume replays data does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
# The CLI itself decides what a non-empty checkpoint folder means (resume, start over, or refuse).
warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
quiet_upstream()


# The trainer settings a run is compared by, as its loggers receive them.
TRAINER_SETTINGS = (
    "max_steps",
    "precision",
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "val_check_interval",
)


class RunConfigSaver(SaveConfigCallback):
    """Saves the run's ``config.yaml``, refusing (as a usage error) to replace an earlier run's.

    fit saves it once the checkpoint to resume from has loaded, so a refused resume leaves the run's
    config as it was; a resumed leg saves its own, ``config-resumed-step<N>.yaml``.
    """

    def __init__(self, *args, resumed_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resumed_step = resumed_step

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage) -> None:
        """Give the loggers (W&B's config) the trainer's settings and the whole config as saved (rank 0)."""
        trainer_config = self.config.get("trainer") or {}
        settings = {key: trainer_config.get(key) for key in TRAINER_SETTINGS}
        settings = {
            key: value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
            for key, value in settings.items()
        }
        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            logger.log_hyperparams(
                {"trainer": settings, "seed_everything": self.config.get("seed_everything"), "config_yaml": text}
            )

    def on_fit_start(self, trainer, pl_module):
        if self.resumed_step is not None and self.save_to_log_dir:
            # Each leg of a resumed run keeps the settings it ran with beside the first leg's config.yaml.
            first = os.path.join(trainer.log_dir, self.config_filename)
            if trainer.strategy.broadcast(trainer.is_global_zero and os.path.isfile(first)):
                self.config_filename = f"config-resumed-step{self.resumed_step}.yaml"
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


def _check_strategy(strategy) -> None:
    """Refuse the strategies that start their processes by spawn or fork (ddp_spawn, ddp_fork, ddp_notebook).

    Those hand the trained weights back to the first process in a temporary file of weights alone, which the
    checkpoint reader (rightly) refuses after training, and the callbacks' state never comes back.
    """
    if isinstance(strategy, str):
        name = strategy
        start = StrategyRegistry[name]["init_params"].get("start_method") if name in StrategyRegistry else None
    else:  # a class_path and its init_args
        name, init_args = getattr(strategy, "class_path", ""), getattr(strategy, "init_args", None)
        start = init_args.get("start_method") if init_args is not None else None
    if start in ("spawn", "fork", "forkserver"):
        raise ValueError(
            f"--trainer.strategy {name} starts its processes by {start}, which spiking-lm does not"
            " support; use --trainer.strategy ddp (one process per device, started like this one)"
        )


# --help of --ckpt_path: (fit's, validate's and test's).
CKPT_PATH_HELP = (
    "checkpoint to resume the run from: 'last' for <default_root_dir>/checkpoints/last.ckpt, or a local .ckpt file"
    " of spiking-lm fit (one of another run starts a branch, with a W&B run of its own)",
    "checkpoint to score (required): 'last' for <default_root_dir>/checkpoints/last.ckpt, or a local .ckpt file of"
    " spiking-lm fit",
)

# The run folders that this process's fit holds, released when lightning_cli returns.
_RUN_LOCKS = contextlib.ExitStack()

# --ckpt_path values that Lightning resolves itself, to files spiking-lm does not keep.
_LIGHTNING_KEYWORDS = ("best", "hpc", "registry")


class SpikingLMCLI(LightningCLI):
    """LightningCLI with the run folder settled before anything is built, through public hooks only.

    ``parse_arguments`` resolves ``--ckpt_path``, checks the checkpoint and points every logger without a
    ``save_dir`` at ``--trainer.default_root_dir``; ``before_instantiate_classes`` hands the path back.
    A resumed fit keeps the settings given (a lower learning rate, skipping faults), so its checkpoint
    path is kept away from LightningCLI's step that would copy the checkpoint's model settings over them;
    a checkpoint of another architecture is refused when it loads (``LitLM.on_load_checkpoint``).
    validate and test still take the checkpoint's settings.

    ``callback_groups`` maps an option group to a callback class that every run gets, configured by that
    group's options (e.g. ``{"measure": ValidationMeasures}`` gives ``--measure.*``): how the CLI module adds
    eval/'s measurements to fit, which train/ may not import.
    """

    def __init__(self, *args, callback_groups: dict[str, type[Callback]] | None = None, **kwargs) -> None:
        self.callback_groups = callback_groups or {}
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict needs a predict_step and a prediction data set; spiking-lm generate samples text instead.
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name != "predict"}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:  # Lightning's help offers URLs, hpc and registry, which spiking-lm refuses
            for subcommand in self.subcommands():
                replace_option_help(self, subcommand, "ckpt_path", CKPT_PATH_HELP[subcommand != "fit"])

    def add_arguments_to_parser(self, parser):
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        for key, callback in self.callback_groups.items():
            parser.add_lightning_class_args(callback, key)
        # One source of truth: the data decides the vocabulary and the context length.
        parser.link_arguments("data.block_size", "model.gpt.block_size")
        parser.link_arguments("data", "model.gpt.vocab_size", compute_fn=self._vocab_size, apply_on="instantiate")

    def _vocab_size(self, data: TextDataModule) -> int:
        # The model of a run that loads a checkpoint has the checkpoint's embedding: the data must adopt the
        # checkpoint's tokenizer before it builds one (a BPE retrained on an edited text could differ in size).
        if self._ckpt_tokenizer is not None:
            data.load_state_dict({"tokenizer": self._ckpt_tokenizer})
        return data.vocab_size

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self._resume: str | None = None
        self._ckpt_tokenizer: dict | None = None
        self._parent: dict[str, str] = {}  # the run a branch started from
        subcommand = self.config.get("subcommand")
        if subcommand:
            self._settle_run(subcommand, self.config[subcommand])

    def before_instantiate_classes(self) -> None:
        if self._resume is not None:
            self.config[self.subcommand].ckpt_path = self._resume

    def _settle_run(self, subcommand: str, cfg) -> None:
        """Put every file of the run under ``default_root_dir`` and resolve and check ``--ckpt_path``."""
        _check_strategy(cfg.trainer.strategy)
        root = cfg.trainer.default_root_dir or "runs"
        sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
        if subcommand == "fit" and sweep_id and run_id:
            # A W&B sweep agent starts every run with one command line: each run gets a folder of its own.
            root = cfg.trainer.default_root_dir = os.path.join(root, sweep_id, run_id)
        # Checkpoints go to a fixed folder per run so that --ckpt_path last finds them again.
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = os.path.join(root, "checkpoints")
        for entry in _logger_configs(cfg.trainer.logger):
            if "save_dir" in entry.init_args and not entry.init_args.save_dir:
                entry.init_args.save_dir = root
        if subcommand == "fit":  # checked before anything is made, so the answer names the option
            check_writable(root, "--trainer.default_root_dir")
            for entry in _logger_configs(cfg.trainer.logger):
                if entry.init_args.get("save_dir"):
                    check_writable(entry.init_args.save_dir, "--trainer.logger.save_dir")
            check_writable(cfg.checkpoint.dirpath, "--checkpoint.dirpath")
        folder = Path(cfg.checkpoint.dirpath)
        start_over = False
        if cfg.ckpt_path == "last":
            cfg.ckpt_path, start_over = self._last_checkpoint(subcommand, root, folder)
        elif cfg.ckpt_path is not None and (
            "://" in cfg.ckpt_path or cfg.ckpt_path.split(":")[0] in _LIGHTNING_KEYWORDS
        ):
            raise ValueError(
                f"--ckpt_path {cfg.ckpt_path}: spiking-lm reads checkpoints from local files only; give a file"
                " (copy a remote checkpoint to this machine first), or 'last' for"
                f" {folder / 'last.ckpt'}"
            )
        if subcommand != "fit" and not cfg.ckpt_path:
            raise ValueError(
                f"{subcommand} needs --ckpt_path: a checkpoint of spiking-lm fit, or last for"
                f" {folder / 'last.ckpt'}; without one it would score an untrained model"
            )
        # Checked now, before a logger or config file is written.
        ckpt = read_checkpoint(cfg.ckpt_path, mmap=True) if cfg.ckpt_path else None
        self._ckpt_tokenizer = ckpt.get("tokenizer") if ckpt is not None else None
        if subcommand != "fit":
            # Evaluating a run must not replace the config it was trained with.
            self.save_config_kwargs = {"config_filename": f"{subcommand}_config.yaml", "overwrite": True}
            return
        if ckpt is not None:
            if Path(cfg.ckpt_path).resolve().parent == folder.resolve():
                self._continue_wandb_run(cfg, ckpt.get(WANDB_RUN_ID))
            else:  # a branch of another run: a W&B run of its own, which names its parent
                self._parent = {"resumed_from": str(Path(cfg.ckpt_path).resolve())}
                if ckpt.get(WANDB_RUN_ID):
                    self._parent["parent_wandb_run"] = ckpt[WANDB_RUN_ID]
            self._resume, cfg.ckpt_path = cfg.ckpt_path, None
        elif not start_over:
            earlier = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
            if earlier:
                raise FileExistsError(
                    f"{folder} already holds checkpoints of an earlier run ({', '.join(earlier[:3])}"
                    f"{', ...' if len(earlier) > 3 else ''}); pass --ckpt_path last to resume it, or choose"
                    " another --trainer.default_root_dir for a new run"
                )
        self.save_config_kwargs = {
            "overwrite": ckpt is not None or start_over,
            "resumed_step": None if ckpt is None else ckpt["global_step"],
        }

    @staticmethod
    def _last_checkpoint(subcommand: str, root: str, folder: Path) -> tuple[str | None, bool]:
        """``--ckpt_path last``: (the checkpoint to load, or None to start the run over in its folder)."""
        last = folder / f"{RunCheckpoint.CHECKPOINT_NAME_LAST}{RunCheckpoint.FILE_EXTENSION}"
        if last.is_file():
            return str(last), False
        others = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        started = os.path.isdir(root) and any(entry.name != FolderLock.NAME for entry in os.scandir(root))
        if subcommand != "fit" or others or not started:
            hint = (
                f"; resume from one of its checkpoints with --ckpt_path {folder / others[0]}"
                if others
                else "; start a new run without --ckpt_path, or point --trainer.default_root_dir at the run"
            )
            raise FileNotFoundError(f"--ckpt_path last: there is no {last} to resume{hint}")
        print(
            f"spiking-lm: {root} holds no checkpoint (the run stopped before its first save):"
            " starting it over in place",
            file=sys.stderr,
        )
        return None, True

    @staticmethod
    def _continue_wandb_run(cfg, run_id: str | None) -> None:
        """Point a W&B logger without an explicit id at the run the checkpoint was logged to."""
        if run_id is None:
            return
        for entry in _logger_configs(cfg.trainer.logger):
            args = entry.init_args
            if issubclass(_import(entry.class_path), WandbLogger) and not (args.get("id") or args.get("version")):
                args.id, args.resume = run_id, "allow"

    def before_fit(self) -> None:
        """Before anything of the run is written (W&B included): take the run folder, check the checkpoint's
        model, and record a branch's parent."""
        trainer = self.trainer
        if trainer.local_rank == 0 and trainer.node_rank == 0:
            lock = FolderLock(self.config.fit.trainer.default_root_dir or "runs", "spiking-lm fit")
            _RUN_LOCKS.callback(lock.release)
        if self._resume is not None:
            self.model.check_same_model(read_checkpoint(self._resume, mmap=True))
        if self._parent:
            for logger in trainer.loggers:
                logger.log_hyperparams(self._parent)

    def instantiate_trainer(self, **kwargs):
        trainer = self.config_init[self.subcommand].trainer
        callbacks = trainer.callbacks if isinstance(trainer.callbacks, list) else [c for c in [trainer.callbacks] if c]
        # A bar redrawn with carriage returns floods a log file or pipe: print plain lines there.
        if (
            trainer.enable_progress_bar is not False
            and not sys.stdout.isatty()
            and not any(isinstance(c, ProgressBar) for c in callbacks)
        ):
            kwargs["callbacks"] = [*callbacks, ProgressLines()]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self):
        metrics = self.trainer.callback_metrics
        val_loss = metrics.get("val_loss")
        self.model.guard.check_outcome(
            self.model, None if val_loss is None else float(val_loss), self.trainer.checkpoint_callback.last_model_path
        )
        if val_loss is None or not self.trainer.is_global_zero:
            return
        line = f"final val loss {metrics['val_loss']:.4f} | val perplexity {metrics['val_ppl']:.2f}"
        rate = metrics.get("val_firing_rate/mean_neuron_weighted")
        line += f" | mean firing rate {rate:.3f}" if rate is not None else " | no spiking sites (softmax + GELU)"
        print(line)
        folder = os.path.relpath(self.trainer.checkpoint_callback.dirpath)
        print(f"checkpoints: {self.trainer.checkpoint_callback.dirpath if folder.startswith('..') else folder}")


def _trainer_defaults() -> dict:
    return {
        "logger": {"class_path": "spiking_lm.train.logger.AutoWandbLogger"},
        "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
        "default_root_dir": "runs",
        "plugins": [{"class_path": "spiking_lm.train.checkpoint_io.AtomicCheckpointIO"}],
    }


def _resume_command(args: list[str]) -> str:
    """``spiking-lm args`` with ``--ckpt_path last`` in place of any ``--ckpt_path`` given."""
    kept, skip = [], False
    for arg in args:
        if skip or arg.startswith("--ckpt_path="):
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        else:
            kept.append(arg)
    return shlex.join(["spiking-lm", *kept, "--ckpt_path", "last"])


def _terminated(args: list[str], error: SIGTERMException) -> Terminated:
    """What a SIGTERM stopped; fit's ``RunCheckpoint`` noted on ``error`` which step ``last.ckpt`` holds."""
    if not args or args[0] != "fit":
        return Terminated(f"{args[0] if args else 'the command'} stopped by SIGTERM")
    kept = "; ".join(getattr(error, "__notes__", [])) or "no checkpoint was written yet"
    return Terminated(f"training stopped by SIGTERM: {kept}; resume with: {_resume_command(args)}")


def lightning_cli(
    args: list[str] | None = None, cli_class: type[SpikingLMCLI] = SpikingLMCLI, **kwargs
) -> SpikingLMCLI:
    """Run ``spiking-lm fit|validate|test`` on ``args`` (default: the command line); kwargs go to LightningCLI.

    A bad option raises ``ArgumentError`` (the CLI prints it in one line, not after the 160-line usage); a
    SIGTERM raises ``Terminated`` (Lightning's own exception for it would exit with status 0).
    """
    kwargs.setdefault("parser_kwargs", {"exit_on_error": False})
    if args is not None and list(args) == sys.argv[1:]:
        args = None  # the command line itself: given as args, LightningCLI would warn that both are given
    try:
        with _RUN_LOCKS:
            # LitLM configures its own optimizer and schedule: LightningCLI's --optimizer/--lr_scheduler, which would
            # replace them (and leave the schedule that training logs missing), are not offered.
            return cli_class(
                LitLM,
                TextDataModule,
                args=args,
                trainer_defaults=_trainer_defaults(),
                save_config_callback=RunConfigSaver,
                auto_configure_optimizers=False,
                **kwargs,
            )
    except SIGTERMException as e:
        raise _terminated(sys.argv[1:] if args is None else list(args), e) from None

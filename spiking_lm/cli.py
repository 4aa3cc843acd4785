"""The ``spiking-lm`` command: every subcommand behind one entry point, and the one place where errors
become ``spiking-lm: error: ...`` and an exit status.

This is the top of the layering, the only module that imports both ``spiking_lm.train`` and
``spiking_lm.eval``: fit/validate/test run the LightningCLI of ``train/cli.py``; generate and export live
in ``train/``, evaluate and sweep in ``eval/``. Each is imported when its command runs, so that
``spiking-lm generate`` does not pay for Lightning and W&B.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import warnings
from argparse import ArgumentError
from typing import Any

from jsonargparse import CLI, ArgumentParser, set_parsing_settings

from spiking_lm.files import no_room

# What each command does, as ``spiking-lm --help`` lists it.
COMMANDS = {
    "fit": "train a model (LightningCLI: --config FILE, --trainer.*, --model.*, --data.*)",
    "validate": "validation loss of a checkpoint (LightningCLI, --ckpt_path)",
    "test": "loss of a checkpoint on the held-out windows, logged as test_* (the sources have no third split:"
    " these are validate's windows)",
    "generate": "sample text from a checkpoint or an exported model",
    "export": "write a checkpoint's model as safetensors weights, config.json and vocab.json",
    "evaluate": "loss, firing rates, energy per token and neuron health of a checkpoint",
    "sweep": "train the softmax baseline and a grid of spiking models, then compare them",
}
# A bad option, file or piece of data: the user can fix the command (exit status 2).
USAGE_ERRORS = (
    ArgumentError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    UnicodeDecodeError,
    ConnectionError,
)


def top_parser() -> ArgumentParser:
    """The parser behind ``spiking-lm --help``: one subcommand per entry of ``COMMANDS``."""
    parser = ArgumentParser(
        prog="spiking-lm",
        description="Spiking language models: train, sample, export, "
        "evaluate and sweep. `spiking-lm COMMAND --help` lists a command's options.",
    )
    subcommands = parser.add_subcommands(title="commands")
    for name, summary in COMMANDS.items():
        subcommands.add_subcommand(name, ArgumentParser(description=summary), help=summary)
    return parser


def fit_callbacks() -> dict[str, type]:
    """The callbacks from eval/ that every fit gets, by option group (train/ cannot import eval/).

    ``--measure.*``: neuron health, energy, firing-rate histograms and a spike raster at each validation.
    """
    from spiking_lm.eval.validation_measures import ValidationMeasures

    return {"measure": ValidationMeasures}


def sweep_point_config(args: list[str]) -> tuple[str, dict | None]:
    """What ``spiking-lm fit args`` would train, checked without training; given to the sweep (eval/ cannot
    import train/).

    fit's own parser merges and checks ``args`` (config files and dotted overrides), then the model, the data
    module, the logger and the callbacks are built from them, so a config that cannot build its model (say
    ``model.gpt.n_head=3`` with ``n_embd: 16``) fails here. Returns the complete config as YAML, and the
    ``sweep:`` section of the config files (dotted key -> values), None without one.
    """
    from spiking_lm.train.cli import SpikingLMCLI, lightning_cli

    class SweepPointCLI(SpikingLMCLI):
        def add_arguments_to_parser(self, parser):
            super().add_arguments_to_parser(parser)
            parser.add_argument(
                "--sweep",
                type=dict[str, list[Any]] | None,
                default=None,
                help="the grid of spiking-lm sweep: dotted key -> list of values",
            )

        def instantiate_classes(self):
            # The Trainer itself is left out: building it would set up devices and logging for nothing.
            self.config_init = self.parser.instantiate_classes(self.config)

    try:
        with warnings.catch_warnings():
            # These args are not the command line (which is the sweep's), as LightningCLI warns they may be.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
            cli = lightning_cli(
                args,
                cli_class=SweepPointCLI,
                run=False,
                parser_kwargs={"exit_on_error": False},
                callback_groups=fit_callbacks(),
            )
    except ArgumentError as e:
        raise ValueError(str(e)) from None
    config = cli.config.clone()
    section = config.pop("sweep")
    return cli.parser.dump(config, skip_none=False), section


def typed_command(function, command: str, args: list[str]) -> None:
    """Run ``function`` on ``args`` parsed from its signature: ``--name value`` per parameter, --help from its
    docstring, a bad value raising ``ArgumentError``."""
    CLI(function, args=args, prog=f"spiking-lm {command}", as_positional=False, exit_on_error=False)


def wants_field_docs(words: list[str]) -> bool:
    """Whether a command line shows the config dataclasses' field docstrings (--help, --print_config's comments).
    Only then are they read: reading them parses the source of every config class, about 60% of fit's start-up."""
    return any(w in ("-h", "--help") or w.startswith("--print_config") for w in words)


def run(words: list[str]) -> None:
    """Run the subcommand ``words[0]`` on the options after it."""
    set_parsing_settings(docstring_parse_attribute_docstrings=wants_field_docs(words))
    command, rest = (words[0], words[1:]) if words else (None, [])
    if command is None or command not in COMMANDS and not command.startswith("-"):
        given = "no command given" if command is None else f"unknown command {command!r}"
        raise ValueError(f"{given}; choose one of {', '.join(COMMANDS)} (spiking-lm --help)")
    if command in ("-h", "--help"):
        print(top_parser().format_help())
    elif command == "generate":
        from spiking_lm.train.generate import generate

        typed_command(generate, command, rest)
    elif command == "export":
        from spiking_lm.train.export import export

        typed_command(export, command, rest)
    elif command == "evaluate":
        from spiking_lm.eval import evaluate

        typed_command(evaluate.main, command, rest)
    elif command == "sweep":
        from spiking_lm.eval import sweep

        sweep.main(rest, point_config=sweep_point_config)
    else:
        from spiking_lm.train.cli import lightning_cli

        lightning_cli(words, callback_groups=fit_callbacks())


def exit_status(error: BaseException) -> int | None:
    """2 for a usage error, 1 for a failure while training, 143 for a SIGTERM, None for a bug (a traceback)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from spiking_lm.eval.sweep import PointFailed
    from spiking_lm.train.faults import Terminated, TrainingFault, is_out_of_memory

    if isinstance(error, (Terminated, PointFailed)):
        return error.exit_status
    if isinstance(error, TrainingFault) or is_out_of_memory(error) or no_room(error):
        return 1
    if _read_only(error):
        return 2
    return 2 if isinstance(error, (*USAGE_ERRORS, MisconfigurationException)) else None


def _disk_error(error: BaseException) -> OSError | None:
    """The write that found no room or a read-only disk behind ``error``, which a library may have wrapped (e.g.
    jsonargparse, around the token cache written while fit's arguments are linked)."""
    while error is not None:
        if type(error).__module__.startswith("spiking_lm."):  # ours already says what was kept (e.g. DiskFull)
            return None
        if no_room(error) or _read_only(error):
            return error
        error = error.__cause__
    return None


def _read_only(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno == errno.EROFS


def error_message(error: BaseException, command: str | None = None) -> str:
    """What ``spiking-lm: error:`` says about an error that ``exit_status`` maps."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from spiking_lm.train.faults import is_out_of_memory, out_of_memory_message

    if is_out_of_memory(error):
        return out_of_memory_message(error, command)
    if reason := no_room(error):  # outside a checkpoint save, which names what it kept (train/checkpoint_io.py)
        return f"{reason}{f' to write {error.filename}' if error.filename else ''}"
    if _read_only(error):
        return f"cannot write {error.filename or 'a file'}: it is on a read-only file system"
    if isinstance(error, MisconfigurationException):
        return f"Lightning refused the trainer's settings: {error}"
    if isinstance(error, ArgumentError):
        # nan and inf are floats, but jsonargparse refuses them for a float option as if they were not.
        message = re.sub(
            r"Expected a <class 'float'>\. Got value: (-?nan|-?inf)\b",
            r"\1 is not allowed: give a finite number",
            str(error),
        )
        return f"{message}\n(`spiking-lm {command or 'COMMAND'} --help` lists the options)"
    return str(error)


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` defaults to the command line.

    Exit status 2 for a usage error (bad option, data or file), 1 when training itself fails; the
    traceback only with ``SPIKING_LM_DEBUG=1``.
    """
    try:
        run(sys.argv[1:] if argv is None else list(argv))
    except Exception as error:
        e = _disk_error(error) or error
        status = exit_status(e)
        if status is None or os.environ.get("SPIKING_LM_DEBUG"):
            raise
        words = sys.argv[1:] if argv is None else list(argv)
        command = words[0] if words and words[0] in COMMANDS else None
        print(f"spiking-lm: error: {error_message(e, command)}", file=sys.stderr)
        sys.exit(status)


if __name__ == "__main__":
    main()

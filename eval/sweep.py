"""``spiking-lm sweep``: train the softmax baseline and a grid of spiking models, then compare them.

    spiking-lm sweep --config configs/quickstart.yaml --out DIR [--config MORE.yaml]
                     [--grid model.firing.reg_weight=0,0.1,1]... [--max_steps N] [--baseline false]
                     [--wandb_sweep true]

Points. The baseline is the config with softmax attention and GELU (and no spiking Q/K/V), trained
once; the spiking points are the cartesian product of the grids, each ``KEY=V1,V2,...`` with KEY a
LightningCLI dotted key. Without ``--grid`` the grid is the config's top-level ``sweep:`` mapping
(dotted key -> list of values), and without one ``DEFAULT_GRID``, strengths of the firing-rate
regularizer. Several ``--config`` files merge in order, as in ``spiking-lm fit``, so a small file can
add a sweep section to a shared config.

A point's config is the base config plus its settings as dotted overrides, merged and checked by the
parser of ``spiking-lm fit`` itself, in this process, and its model built, before anything trains
(``point_config``, which the CLI module passes in: eval/ does not import train/). The complete result
is ``DIR/runs/<point>.yaml``. Each point then trains as an ordinary ``spiking-lm fit --config`` of that
file, in a subprocess so that a crash or W&B's per-process state cannot reach the next one, writing
``last.ckpt`` every ``--checkpoint_every`` steps; its console output goes to ``DIR/runs/<point>.log``,
its run folder is ``DIR/runs/<point>/``, and all runs log to one W&B group named after the sweep. The
last checkpoint is then evaluated (``spiking_lm.eval.evaluate``) and ``DIR/runs/<point>/done.json``
written atomically. A rerun skips points with ``done.json``, resumes every other point that started
(``--ckpt_path last``, which continues from its last checkpoint or starts over a run that had none),
and refuses to continue in a folder whose point configs differ from the ones it would write.

``--wandb_sweep true`` prints the same grid as a W&B Sweeps config instead, to run across machines with
``wandb agent`` (``wandb_sweep_config``; docs/sweeps.md), and trains nothing.

At the end ``spiking_lm.eval.report`` writes results.csv, frontier.png, layers.png, raster.png and
report.md into DIR, and logs the table and figures to a summary run of the W&B group.
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser

from spiking_lm.checkpoint import read_checkpoint
from spiking_lm.eval import report
from spiking_lm.eval.evaluate import DEFAULT_BATCHES, evaluate
from spiking_lm.files import check_writable, write_atomic

DEFAULT_GRID = {"model.firing.reg_weight": ["0", "0.01", "0.1", "1"]}
# Dotted overrides, as text like every grid value: fit's parser reads them.
BASELINE = {
    "model.gpt.attention": "softmax",
    "model.gpt.mlp_activation": "gelu",
    "model.gpt.spiking_qkv": "false",
    "model.gpt.spiking_qkv_in": "false",
    "model.gpt.spiking_proj_in": "false",
    "model.gpt.spiking_fc_in": "false",
}
BASELINE_NAME = "softmax"
# (args of spiking-lm fit) -> (its complete config as YAML, the sweep: section of its config files or None).
PointConfig = Callable[[list[str]], tuple[str, "dict | None"]]


class PointFailed(RuntimeError):
    """A point's training run exited with an error, or was stopped; ``exit_status`` is the sweep's."""

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


# How a shell reports a process that SIGTERM ended; fit exits so when SIGTERM stops it after saving.
TERMINATED = 128 + signal.SIGTERM


@dataclass
class Point:
    name: str
    settings: dict[str, str]
    """Dotted key -> value as given on the command line: the grid values, or ``BASELINE``."""
    baseline: bool = False


@dataclass(frozen=True)
class SweepOptions:
    """Sweep options (besides the repeatable --config and --grid)."""

    out: str
    """folder of the sweep (created; a rerun resumes it)"""
    max_steps: int | None = None
    """train every run for N steps (default: the config's trainer.max_steps)"""
    baseline: bool = True
    """also train the softmax + GELU baseline"""
    eval_batches: int = DEFAULT_BATCHES
    """validation batches per evaluation"""
    name: str | None = None
    """sweep and W&B group name (default: the --out folder's name)"""
    checkpoint_every: int = 100
    """steps between a point's last.ckpt saves: an interrupted sweep loses at most this many steps per point"""
    wandb_sweep: bool = False
    """print the equivalent W&B Sweeps config (for ``wandb sweep``, then ``wandb agent`` on each machine) and
    exit, training nothing"""


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["model.firing.reg_weight=0,0.1"]`` -> ``{"model.firing.reg_weight": ["0", "0.1"]}``.

    The values stay text: fit's parser reads them, as it reads a ``--key value`` of its own command line.
    """
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        parts = [v.strip() for v in values.split(",")]
        if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", key) or "" in parts:
            raise ValueError(
                f"--grid {item!r}: expected KEY=V1,V2,... with a dotted KEY, e.g. model.firing.reg_weight=0,0.01,0.1"
            )
        if key in grid:
            raise ValueError(f"--grid {key} is given twice; list all its values in one --grid")
        grid[key] = parts
    return grid


def grid_from_section(section: dict[str, list]) -> dict[str, list[str]]:
    """The ``sweep:`` mapping of the configs (checked by fit's parser: dotted keys to lists), values as text."""
    grid = {}
    for key, values in section.items():
        if "." not in key or not values:
            raise ValueError(f"sweep entry {key!r}: {values!r} is not 'dotted.key: [values]' with at least one value")
        grid[key] = [v if isinstance(v, str) else json.dumps(v) for v in values]
    return grid


def _format(value: str) -> str:
    return re.sub(r"[^\w.+-]", "-", value)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key's shortest suffix that no other key ends with: ``model.firing.reg_weight`` -> ``reg_weight``."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        short[key] = suffix
    return short


def make_points(grid: dict[str, list[str]], baseline: bool) -> list[Point]:
    """The baseline (if asked for), then the cartesian product of the grid, in the grid's order."""
    short = short_keys(list(grid))
    points = [Point(BASELINE_NAME, dict(BASELINE), baseline=True)] if baseline else []
    for values in itertools.product(*grid.values()):
        settings = dict(zip(grid, values, strict=True))
        name = "_".join(f"{short[key]}={_format(value)}" for key, value in settings.items())
        points.append(Point(name, settings))
    names = [p.name for p in points]
    if len(set(names)) < len(names):
        clash = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two grid points would share the run folder {clash!r}: the grid repeats a value")
    return points


# Settings the sweep gives every point itself; a grid over them would be overridden without a word.
SWEEP_SETS = (
    "trainer.default_root_dir",
    "trainer.logger.init_args.name",
    "trainer.logger.init_args.group",
    "trainer.logger.init_args.save_dir",
    "checkpoint.every_n_train_steps",
    "checkpoint.dirpath",
)


def check_grid(grid: dict[str, list[str]], options: SweepOptions) -> None:
    """Refuse a grid over a setting that the sweep sets for every point (the run folder, the W&B names,
    the checkpoint schedule, or the steps when ``--max_steps`` is given)."""
    for key in grid:
        if key in SWEEP_SETS:
            raise ValueError(
                f"--grid {key}: the sweep sets {key} for every point itself (its run folder, W&B names"
                " and checkpoint schedule follow from --out, --name and --checkpoint_every)"
            )
        if key == "trainer.max_steps" and options.max_steps is not None:
            raise ValueError(f"--grid {key} conflicts with --max_steps {options.max_steps}: give one of them")


def point_args(point: Point, sweep: str, run_dir: Path, options: SweepOptions, base: dict) -> list[str]:
    """The dotted overrides that make the base config into ``point``'s ``fit`` config.

    Its settings, its name in the sweep's W&B group, its run folder, the checkpoint schedule, and
    ``--max_steps``. ``base`` is the base config (as a dict) for the validation interval: once a
    validation has written last.ckpt, Lightning does not write it again at the end of training, so the
    last validation must fall on the last step for last.ckpt to be the final model.
    """
    overrides = {
        **point.settings,
        "trainer.logger.init_args.name": point.name,
        **run_overrides(sweep, str(run_dir), options, base, point.settings),
    }
    return [f"--{key}={value}" for key, value in overrides.items()]


def run_overrides(
    sweep: str, run_dir: str, options: SweepOptions, base: dict, settings: dict[str, str] | None = None
) -> dict[str, str]:
    """What every run of a sweep is given besides its ``settings``: the sweep's W&B group, the run folder, the
    checkpoint schedule and ``--max_steps`` (see ``point_args``)."""
    overrides = {
        "trainer.logger.init_args.group": sweep,
        "trainer.logger.init_args.save_dir": run_dir,
        "trainer.default_root_dir": run_dir,
        "checkpoint.every_n_train_steps": str(options.checkpoint_every),
    }
    trainer = base.get("trainer") or {}
    steps = options.max_steps or (settings or {}).get("trainer.max_steps") or trainer.get("max_steps")
    steps = int(steps) if isinstance(steps, str) and steps.isdigit() else steps  # a grid value is text
    interval = trainer.get("val_check_interval")
    if options.max_steps is not None:
        overrides["trainer.max_steps"] = str(options.max_steps)
    if isinstance(interval, int) and isinstance(steps, int) and steps % interval:
        overrides["trainer.val_check_interval"] = str(steps)
    return overrides


def config_args(configs: list[str]) -> list[str]:
    """fit's arguments for the config files: ``--config PATH``, but a file with a ``sweep:`` section, which fit
    does not read, as its other settings, one dotted override each."""
    args = []
    for path in configs:
        tree = yaml.safe_load(Path(path).read_text())
        if isinstance(tree, dict) and "sweep" in tree:
            args += [f"--{key}={value}" for key, value in _dotted({k: v for k, v in tree.items() if k != "sweep"})]
        else:
            args += ["--config", path]
    return args


def _dotted(tree: dict, prefix: str = "") -> list[tuple[str, str]]:
    """A nested mapping's leaves as (dotted key, value as fit's parser reads it)."""
    leaves = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            leaves += _dotted(value, f"{prefix}{key}.")
        else:
            leaves.append((f"{prefix}{key}", value if isinstance(value, str) else json.dumps(value)))
    return leaves


def wandb_sweep_config(
    configs: list[str],
    grid: dict[str, list[str]],
    options: SweepOptions,
    name: str,
    base: dict,
    command: str,
    point_config: PointConfig,
) -> str:
    """The W&B Sweeps config (YAML) of a grid: ``wandb sweep`` registers it, ``wandb agent`` on each machine
    runs its points as ``spiking-lm fit`` commands.

    Each run logs to the W&B group ``name``, in a folder of its own under ``OUT/runs`` (fit adds the sweep
    and run ids there under an agent), and W&B names it. Every point's command line is checked by fit's
    parser, as a local sweep checks its points. The baseline, not a grid point, is one fit command in the
    header.
    """
    runs = Path(options.out) / "runs"
    overrides = {
        **run_overrides(name, str(runs), options, base),
        "trainer.logger.init_args.name": "null",
        "trainer.logger.init_args.save_dir": "null",  # the run folder's, which an agent run gets from fit
    }
    fixed = config_args(configs) + [f"--{key}={value}" for key, value in overrides.items()]
    baseline = {
        **overrides,
        **BASELINE,
        "trainer.logger.init_args.name": BASELINE_NAME,
        "trainer.default_root_dir": str(runs / BASELINE_NAME),
    }
    baseline_args = config_args(configs) + [f"--{key}={value}" for key, value in baseline.items()]
    points = [
        fixed + [f"--{key}={value}" for key, value in zip(grid, values, strict=True)]
        for values in itertools.product(*grid.values())
    ]
    for args in points + ([baseline_args] if options.baseline else []):
        try:
            point_config(args)
        except ValueError as e:
            raise ValueError(f"W&B sweep run {shlex.join(args)}: spiking-lm fit rejects it: {e}") from None
    project = (base["trainer"].get("logger") or {}).get("init_args", {}).get("project", "spiking-lm")
    config = {
        "name": name,
        "project": project,
        "program": "spiking-lm",
        "method": "grid",
        "metric": {"name": "val_loss", "goal": "minimize"},  # logged by fit at each validation
        "parameters": {key: {"values": [yaml.safe_load(v) for v in values]} for key, values in grid.items()},
        "command": ["spiking-lm", "fit", *fixed, "${args}"],
    }
    header = [
        f"# W&B Sweeps config, written by: {command}",
        "# From the repository root (the paths below are relative to it):",
        "#   wandb sweep THIS_FILE                  # once: prints the sweep id",
        "#   wandb agent ENTITY/PROJECT/SWEEP_ID    # on each machine, as many as you have",
    ]
    if options.baseline:
        header += [
            "# The softmax + GELU baseline, to run once in the same group:",
            f"#   {shlex.join(['spiking-lm', 'fit', *baseline_args])}",
        ]
    return "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False, width=120)


def write_point_config(path: Path, text: str, point: Point) -> None:
    """Write the point's config once; an existing different one is an error."""
    text = f"# spiking-lm sweep: point {point.name}\n{text}"
    if path.exists():
        if path.read_text() != text:
            raise ValueError(
                f"{path} holds other settings than this sweep gives point {point.name} (another --config, "
                "--grid, --max_steps or --checkpoint_every?); use a new --out, or delete that point's files to redo it"
            )
        return
    write_atomic(path, text)


def _say(message: str) -> None:
    print(f"[sweep] {message}", file=sys.stderr, flush=True)


def _run_logged(command: list[str], log_path: Path) -> int:
    """Run ``command``, its output going both to the terminal and (appended, after the command) to ``log_path``.

    A SIGTERM to the sweep goes on to the command, which saves its state and exits (status 143); then so does
    the sweep. Returns the exit status, ``TERMINATED`` for a command that a signal ended.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    # Unbuffered: a sweep killed mid-point keeps its log up to the kill.
    with (
        open(log_path, "ab", buffering=0) as log,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc,
    ):
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
        try:
            # An earlier attempt that was killed may have left its last line unfinished.
            separator = b"\n" if log.tell() else b""
            log.write(separator + f"$ {shlex.join(command)}\n".encode())
            for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
                log.write(chunk)
                sys.stderr.write(decoder.decode(chunk))
                sys.stderr.flush()
            status = proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    return TERMINATED if status == -signal.SIGTERM else status


def started(run_dir: Path) -> bool:
    """Whether a fit began in ``run_dir``: it saves its config.yaml before the first step."""
    return (run_dir / "config.yaml").is_file() or (run_dir / "checkpoints" / "last.ckpt").is_file()


def fit_command(config_path: Path, run_dir: Path) -> list[str]:
    """The ``spiking-lm fit`` command of a point; ``--ckpt_path last`` when an earlier attempt started it."""
    command = [sys.executable, "-m", "spiking_lm.cli", "fit", "--config", str(config_path)]
    return command + (["--ckpt_path", "last"] if started(run_dir) else [])


def _last_error(log_path: Path) -> str:
    """The last ``spiking-lm: error:`` line of a point's log, or an empty string."""
    lines = log_path.read_text(errors="replace").splitlines() if log_path.is_file() else []
    return next((line for line in reversed(lines) if line.startswith("spiking-lm: error:")), "")


def run_point(point: Point, runs: Path, eval_batches: int, position: str, max_steps: int) -> dict:
    """Train (or resume) and evaluate one point, unless its done.json exists; its record.

    done.json is written only for a point whose last checkpoint holds all its ``max_steps``.
    """
    run_dir = runs / point.name
    done = run_dir / "done.json"
    if done.is_file():
        _say(f"{position} {point.name}: done before, skipped")
        return json.loads(done.read_text())
    command = fit_command(runs / f"{point.name}.yaml", run_dir)
    log_path = runs / f"{point.name}.log"
    _say(f"{position} {point.name}: {'resuming' if '--ckpt_path' in command else 'training'}; log {log_path}")
    _say("  " + shlex.join(command))
    start = time.perf_counter()
    status = _run_logged(command, log_path)
    if status == TERMINATED:
        raise PointFailed(
            f"point {point.name} was stopped by SIGTERM and is unfinished; see {log_path}. Rerun the"
            " same command to resume it.",
            exit_status=TERMINATED,
        )
    if status:
        # Status 1 is a fault during training; 2 a refused setting or text, which a rerun meets again.
        advice = "Rerun the same command to resume it." if status == 1 else "Fix that, then rerun the same command."
        error = _last_error(log_path)
        raise PointFailed(
            f"point {point.name} failed (exit status {status}){': ' + error if error else ''}; see {log_path}. {advice}"
        )
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise PointFailed(f"point {point.name} trained but left no {checkpoint}; see {log_path}")
    step = read_checkpoint(str(checkpoint), mmap=True)["global_step"]
    if step != max_steps:
        raise PointFailed(
            f"point {point.name} stopped at step {step} of {max_steps} and is unfinished; see"
            f" {log_path}. Rerun the same command to resume it."
        )
    _say(f"{position} {point.name}: trained in {time.perf_counter() - start:.0f} s; evaluating")
    result = evaluate(str(checkpoint), batches=eval_batches, label=f"{point.name}: ")
    record = {"point": point.name, "settings": point.settings, "baseline": point.baseline, **result}
    write_atomic(done, json.dumps(record, indent=2) + "\n")
    return record


def sweep(
    configs: list[str], grid_items: list[str] | None, options: SweepOptions, command: str, point_config: PointConfig
) -> list[dict]:
    """Run (or finish) a sweep and write its report; the records of its points in order."""
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the sweep")
    check_writable(out, "--out")
    for flag in ("max_steps", "eval_batches", "checkpoint_every"):
        value = getattr(options, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")
    base_args = [arg for path in configs for arg in ("--config", path)]
    base_text, section = point_config(base_args)
    grid = parse_grid(grid_items) if grid_items else grid_from_section(section) if section else DEFAULT_GRID
    check_grid(grid, options)
    name = options.name or out.resolve().name
    points = make_points(grid, options.baseline)
    runs = out.resolve() / "runs"
    base = yaml.safe_load(base_text)
    if options.wandb_sweep:
        print(wandb_sweep_config(configs, grid, options, name, base, command, point_config), end="")
        return []
    texts = {}
    for point in points:
        try:
            texts[point.name], _ = point_config(base_args + point_args(point, name, runs / point.name, options, base))
        except ValueError as e:
            raise ValueError(f"point {point.name}: spiking-lm fit rejects its settings: {e}") from None
    runs.mkdir(parents=True, exist_ok=True)
    write_atomic(out / ".gitignore", "# checkpoints, W&B files and logs of the runs\nruns/\n")
    for point in points:
        write_point_config(runs / f"{point.name}.yaml", texts[point.name], point)
    spiking = sum(not point.baseline for point in points)
    _say(f"{name}: {len(points)} runs ({'the baseline and ' if options.baseline else ''}{spiking} spiking) in {out}")
    records = []
    for i, point in enumerate(points, 1):
        max_steps = yaml.safe_load(texts[point.name])["trainer"]["max_steps"]
        record = run_point(point, runs, options.eval_batches, f"[{i}/{len(points)}, {len(points) - i} left]", max_steps)
        records.append({**record, "max_steps": max_steps})
    project = (base["trainer"].get("logger") or {}).get("init_args", {}).get("project", "spiking-lm")
    written = report.publish(out, records, list(grid), command, name, project)
    _say(f"wrote {', '.join(str(path) for path in written)}")
    return records


def parser() -> ArgumentParser:
    """The options of ``spiking-lm sweep``; a bad one raises ``ArgumentError``."""
    p = ArgumentParser(
        prog="spiking-lm sweep",
        exit_on_error=False,
        description="Train the softmax baseline and a grid of spiking models; tabulate and plot the comparison.",
    )
    p.add_argument(
        "--config", action="append", required=True, help="config of spiking-lm fit (repeat to merge several, in order)"
    )
    p.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2,...",
        help="a swept setting, e.g. model.firing.reg_weight=0,0.01,0.1 (repeat for a product); "
        "default: the configs' sweep: section, else regularizer strengths",
    )
    p.add_class_arguments(SweepOptions)
    return p


def main(argv: list[str], point_config: PointConfig) -> None:
    """``spiking-lm sweep``; ``point_config`` checks and completes a point's fit config (see the module docstring)."""
    args = parser().parse_args(argv)
    options = SweepOptions(**{key: args[key] for key in SweepOptions.__dataclass_fields__})
    sweep(args.config, args.grid, options, shlex.join(["spiking-lm", "sweep", *argv]), point_config)

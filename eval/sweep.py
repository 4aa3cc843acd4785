"""``spiking-lm sweep``: train the softmax baseline and a grid of spiking models, then compare them.

    spiking-lm sweep --config configs/quickstart.yaml --out DIR [--config MORE.yaml]
                     [--grid model.firing.reg_weight=0,0.1,1]... [--max-steps N] [--no-baseline]

Points. The baseline is the config with softmax attention and GELU (and no spiking Q/K/V), trained
once; the spiking points are the cartesian product of the grids, each ``KEY=V1,V2,...`` with KEY a
LightningCLI dotted key. Without ``--grid`` the grid is the config's top-level ``sweep:`` mapping
(dotted key -> list of values), and without one ``DEFAULT_GRID``, strengths of the firing-rate
regularizer. Several ``--config`` files merge in order, as in ``spiking-lm fit``, so a small file can
add a sweep section to a shared config.

Each point is an ordinary ``spiking-lm fit``, in a subprocess so that a crash or W&B's per-process
state cannot reach the next one. Its config is ``DIR/runs/<point>.yaml`` (the merged config, minus
``sweep:``, plus the point's settings; checked by ``fit --print_config`` before anything trains),
its console output ``DIR/runs/<point>.log``, its run folder ``DIR/runs/<point>/``; all runs log to one
W&B group named after the sweep. The last checkpoint is then evaluated (``spiking_lm.eval.evaluate``)
and ``DIR/runs/<point>/done.json`` written atomically. Points write ``last.ckpt`` every
``CHECKPOINT_EVERY`` steps. A rerun skips points with ``done.json``, continues every point whose run folder
exists with ``--ckpt_path last`` (from its ``last.ckpt``, or from the start when it stopped before its first
save), and refuses to continue in a folder whose point configs differ from the ones it would write.

At the end ``spiking_lm.eval.report`` writes results.csv, frontier.png, layers.png, raster.png and
report.md into DIR, and logs the table and figures to a summary run of the W&B group.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from spiking_lm.eval import report
from spiking_lm.eval.evaluate import DEFAULT_BATCHES, evaluate
from spiking_lm.files import write_atomic

DEFAULT_GRID = {"model.firing.reg_weight": [0.0, 0.01, 0.1, 1.0]}
BASELINE = {"model.gpt.attention": "softmax", "model.gpt.mlp_activation": "gelu", "model.gpt.spiking_qkv": False,
            "model.gpt.spiking_qkv_in": False, "model.gpt.spiking_proj_in": False, "model.gpt.spiking_fc_in": False}
BASELINE_NAME = "softmax"
LOGGER = "spiking_lm.train.logger.AutoWandbLogger"


class PointFailed(RuntimeError):
    """A point's training run exited with an error; rerunning the sweep resumes it."""


@dataclass
class Point:
    name: str
    settings: dict[str, Any]
    """Dotted key -> value: the grid values, or ``BASELINE``."""
    baseline: bool = False


def parse_value(text: str) -> Any:
    """A grid value as YAML would read it, except that ``1e-3`` is a number (YAML 1.1 wants ``1.0e-3``)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["model.firing.reg_weight=0,0.1"]`` -> ``{"model.firing.reg_weight": [0, 0.1]}``."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        parts = [v.strip() for v in values.split(",")]
        if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", key) or "" in parts:
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,... with a dotted KEY, "
                             "e.g. model.firing.reg_weight=0,0.01,0.1")
        if key in grid:
            raise ValueError(f"--grid {key} is given twice; list all its values in one --grid")
        grid[key] = [parse_value(v) for v in parts]
    return grid


def grid_from_section(section: Any, where: str) -> dict[str, list]:
    """The ``sweep:`` mapping of a config, checked: dotted keys to non-empty lists (a scalar is a one-value list)."""
    if not isinstance(section, dict) or not section:
        raise ValueError(f"{where}: 'sweep' must map dotted keys to lists of values, got {section!r}")
    grid = {}
    for key, values in section.items():
        values = values if isinstance(values, list) else [values]
        if not isinstance(key, str) or "." not in key or not values:
            raise ValueError(f"{where}: sweep entry {key!r}: {values!r} is not 'dotted.key: [values]'")
        grid[key] = values
    return grid


def load_config(paths: list[str]) -> dict:
    """The YAML files merged in order (mappings merge key by key; anything else is replaced)."""

    def merge(base: dict, extra: dict) -> dict:
        for key, value in extra.items():
            both = isinstance(value, dict) and isinstance(base.get(key), dict)
            base[key] = merge(base[key], value) if both else value
        return base

    merged: dict = {}
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config not found: {path}")
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} does not hold a mapping of settings")
        merge(merged, loaded)
    return merged


def _format(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, bool) else str(value)
    return re.sub(r"[^\w.+-]", "-", text)


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


def make_points(grid: dict[str, list], baseline: bool) -> list[Point]:
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


def _set(config: dict, key: str, value: Any) -> None:
    node = config
    *parents, leaf = key.split(".")
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {key}: {'.'.join(parents[:i + 1])} is {node!r} in the config, not a group")
    node[leaf] = value


def point_config(base: dict, point: Point, sweep: str, max_steps: int | None) -> dict:
    """The point's ``fit`` config: base minus ``sweep:``, its settings, the W&B logger in the sweep's group."""
    config = copy.deepcopy(base)
    config.pop("sweep", None)
    for key, value in point.settings.items():
        _set(config, key, value)
    trainer = config.setdefault("trainer", {})
    logger = trainer.get("logger")
    kept = logger.get("init_args", {}) if isinstance(logger, dict) and logger.get("class_path") == LOGGER else {}
    # Paths are given on the command line, so this file says only what the run is.
    kept = {k: v for k, v in kept.items() if k != "save_dir"}
    trainer["logger"] = {"class_path": LOGGER, "init_args": {**kept, "name": point.name, "group": sweep}}
    trainer.pop("default_root_dir", None)
    if max_steps is not None:
        trainer["max_steps"] = max_steps
    # Once a validation has written last.ckpt, Lightning does not write it again at the end of
    # training, so the last validation must fall on the last step for last.ckpt to be the final model.
    interval, steps = trainer.get("val_check_interval"), trainer.get("max_steps")
    if isinstance(interval, int) and isinstance(steps, int) and steps % interval:
        trainer["val_check_interval"] = steps
    return config


def _check_with_fit(path: Path, point: Point, fit_check: Callable[[list[str]], None]) -> None:
    """Parse the point's config as ``spiking-lm fit`` would (``--print_config``, nothing instantiated)."""
    errors = io.StringIO()
    # LightningCLI warns when it is given args while sys.argv holds some too (the sweep's own).
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
            fit_check(["--config", str(path)])
    except SystemExit as e:
        if e.code:
            message = next((line for line in reversed(errors.getvalue().splitlines()) if line.strip()), "")
            raise ValueError(f"point {point.name}: spiking-lm fit rejects its settings: {message}") from None
    finally:
        sys.argv = argv


def write_point_config(path: Path, config: dict, point: Point, fit_check: Callable[[list[str]], None]) -> None:
    """Write the point's config once, after fit accepts it; an existing different one is an error."""
    text = f"# spiking-lm sweep: point {point.name}\n" + yaml.safe_dump(config, sort_keys=False)
    if path.exists():
        if path.read_text() != text:
            raise ValueError(
                f"{path} holds other settings than this sweep gives point {point.name} (another --config, "
                "--grid or --max-steps?); use a new --out, or delete that point's files to redo it"
            )
        return
    tmp = path.with_name(f".{path.name}.check.yaml")
    tmp.write_text(text)
    try:
        _check_with_fit(tmp, point, fit_check)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _say(message: str) -> None:
    print(f"[sweep] {message}", file=sys.stderr, flush=True)


def _run_logged(command: list[str], log_path: Path) -> int:
    """Run ``command``, its output going both to the terminal and (appended, after the command) to ``log_path``.

    Returns the exit status.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(log_path, "ab") as log, subprocess.Popen(command, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT) as proc:
        log.write(f"$ {shlex.join(command)}\n".encode())
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
            log.write(chunk)
            sys.stderr.write(decoder.decode(chunk))
            sys.stderr.flush()
        return proc.wait()


# Steps between two last.ckpt of a point: what an interrupted sweep loses at most.
CHECKPOINT_EVERY = 50


def fit_command(config_path: Path, run_dir: Path) -> list[str]:
    """The ``spiking-lm fit`` command of a point; ``--ckpt_path last`` once its run has started."""
    command = [sys.executable, "-m", "spiking_lm.cli", "fit", "--config", str(config_path),
               "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
               "--checkpoint.every_n_train_steps", str(CHECKPOINT_EVERY)]
    if run_dir.is_dir() and any(run_dir.iterdir()):
        command += ["--ckpt_path", "last"]
    return command


def run_point(point: Point, runs: Path, eval_batches: int, position: str) -> dict:
    """Train (or resume) and evaluate one point, unless its done.json exists; its record."""
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
    if status:
        raise PointFailed(f"point {point.name} failed (exit status {status}); see {log_path}. "
                          "Rerun the same command to resume it.")
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise PointFailed(f"point {point.name} trained but left no {checkpoint}; see {log_path}")
    _say(f"{position} {point.name}: trained in {time.perf_counter() - start:.0f} s; evaluating")
    result = evaluate(str(checkpoint), batches=eval_batches, label=f"{point.name}: ")
    record = {"point": point.name, "settings": point.settings, "baseline": point.baseline, **result}
    write_atomic(done, json.dumps(record, indent=2) + "\n")
    return record


def sweep(configs: list[str], out: Path, grid: dict[str, list] | None, max_steps: int | None, baseline: bool,
          eval_batches: int, name: str | None, command: str, fit_check: Callable[[list[str]], None]) -> list[dict]:
    """Run (or finish) a sweep and write its report; the records of its points in order."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the sweep")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {max_steps}")
    if eval_batches < 1:
        raise ValueError(f"--eval-batches must be >= 1, got {eval_batches}")
    base = load_config(configs)
    if grid is None:
        grid = grid_from_section(base["sweep"], " + ".join(configs)) if "sweep" in base else DEFAULT_GRID
    name = name or out.resolve().name
    points = make_points(grid, baseline)
    runs = out.resolve() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    write_atomic(out / ".gitignore", "# checkpoints, W&B files and logs of the runs\nruns/\n")
    fit_configs = {point.name: point_config(base, point, name, max_steps) for point in points}
    for point in points:
        write_point_config(runs / f"{point.name}.yaml", fit_configs[point.name], point, fit_check)
    spiking = sum(not point.baseline for point in points)
    _say(f"{name}: {len(points)} runs ({'the baseline and ' if baseline else ''}{spiking} spiking) in {out}")
    records = []
    for i, point in enumerate(points, 1):
        record = run_point(point, runs, eval_batches, f"[{i}/{len(points)}, {len(points) - i} left]")
        records.append({**record, "max_steps": fit_configs[point.name]["trainer"].get("max_steps")})
    project = fit_configs[points[0].name]["trainer"]["logger"]["init_args"].get("project", "spiking-lm")
    written = report.publish(out, records, list(grid), command, name, project)
    _say(f"wrote {', '.join(str(path) for path in written)}")
    return records


def main(argv: list[str], fit_check: Callable[[list[str]], None]) -> None:
    """``spiking-lm sweep``; ``fit_check(args)`` parses ``spiking-lm fit`` options, exiting non-zero on bad ones."""
    p = argparse.ArgumentParser(
        prog="spiking-lm sweep",
        description="Train the softmax baseline and a grid of spiking models; tabulate and plot the comparison.",
    )
    p.add_argument("--config", action="append", required=True, help="base config (repeat to merge several)")
    p.add_argument("--out", required=True, help="folder of the sweep (created; a rerun resumes it)")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                   help="a swept setting, e.g. model.firing.reg_weight=0,0.01,0.1 (repeat for a product); "
                        "default: the config's sweep: section, else regularizer strengths")
    p.add_argument("--max-steps", type=int, default=None, help="train every run for N steps (smoke tests)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the softmax + GELU baseline (default: yes)")
    p.add_argument("--eval-batches", type=int, default=DEFAULT_BATCHES, help="validation batches per evaluation")
    p.add_argument("--name", default=None, help="sweep and W&B group name (default: the --out folder's name)")
    args = p.parse_args(argv)
    grid = parse_grid(args.grid) if args.grid else None
    sweep(args.config, Path(args.out), grid, args.max_steps, args.baseline, args.eval_batches, args.name,
          shlex.join(["spiking-lm", "sweep", *argv]), fit_check)

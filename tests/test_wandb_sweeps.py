"""W&B Sweeps: the committed configs/sweeps/*.yaml expand to fit command lines that fit's parser accepts, each
run logs to the sweep's group the metric the sweep optimises, and ``spiking-lm sweep --wandb_sweep true`` prints
the committed config for its grid."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest
import yaml
from conftest import fit

from spiking_lm.cli import main, sweep_point_config

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def agent_commands(sweep: dict) -> list[list[str]]:
    """The command lines ``wandb agent`` runs for a grid sweep: ``${args}`` becomes ``--name=value`` per parameter,
    with the value as Python prints it (as the agent formats it)."""
    names = list(sweep["parameters"])
    commands = []
    for values in itertools.product(*(sweep["parameters"][name]["values"] for name in names)):
        args = [f"--{name}={value}" for name, value in zip(names, values, strict=True)]
        i = sweep["command"].index("${args}")
        commands.append([*sweep["command"][:i], *args, *sweep["command"][i + 1 :]])
    return commands


def nested(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


@pytest.fixture
def in_repo(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # the configs' paths are relative to the repository root, as for `wandb agent`
    monkeypatch.setenv("SPIKING_LM_CACHE_DIR", str(tmp_path / "cache"))


def test_there_are_sweeps():
    assert {path.name for path in SWEEPS} >= {"rate_frontier.yaml", "spike_driven_screens.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda path: path.stem)
@pytest.mark.slow
def test_every_agent_command_is_a_fit_that_logs_to_the_sweeps_group(path, in_repo):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] == "grid" and sweep["metric"] == {"name": "val_loss", "goal": "minimize"}
    commands = agent_commands(sweep)
    assert len(commands) == len(list(itertools.product(*(p["values"] for p in sweep["parameters"].values())))) > 1
    for command in commands:
        assert command[:2] == ["spiking-lm", "fit"]
        config = yaml.safe_load(sweep_point_config(command[2:])[0])  # fit's own parser, and the model built
        logger = config["trainer"]["logger"]
        assert logger["class_path"] == "spiking_lm.train.logger.AutoWandbLogger"
        assert logger["init_args"]["group"] == sweep["name"] and logger["init_args"]["project"] == sweep["project"]
        for name, spec in sweep["parameters"].items():
            assert nested(config, name) in spec["values"]
        assert [nested(config, name) for name in sweep["parameters"]] == [
            yaml.safe_load(arg.partition("=")[2])
            for arg in command
            if arg.startswith("--") and arg.partition("=")[0][2:] in sweep["parameters"]
        ]


def test_an_agent_run_has_a_folder_of_its_own_and_logs_the_metric_the_sweeps_optimise(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKING_LM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")  # what `wandb agent` sets for each run it starts
    monkeypatch.setenv("WANDB_RUN_ID", "run7")
    root = fit(tmp_path, steps=3)  # tiny.yaml validates every 3 steps
    assert (root / "abc123" / "run7" / "checkpoints" / "last.ckpt").is_file()
    (path,) = root.glob("*/version_0/metrics.csv")
    with open(path) as f:
        logged = {key for row in csv.DictReader(f) for key, value in row.items() if value}
    assert {yaml.safe_load(p.read_text())["metric"]["name"] for p in SWEEPS} <= logged


@pytest.mark.slow
def test_spiking_lm_sweep_prints_the_committed_config(capsys, in_repo):
    committed = (REPO / "configs" / "sweeps" / "rate_frontier.yaml").read_text()
    argv = committed.splitlines()[0].split("written by: spiking-lm ")[1].split()
    assert argv[0] == "sweep" and argv[-2:] == ["--wandb_sweep", "true"]
    out = REPO / argv[argv.index("--out") + 1]
    existed = out.exists()
    capsys.readouterr()
    main(argv)
    assert capsys.readouterr().out == committed
    assert out.exists() == existed  # nothing trained, no folder made

"""``spiking-lm sweep``: grids and point configs, then one tiny sweep end to end, rerun, resumed and refused."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from conftest import TINY, ckpt_step, spiking_lm_process

from spiking_lm.cli import main, sweep_point_config
from spiking_lm.eval import sweep as sweep_module
from spiking_lm.eval.sweep import BASELINE, Point, SweepOptions, make_points, parse_grid, point_args, short_keys

FIGURES = ("frontier.png", "layers.png", "raster.png")


pytestmark = pytest.mark.usefixtures("isolated")


def test_grid_points_and_their_configs(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  firing: {target: 0.0}\nsweep:\n  model.firing.reg_weight: [0, 1e-2]\n")
    base_args = ["--config", TINY, "--config", str(extra)]
    text, section = sweep_point_config(base_args)
    base = yaml.safe_load(text)
    assert section == {"model.firing.reg_weight": [0, 0.01]} and "sweep" not in base
    assert base["model"]["gpt"]["n_embd"] == 16 and base["model"]["firing"]["target"] == 0.0  # merged by fit's parser
    grid = parse_grid(["model.gpt.attn_neuron.threshold=0.05,0.1", "model.gpt.mlp_neuron.threshold=1e-1"])
    assert grid == {"model.gpt.attn_neuron.threshold": ["0.05", "0.1"], "model.gpt.mlp_neuron.threshold": ["1e-1"]}
    assert short_keys(list(grid)) == {
        "model.gpt.attn_neuron.threshold": "attn_neuron.threshold",
        "model.gpt.mlp_neuron.threshold": "mlp_neuron.threshold",
    }
    points = make_points(grid, baseline=True)
    assert [p.name for p in points] == [
        "softmax",
        "attn_neuron.threshold=0.05_mlp_neuron.threshold=1e-1",
        "attn_neuron.threshold=0.1_mlp_neuron.threshold=1e-1",
    ]

    options = SweepOptions(out="out", max_steps=4, checkpoint_every=2)
    args = point_args(Point("reg", {"model.firing.reg_weight": "0.5"}), "my-sweep", tmp_path / "reg", options, base)
    config = yaml.safe_load(sweep_point_config(base_args + args)[0])
    assert config["model"]["firing"] == {"target": 0.0, "reg_weight": 0.5}
    logger = config["trainer"]["logger"]
    assert logger["class_path"] == "spiking_lm.train.logger.AutoWandbLogger"
    assert {k: logger["init_args"][k] for k in ("name", "group", "save_dir", "tags")} == {
        "name": "reg",
        "group": "my-sweep",
        "save_dir": str(tmp_path / "reg"),
        "tags": ["tiny"],
    }
    assert config["trainer"]["default_root_dir"] == str(tmp_path / "reg")
    assert config["trainer"]["max_steps"] == 4 and config["trainer"]["val_check_interval"] == 4  # 4 % 3 != 0
    assert config["checkpoint"]["every_n_train_steps"] == 2
    baseline = yaml.safe_load(sweep_point_config(base_args + [f"--{k}={v}" for k, v in BASELINE.items()])[0])
    assert (
        baseline["model"]["gpt"]["attention"],
        baseline["model"]["gpt"]["mlp_activation"],
        baseline["model"]["gpt"]["spiking_qkv"],
    ) == ("softmax", "gelu", False)


@pytest.mark.parametrize(
    "grid, message",
    [
        ("model.firing.reg_weight", "KEY=V1,V2"),
        ("reg_weight=1,2", "dotted KEY"),
        ("model.firing.reg_weight=1,,2", "KEY=V1,V2"),
    ],
)
def test_bad_grids_are_refused(capsys, grid, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", TINY, "--out", "out", "--grid", grid])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not Path("out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "afile"], "is a file"),
        (["--config", "nope.yaml", "--out", "out"], "nope.yaml"),
        # A misspelt key and a value of the wrong type are caught by fit's own parser before anything trains.
        (["--out", "out", "--grid", "model.firing.reg_wieght=0,1"], "reg_wieght"),
        (["--out", "out", "--grid", "model.firing.reg_weight=0,strong"], "reg_weight"),
        # A model that cannot be built is caught too, not at training time.
        (
            ["--out", "out", "--grid", "model.gpt.n_head=2,3"],
            "point n_head=3: spiking-lm fit rejects its settings: n_embd (16) must be divisible by n_head (3)",
        ),
        (["--out", "out", "--max_steps", "0"], "--max_steps must be >= 1, got 0"),
        (["--out", "out", "--checkpoint_every", "0"], "--checkpoint_every must be >= 1, got 0"),
        (["--out", "out", "--max-steps", "3"], "--max-steps"),  # the old spelling
    ],
)
def test_sweep_refuses_bad_options_before_training(capsys, monkeypatch, argv, message):
    Path("afile").write_text("keep me")
    monkeypatch.setattr(sweep_module, "_run_logged", lambda *args: pytest.fail("a bad sweep started training"))
    config = [] if "--config" in argv else ["--config", TINY]
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", *config, *argv, "--baseline", "false"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("spiking-lm: error: ") and message in err, err
    assert Path("afile").read_text() == "keep me" and not list(Path().glob("out/runs/*.yaml"))


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def checkpoint_mtimes(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.glob("runs/*/checkpoints/*.ckpt")}


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path, monkeypatch, offline_run):
    # Neurons that fire from the start, and a regularizer that pulls every rate toward 0.
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "model:\n  gpt:\n    attn_neuron: {threshold: 0.02}\n    mlp_neuron: {threshold: 0.1}\n"
        "  firing: {target: 0.0}\n"
    )
    argv = [
        "sweep",
        "--config",
        TINY,
        "--config",
        str(extra),
        "--out",
        "sweep",
        "--max_steps",
        "6",
        "--grid",
        "model.firing.reg_weight=0,100",
        "--eval_batches",
        "2",
        "--checkpoint_every",
        "4",
    ]
    spiking_lm_process(argv)
    out = tmp_path / "sweep"
    for name in ("results.csv", "report.md", ".gitignore", *FIGURES):
        assert (out / name).is_file(), name
    for name in FIGURES:
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == [
        "variant",
        "model.firing.reg_weight",
        "params",
        "timesteps",
        "mean_firing_rate",
        "val_loss",
        "val_ppl",
        "bpc",
        "energy_pj_per_token",
        "energy_ratio_vs_softmax",
        "energy_ratio_fp16",
        "energy_ratio_int8",
        "tokens_per_s",
        "dead_frac",
        "saturated_frac",
    ]
    baseline, weak, strong = rows
    assert baseline["variant"] == "softmax/gelu" and baseline["mean_firing_rate"] == ""
    assert baseline["model.firing.reg_weight"] == "" and float(baseline["energy_ratio_vs_softmax"]) == 1
    assert float(baseline["energy_ratio_fp16"]) == float(baseline["energy_ratio_int8"]) == 1
    assert weak["variant"] == strong["variant"] == "spiking/lif"
    assert (weak["model.firing.reg_weight"], strong["model.firing.reg_weight"]) == ("0", "100")
    assert float(strong["mean_firing_rate"]) < float(weak["mean_firing_rate"]) / 2  # the regularizer works
    report = (out / "report.md").read_text()
    assert "spiking-lm sweep --config" in report and "![frontier](frontier.png)" in report
    assert (out / ".gitignore").read_text().splitlines()[-1] == "runs/"
    # The W&B summary run, in the sweep's group: one table of all points (results.csv's), and the figures.
    summary = offline_run(out / "runs" / "wandb")
    (start,) = summary.of("run")
    assert (start.run_group, start.job_type) == ("sweep", "sweep-summary")
    (logged,) = [row for row in summary.history if "results" in row]
    table = json.loads(summary.media(logged["results"]).read_text())
    assert table["columns"] == list(rows[0])
    assert [
        [f"{v:.6g}" if isinstance(v, float) else "" if v is None else str(v) for v in row] for row in table["data"]
    ] == [list(row.values()) for row in rows]
    for name in FIGURES:
        image = logged[name.removesuffix(".png")]
        assert image["_type"] == "image-file"
        assert matplotlib.image.imread(summary.media(image)).shape == matplotlib.image.imread(out / name).shape
    for point in ("softmax", "reg_weight=0", "reg_weight=100"):
        assert (
            yaml.safe_load((out / "runs" / f"{point}.yaml").read_text())["trainer"]["logger"]["init_args"]["group"]
            == "sweep"
        )
        (start,) = offline_run(out / "runs" / point / "wandb").of("run")
        assert (start.run_group, start.display_name) == ("sweep", point)

    # A rerun trains nothing and rewrites the outputs.
    monkeypatch.setenv("WANDB_MODE", "disabled")  # W&B was checked above; spare its start-up from here on
    mtimes = checkpoint_mtimes(out)
    (out / "frontier.png").unlink()

    def no_training(*args, **kwargs):
        raise AssertionError(f"a finished sweep started {args}")

    with monkeypatch.context() as patch:
        patch.setattr(sweep_module.subprocess, "Popen", no_training)
        main(argv)
    assert checkpoint_mtimes(out) == mtimes and (out / "frontier.png").is_file()
    # The same results, but for tokens/s, which is measured anew.
    assert [{**row, "tokens_per_s": ""} for row in read_csv(out / "results.csv")] == [
        {**row, "tokens_per_s": ""} for row in rows
    ]

    # An interrupted point (a checkpoint, no done.json) is resumed from its last checkpoint, then evaluated.
    done = out / "runs" / "reg_weight=100" / "done.json"
    done.unlink()
    commands = []

    def resumed(command, log_path):
        commands.append(command)
        return 0

    with monkeypatch.context() as patch:
        patch.setattr(sweep_module, "_run_logged", resumed)
        main(argv)
    (command,) = commands
    assert command[-2:] == ["--ckpt_path", "last"] and "reg_weight=100.yaml" in command[command.index("--config") + 1]
    assert json.loads(done.read_text())["step"] == 6

    # Other settings in the same folder are refused, and nothing is touched.
    results, mtimes = (out / "results.csv").read_text(), checkpoint_mtimes(out)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--max_steps", "7"])
    assert exit_info.value.code == 2
    assert (out / "results.csv").read_text() == results and checkpoint_mtimes(out) == mtimes


def _record(name, loss, ratio, rate):
    """A sweep record as far as the frontier plot reads it; a run without a firing rate is the baseline."""
    return {
        "point": name,
        "settings": {"row": name},
        "baseline": rate is None,
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "mean_firing_rate": rate,
        "energy": {"ratio_vs_dense": ratio},
    }


def test_frontier_draws_loss_against_relative_energy_coloured_by_rate():
    from spiking_lm.eval import plots

    records = [_record("softmax", 1.87, 1.0, None), _record("a", 1.93, 2.2, 0.07), _record("b", 2.1, 0.2, 0.1)]
    rate_ax, energy_ax = plots.frontier_figure(records, ["row"]).axes[:2]
    assert sorted(t.get_text() for t in energy_ax.texts) == ["a", "b", "softmax"]  # few, short: labelled inline
    # Left: perplexity over firing rate for the spiking points; the baseline, which has no rate, as a line.
    assert sorted(map(tuple, rate_ax.collections[0].get_offsets().tolist())) == [
        (0.07, pytest.approx(math.exp(1.93))),
        (0.1, pytest.approx(math.exp(2.1))),
    ]
    assert any(list(line.get_ydata()) == [math.exp(1.87)] * 2 for line in rate_ax.lines)
    # Right (no presets in these records): val loss over the energy ratio, all three points, "a" off the front.
    drawn = sorted(tuple(p) for c in energy_ax.collections for p in c.get_offsets().tolist())
    assert drawn == [(0.2, 2.1), (1.0, 1.87), (2.2, 1.93)]
    (front,) = [line for line in energy_ax.lines if line.get_label() == "Pareto front"]
    assert list(zip(front.get_xdata(), front.get_ydata(), strict=True)) == [(0.2, 2.1), (1.0, 1.87)]
    assert plots.frontier(records, ["row"]).startswith(b"\x89PNG")


def test_a_crowded_frontier_numbers_its_points_and_spells_them_out_below():
    from spiking_lm.eval import plots

    records = [_record("softmax", 1.87, 1.0, None)]
    records += [_record(f"variant {i}", 2.0 + i / 10, 0.3 + i / 10, 0.1 + i / 50) for i in range(9)]
    fig = plots.frontier_figure(records, ["row"])
    rate_ax, energy_ax, key_ax = fig.axes[:3]
    assert sorted(int(t.get_text()) for t in energy_ax.texts) == list(range(1, 11))
    assert sorted(int(t.get_text()) for t in rate_ax.texts) == list(range(2, 11))  # the baseline has no rate
    key = "\n".join(t.get_text() for t in key_ax.texts)
    assert "  1  softmax\n" in key and "  2  variant 0\n" in key and key.endswith(" 10  variant 8")


@pytest.mark.slow
def test_a_killed_sweep_resumes_with_one_rerun(tmp_path, monkeypatch):
    # Issue 13: a sweep killed mid-point loses at most --checkpoint_every steps, and the same command finishes it.
    # W&B is beside the point here; and a W&B service of this test process must not outlive the killed run's id.
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    argv = [
        "sweep",
        "--config",
        TINY,
        "--out",
        "sweep",
        "--grid",
        "model.firing.reg_weight=0.1",
        "--baseline",
        "false",
        "--max_steps",
        "40",
        "--eval_batches",
        "1",
        "--checkpoint_every",
        "5",
    ]
    # Its own session, so that the kill reaches the point's training process too.
    proc = subprocess.Popen(
        [sys.executable, "-m", "spiking_lm.cli", *argv],
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    runs = tmp_path / "sweep" / "runs"
    last = runs / "reg_weight=0.1" / "checkpoints" / "last.ckpt"
    try:
        while proc.poll() is None and not (last.is_file() and ckpt_step(last) >= 10):
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    killed_at = ckpt_step(last)
    assert 10 <= killed_at < 40 and killed_at % 5 == 0

    main(argv)
    assert json.loads((runs / "reg_weight=0.1" / "done.json").read_text())["step"] == 40
    commands = [line for line in (runs / "reg_weight=0.1.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and commands[1].endswith("--ckpt_path last") and "--ckpt_path" not in commands[0]
    assert ckpt_step(last) == 40


def test_a_point_interrupted_before_its_first_save_is_continued(tmp_path):
    run_dir = tmp_path / "runs" / "reg"
    assert "--ckpt_path" not in sweep_module.fit_command(tmp_path / "runs" / "reg.yaml", run_dir)
    run_dir.mkdir(parents=True)  # what checking the point's config leaves: an empty folder, no run started
    assert "--ckpt_path" not in sweep_module.fit_command(tmp_path / "runs" / "reg.yaml", run_dir)
    # Killed after fit wrote its config, before any checkpoint: the rerun continues it (fit starts it over).
    (run_dir / "config.yaml").write_text("# written before the kill\n")
    assert sweep_module.fit_command(tmp_path / "runs" / "reg.yaml", run_dir)[-2:] == ["--ckpt_path", "last"]


def test_report_and_frontier_give_every_preset_and_the_memory_term():
    from spiking_lm.eval import plots, report

    def record(name, loss, ratios, memory):
        presets = {}
        for preset, ratio in ratios.items():
            presets[preset] = {"pj_per_token": ratio * 1e6, "dense_pj_per_token": 1e6, "ratio_vs_dense": ratio}
            if memory:
                presets[preset].update(pj_per_byte=160.0, compute_ratio_vs_dense=ratio / 2)
        return {
            "point": name,
            "settings": {"row": name, "steps": 500},
            "baseline": False,
            "val_loss": loss,
            "val_ppl": math.exp(loss),
            "bpc": loss,
            "mean_firing_rate": 0.1,
            "variant": "spiking/lif",
            "params": 1,
            "timesteps": 4,
            "dead_frac": 0.0,
            "saturated_frac": 0.0,
            "energy": {"pj_per_token": 1.0, "ratio_vs_dense": ratios["fp32"], "presets": presets},
        }

    records = [
        record("a", 2.1, {"fp32": 0.2, "fp16": 0.3, "int8": 0.6}, True),
        record("b", 2.0, {"fp32": 0.4, "fp16": 0.5, "int8": 0.9}, True),
    ]
    columns, rows = report.table(records, ["row"], [1.0, 1.0])
    assert columns[columns.index("energy_ratio_vs_softmax") : columns.index("tokens_per_s")] == [
        "energy_ratio_vs_softmax",
        "energy_ratio_fp16",
        "energy_ratio_int8",
        "energy_ratio_fp32_mem",
        "energy_ratio_fp16_mem",
        "energy_ratio_int8_mem",
    ]
    assert (rows[0]["energy_ratio_int8"], rows[0]["energy_ratio_int8_mem"]) == (0.3, 0.6)  # compute alone, with memory
    assert plots.frontier(records, ["row"]).startswith(b"\x89PNG")
    records = [{**r, "energy": {**r["energy"], "presets": {}}} for r in records]  # evaluated before the presets
    columns, rows = report.table(records, ["row"], [1.0, 1.0])
    assert "energy_ratio_fp32_mem" not in columns and rows[0]["energy_ratio_fp16"] is None

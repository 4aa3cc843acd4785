"""SIGTERM, how schedulers and ``timeout`` stop jobs: the state is kept, the exit status says so (143), and the
run (or the sweep point) resumes as if it had not been stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from conftest import SPIKING_LM, TINY, ckpt_step, fit, train_losses
from lightning.pytorch.callbacks import Callback

from spiking_lm.cli import main


@pytest.fixture(autouse=True)
def _setup(isolated, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # runs compared to 1e-6 need the same thread count


def terminate_at(command: list[str], line_start: str, cwd) -> tuple[int, str, str]:
    """Run ``command``, send it SIGTERM once it prints a line starting with ``line_start``; (status, out, err)."""
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith(line_start):
                proc.send_signal(signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, "".join(out) + rest, err


# Dropout draws random masks every step; validation every 10 steps.
RUN = ["--trainer.max_steps", "30", "--model.gpt.dropout", "0.1", "--trainer.val_check_interval", "10"]


@pytest.mark.slow
def test_sigterm_saves_the_step_exits_143_and_says_how_to_resume(tmp_path):
    root = tmp_path / "stopped"
    argv = [
        "fit",
        "--config",
        TINY,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "true",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(root),
        "--trainer.logger.version",
        "0",
        *RUN,
    ]
    status, out, err = terminate_at([*SPIKING_LM, *argv], "step 15/30", tmp_path)  # progress lines off a tty
    last = root / "checkpoints" / "last.ckpt"
    assert status == 143, err[-3000:]
    stopped_at = ckpt_step(last)
    assert 15 <= stopped_at < 30  # the step the signal came in, not the validation at step 10
    line = err.strip().splitlines()[-1]
    assert line == (
        f"spiking-lm: error: training stopped by SIGTERM: {last} holds step {stopped_at}; resume with:"
        f" spiking-lm {' '.join(argv)} --ckpt_path last"
    )
    assert "Traceback" not in err and "final val loss" not in out

    resumed = train_losses(fit(tmp_path, "--ckpt_path", "last", *RUN, name="stopped", steps=30))
    full = train_losses(fit(tmp_path, *RUN, name="full", steps=30))
    assert min(resumed) == stopped_at and max(resumed) == 29
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], abs=1e-6), step


class SigtermInValidation(Callback):
    """Sends this process SIGTERM in the middle of the validation after training step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.global_step == self.step and batch_idx == 1 and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_during_validation_keeps_the_step_before_it(tmp_path, capsys, monkeypatch):
    from spiking_lm.train.module import LitLM

    callbacks = LitLM.configure_callbacks
    monkeypatch.setattr(LitLM, "configure_callbacks", lambda self: [*callbacks(self), SigtermInValidation(3)])
    with pytest.raises(SystemExit) as stopped:
        fit(tmp_path, "--trainer.val_check_interval", "3", "--data.val_batches", "3", steps=9)
    monkeypatch.undo()
    err = capsys.readouterr().err
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert stopped.value.code == 143
    assert f"training stopped by SIGTERM: {last} holds step 3; resume with: spiking-lm fit" in err
    assert ckpt_step(last) == 3
    fit(tmp_path, "--ckpt_path", "last", "--trainer.val_check_interval", "3", "--data.val_batches", "3", steps=9)
    assert ckpt_step(last) == 9


def test_sigterm_before_the_first_step_says_nothing_was_saved(tmp_path, capsys, monkeypatch):
    from spiking_lm.train.module import LitLM

    # The sanity check's validation, before any training step.
    monkeypatch.setattr(LitLM, "on_validation_start", lambda self: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as stopped:
        main(
            ["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false"]
        )
    assert stopped.value.code == 143
    err = capsys.readouterr().err
    assert "training stopped by SIGTERM: no checkpoint was written yet; resume with: spiking-lm fit" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"), reason="needs Linux /proc")
def test_a_sweep_point_stopped_by_sigterm_is_unfinished_and_resumed(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # beside the point here
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
        "100",
    ]
    proc = subprocess.Popen(
        [*SPIKING_LM, *argv], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    err = []
    try:
        for line in proc.stderr:  # the point's output comes through the sweep's stderr
            err.append(line)
            if line.startswith("step 10/40"):
                (fit,) = _children(proc.pid)
                os.kill(fit, signal.SIGTERM)  # the point's fit, as a scheduler stops it
                break
        err.append(proc.communicate(timeout=120)[1])
    finally:
        proc.kill()
    err = "".join(err)
    runs = tmp_path / "sweep" / "runs"
    last = runs / "reg_weight=0.1" / "checkpoints" / "last.ckpt"
    assert proc.returncode == 143, err[-3000:]
    assert "point reg_weight=0.1 was stopped by SIGTERM and is unfinished" in err
    assert "Rerun the same command to resume it." in err
    assert not (runs / "reg_weight=0.1" / "done.json").exists() and not (tmp_path / "sweep" / "results.csv").exists()
    stopped_at = ckpt_step(last)
    assert 10 <= stopped_at < 40

    main(argv)  # the rerun resumes the point and finishes it
    assert json.loads((runs / "reg_weight=0.1" / "done.json").read_text())["step"] == 40
    commands = [line for line in (runs / "reg_weight=0.1.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and commands[1].endswith("--ckpt_path last")
    rows = (tmp_path / "sweep" / "results.csv").read_text()
    assert "reg_weight" in rows


def test_a_point_that_ended_short_of_its_steps_is_not_recorded_done(tmp_path, monkeypatch):
    from spiking_lm.eval import sweep as sweep_module

    # A fit that exits 0 short of max_steps (as one stopped by SIGTERM did before issue 19) is not finished.
    run = fit(tmp_path, name="runs/reg", steps=3)
    monkeypatch.setattr(sweep_module, "_run_logged", lambda command, log_path: 0)
    point = sweep_module.Point("reg", {})
    with pytest.raises(sweep_module.PointFailed, match="point reg stopped at step 3 of 6 and is unfinished"):
        sweep_module.run_point(point, tmp_path / "runs", 1, "[1/1]", max_steps=6)
    assert not (run / "done.json").exists()

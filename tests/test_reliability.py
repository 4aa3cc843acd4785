"""Exact resumes after kill -9, atomic checkpoints, non-finite steps, clear errors for bad input, flat memory."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from conftest import TINY, ckpt_step, fails, fit, poison, tiny_fit, train_losses, write_exploit
from lightning.pytorch.callbacks import Callback

from spiking_lm.cli import main
from spiking_lm.train.module import LitLM


@pytest.fixture(autouse=True)
def _setup(isolated, monkeypatch):
    # Tiny models gain nothing from a second thread, and lose 10-20x when other jobs hold the cores.
    # Runs compared to 1e-6 need the same thread count anyway (it orders the float reductions).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- 1. Resume is exact -------------------------------------------------------------------------------

# Dropout draws random masks every step, a validation pass and a checkpoint every 5 steps fall in between.
RESUMABLE = [
    "--trainer.max_steps",
    "100",
    "--checkpoint.every_n_train_steps",
    "5",
    "--model.gpt.dropout",
    "0.1",
    "--trainer.val_check_interval",
    "20",
]


@pytest.mark.slow
def test_kill_9_then_resume_matches_the_uninterrupted_run(tmp_path):
    root = tmp_path / "killed"
    argv = [
        "fit",
        "--config",
        TINY,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
        *RESUMABLE,
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "spiking_lm.cli", *argv],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = root / "checkpoints" / "last.ckpt"
    try:
        while proc.poll() is None and not (last.is_file() and ckpt_step(last) >= 10):
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    killed_at = ckpt_step(last)
    assert 10 <= killed_at < 100

    resumed = train_losses(fit(tmp_path, "--ckpt_path", "last", *RESUMABLE, name="killed"))
    full = train_losses(fit(tmp_path, *RESUMABLE, name="full"))
    assert min(resumed) == killed_at and max(resumed) == 99
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], abs=1e-6), step


@pytest.mark.slow
def test_a_save_that_dies_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step") == 4:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError("the machine went down mid-write")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="mid-write"):
        fit(tmp_path, "--checkpoint.every_n_train_steps", "2", steps=6)
    monkeypatch.setattr(torch, "save", real_save)
    folder = tmp_path / "run" / "checkpoints"
    saved = list(folder.iterdir())
    assert all(p.suffix == ".ckpt" for p in saved)  # no leftover temporary file
    assert ckpt_step(folder / "last.ckpt") == 3  # validated at step 3; the save at step 4 died
    assert all(ckpt_step(p) == 3 for p in saved)  # and no file was left half written
    # What a kill -9 during the write would leave behind is ignored.
    (folder / ".last.ckpt.123.0123abcd.part").write_bytes(b"PK\x03\x04 half")
    root = fit(
        tmp_path,
        "--ckpt_path",
        "last",
        "--checkpoint.every_n_train_steps",
        "2",
        "--trainer.logger.version",
        "1",
        steps=6,
    )
    assert ckpt_step(root / "checkpoints" / "last.ckpt") == 6


@pytest.mark.slow
def test_wandb_run_continues_on_resume(tmp_path):
    import wandb

    root = tmp_path / "run"
    argv = [
        "fit",
        "--config",
        TINY,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.save_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
    ]
    main([*argv, "--trainer.max_steps", "3"])
    wandb.finish()
    run_id = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["wandb_run_id"]
    main([*argv, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    wandb.finish()
    legs = sorted((root / "wandb").glob("offline-run-*"))
    assert len(legs) == 2 and all(leg.name.endswith(f"-{run_id}") for leg in legs)


# --- 2. Faults during training ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,what",
    [("loss", "the loss is not finite"), ("grad", "gradients are not finite in model.transformer.wte.weight")],
)
def test_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, kind, what):
    poison(monkeypatch, kind, {3})
    status, err = fails(
        capsys,
        [
            *tiny_fit(tmp_path / "run"),
            "--checkpoint.every_n_train_steps",
            "1",
        ],
    )
    assert status == 1
    assert f"training stopped at step 3: {what}" in err
    assert "layer0.attn" in err and "layer0.mlp" in err  # the firing rate of every site
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"{last} (step 3), is kept" in err
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def test_skipped_steps_leave_weights_and_optimizer_alone(tmp_path, monkeypatch):
    poison(monkeypatch, "grad", {2, 4})
    root = fit(tmp_path, "--model.faults.skip_nonfinite", "true", "--model.faults.max_consecutive_skips", "1")
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    # AdamW counted only the 4 steps it took.
    assert {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()} == {4.0}
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def test_too_many_skips_in_a_row_stop_the_run(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, "loss", {2, 3, 4, 5})
    status, err = fails(
        capsys,
        [
            *tiny_fit(tmp_path / "run"),
            "--model.faults.skip_nonfinite",
            "true",
            "--model.faults.max_consecutive_skips",
            "2",
        ],
    )
    assert status == 1 and "training stopped at step 4" in err and "3 non-finite steps in a row" in err


def test_out_of_gpu_memory_names_the_settings_that_help(tmp_path, monkeypatch, capsys):
    def out_of_memory(self, batch, batch_idx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(LitLM, "training_step", out_of_memory)
    status, err = fails(
        capsys,
        ["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false"],
    )
    assert status == 1 and "out of GPU memory (CUDA out of memory. Tried to allocate 20.00 GiB)" in err
    for knob in (
        "--data.batch_size",
        "--data.block_size",
        "--model.gpt.timesteps",
        "--trainer.accumulate_grad_batches",
        "bf16-mixed",
    ):
        assert knob in err


# --- 3. Bad input: a clear message, exit status 2, nothing written --------------------------------------


def _unreadable(tmp_path, monkeypatch) -> str:
    path = tmp_path / "secret.txt"
    path.write_text("some text " * 100)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make this file's open() fail as it would for a user
        real_open = open

        def guarded_open(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", guarded_open)
    return str(path)


def _no_network(tmp_path, monkeypatch) -> str:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return "hf:someone/some_corpus"


def _file(content: bytes):
    def make(tmp_path, monkeypatch) -> str:
        path = tmp_path / "corpus.txt"
        path.write_bytes(content)
        return str(path)

    return make


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model.gpt.bogus", "3"], "unrecognized arguments: --model.gpt.bogus"),
        (["--model.gpt.mlp_neuron.beta", "1.5"], "beta must be in (0, 1], got 1.5"),
        (["--model.gpt.attn_neuron.beta", "0"], "beta must be in (0, 1], got 0"),
        (["--model.gpt.mlp_neuron.threshold", "0"], "mlp_neuron: threshold must be finite and > 0"),
        (["--model.gpt.mlp_neuron.refractory", "-1"], "mlp_neuron: refractory must be a non-negative integer"),
        (["--model.gpt.mlp_neuron.surrogate", "sigmoid"], "Expected a typing.Literal['atan', 'fast_sigmoid']"),
        (["--model.gpt.timesteps", "0"], "timesteps must be an integer >= 1"),
        (["--data.block_size", "60000"], "but the validation split of 'python-docs' has only"),
        (["--data.source", ""], "data source is empty ('')"),
        (["--model.faults.max_consecutive_skips", "0"], "max_consecutive_skips must be >= 1"),
        (["--checkpoint.save_last", "link"], "--checkpoint.save_last link would make last.ckpt a symlink"),
        (["--checkpoint.every_n_train_steps", "-1"], "--checkpoint.every_n_train_steps must be >= 0"),
        pytest.param(
            ["--trainer.accelerator", "gpu"],
            "Lightning refused the trainer's settings: No supported gpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU"),
        ),
    ],
)
def test_bad_settings(tmp_path, capsys, args, message):
    status, err = fails(
        capsys,
        [
            *tiny_fit(tmp_path / "run"),
            *args,
        ],
    )
    assert status == 2 and message in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "make_source,message",
    [
        (lambda tmp_path, monkeypatch: str(tmp_path / "missing.txt"), "there is no file or directory at {}"),
        (_file(b""), "data source {} contains no text"),
        (_unreadable, "cannot read {}"),
        (_file(b"ok text\n" * 50 + b"\xff\xfe and more"), "{} is not valid UTF-8 (byte 0xff"),
        (_no_network, "no network access to the Hub"),
    ],
)
def test_bad_data_source(tmp_path, monkeypatch, capsys, make_source, message):
    source = make_source(tmp_path, monkeypatch)
    status, err = fails(
        capsys,
        [
            *tiny_fit(tmp_path / "run"),
            "--data.source",
            source,
        ],
    )
    assert status == 2 and message.format(source) in err
    if source.startswith("hf:"):
        assert "Use a local path as data.source" in err


@pytest.mark.slow
def test_an_existing_run_is_never_overwritten(tmp_path, capsys):
    root = fit(tmp_path, steps=2)
    kept = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    status, err = fails(
        capsys, ["fit", "--config", TINY, "--trainer.default_root_dir", str(root), "--trainer.logger", "false"]
    )
    assert status == 2 and "already holds checkpoints" in err and "--ckpt_path last" in err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == kept

    # A run that died before its first checkpoint still left its config.
    config = tmp_path / "early" / "tiny" / "version_0" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("# an earlier run\n")
    with pytest.raises(SystemExit):
        fit(tmp_path, steps=2, name="early")
    assert "holds the config of an earlier run" in capsys.readouterr().err
    assert config.read_text() == "# an earlier run\n"

    status, err = fails(
        capsys, ["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "empty"), "--ckpt_path", "last"]
    )
    assert status == 2 and f"there is no {tmp_path / 'empty' / 'checkpoints' / 'last.ckpt'} to resume" in err

    # Resuming may rewrite the run's own config; validating writes its config beside it.
    fit(tmp_path, "--ckpt_path", "last", steps=4)
    assert ckpt_step(root / "checkpoints" / "last.ckpt") == 4
    config = root / "tiny" / "version_0" / "config.yaml"
    trained_with = config.read_text()
    main(
        [
            "validate",
            "--config",
            TINY,
            "--trainer.default_root_dir",
            str(root),
            "--ckpt_path",
            "last",
            "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir",
            str(root),
            "--trainer.logger.version",
            "0",
        ]
    )
    assert config.read_text() == trained_with
    assert (config.parent / "validate_config.yaml").is_file()


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_it_cannot_continue(tmp_path, capsys):
    root = tmp_path / "run"
    argv = ["fit", "--config", TINY, "--trainer.logger", "false", "--trainer.max_steps", "2"]
    main([*argv, "--trainer.default_root_dir", str(root)])
    kept = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert root / "config.yaml" in kept
    whole = (root / "checkpoints" / "last.ckpt").read_bytes()
    text, truncated = tmp_path / "notes.ckpt", tmp_path / "truncated.ckpt"
    text.write_text("these are my notes, not a checkpoint")
    truncated.write_bytes(whole[: len(whole) // 2])
    for ckpt, message in (
        (text, f"{text} is not a readable checkpoint"),
        (truncated, f"{truncated} is not a readable checkpoint"),
        (tmp_path / "missing.ckpt", f"checkpoint not found: {tmp_path / 'missing.ckpt'}"),
    ):
        status, err = fails(
            capsys, [*argv, "--trainer.default_root_dir", str(tmp_path / "other"), "--ckpt_path", str(ckpt)]
        )
        assert status == 2 and message in err
    assert not (tmp_path / "other").exists()

    status, err = fails(
        capsys, [*argv, "--trainer.default_root_dir", str(root), "--ckpt_path", "last", "--model.gpt.n_embd", "32"]
    )
    assert status == 2 and "another model than this run builds (n_embd=16 there, 32 here)" in err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == kept


# --- 4. Safe loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["fit", "generate", "export"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, capsys, command):
    evil, marker = write_exploit(tmp_path)
    argv = {
        "fit": [
            *tiny_fit(tmp_path / "run"),
            "--ckpt_path",
            str(evil),
        ],
        "generate": ["generate", "--ckpt", str(evil)],
        "export": ["export", "--ckpt", str(evil), "--out", str(tmp_path / "out")],
    }[command]
    status, err = fails(capsys, argv)
    assert status == 2 and f"{evil} was refused" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# --- 5. Long runs -------------------------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class MemoryProbe(Callback):
    """Resident memory and live Python objects at a few steps; read by the test through ``seen``."""

    seen: dict[int, tuple[float, int]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in (200, 1000):
            gc.collect()
            MemoryProbe.seen[trainer.global_step] = (rss_mb(), len(gc.get_objects()))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_memory_stays_flat_over_1000_steps(tmp_path):
    MemoryProbe.seen = {}
    root = fit(
        tmp_path,
        "--trainer.callbacks+",
        f"{__name__}.MemoryProbe",
        "--trainer.log_every_n_steps",
        "50",
        "--trainer.val_check_interval",
        "500",
        "--checkpoint.every_n_train_steps",
        "100",
        steps=1000,
    )
    (rss_200, objects_200), (rss_1000, objects_1000) = MemoryProbe.seen[200], MemoryProbe.seen[1000]
    print(
        f"RSS {rss_200:.1f} MB at step 200, {rss_1000:.1f} MB at step 1000; "
        f"{objects_200} -> {objects_1000} Python objects"
    )
    assert rss_1000 - rss_200 < 30
    assert objects_1000 - objects_200 < 2000  # no per-step history of metrics, losses or tensors
    assert ckpt_step(root / "checkpoints" / "last.ckpt") == 1000

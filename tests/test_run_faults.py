"""Issue 19's faults at the command line: concurrent resumes, branches, orphaned best checkpoints, non-finite
checkpoints, read-only and full file systems, and options that were offered but could not work."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SPIKING_LM, TINY, OfflineRun, fails, fit, spiking_lm_process, tiny_fit
from lightning.pytorch.callbacks import Callback

from spiking_lm import files
from spiking_lm.cli import main


@pytest.fixture(autouse=True)
def _setup(isolated, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` (and what is under it) look like a read-only file system to the checks that ask first."""
    folder.mkdir()
    access = os.access

    def denied(path, mode, *args, **kwargs):
        inside = Path(path).absolute() == folder or folder in Path(path).absolute().parents
        return False if inside and mode & os.W_OK else access(path, mode, *args, **kwargs)

    monkeypatch.setattr(files.os, "access", denied)


def file_size_limit(kib: int):
    """``ulimit -f kib`` for a subprocess: a write past it fails with EFBIG, as on a full disk."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, kib * 1024))


def fit_under_file_size_limit(tmp_path: Path, kib: int) -> subprocess.CompletedProcess:
    """``spiking-lm fit`` of the tiny config into ``tmp_path/run``, in a process under ``ulimit -f kib``."""
    return subprocess.run(
        [*SPIKING_LM, "fit", "--config", TINY, "--trainer.default_root_dir", "run", "--trainer.logger", "false"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=file_size_limit(kib),
    )


# --- 6, 7: one process per run folder; a branch of another run gets a W&B run of its own ------------------


@pytest.mark.slow  # two processes, one training while the other is refused
def test_a_second_fit_of_a_running_folder_is_refused(tmp_path, capsys):
    root = fit(tmp_path, steps=3)
    running = subprocess.Popen(
        [
            *SPIKING_LM,
            *tiny_fit(root),
            "--trainer.max_steps",
            "400",
            "--ckpt_path",
            "last",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in running.stdout:
            if line.startswith("step "):  # the first leg trains
                break
        status, err = fails(
            capsys,
            [
                *tiny_fit(root),
                "--trainer.max_steps",
                "400",
                "--ckpt_path",
                "last",
            ],
        )
        assert status == 2
        assert f"{root} is in use by another spiking-lm fit (process {running.pid} on" in err
    finally:
        running.send_signal(signal.SIGTERM)
        running.communicate(timeout=120)
    assert running.returncode == 143


@pytest.mark.slow
def test_a_branch_of_another_run_gets_its_own_wandb_run(tmp_path):
    import wandb

    def wandb_fit(root, *extra):
        main(
            [
                "fit",
                "--config",
                TINY,
                "--trainer.default_root_dir",
                str(root),
                "--trainer.max_steps",
                "3",
                "--trainer.enable_progress_bar",
                "false",
                *extra,
            ]
        )
        wandb.finish()

    wandb_fit(tmp_path / "parent")
    parent_ckpt = tmp_path / "parent" / "checkpoints" / "last.ckpt"
    wandb_fit(tmp_path / "branch", "--ckpt_path", str(parent_ckpt), "--trainer.max_steps", "5")
    parent_id = torch.load(parent_ckpt, weights_only=True)["wandb_run_id"]
    branch_id = torch.load(tmp_path / "branch" / "checkpoints" / "last.ckpt", weights_only=True)["wandb_run_id"]
    assert branch_id != parent_id
    (run,) = (tmp_path / "branch" / "wandb").glob("offline-run-*")
    assert run.name.endswith(branch_id)
    log = next(run.glob("run-*.wandb")).read_bytes()
    assert b"parent_wandb_run" in log and parent_id.encode() in log and str(parent_ckpt).encode() in log


# --- 8: a validation that coincides with a scheduled save ----------------------------------------------


class Crash(Callback):
    """Stands for a kill -9 right after the validation at ``step``: nothing more is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt  # Lightning saves nothing on it


@pytest.mark.slow
def test_a_resume_after_a_validation_on_a_scheduled_save_leaves_one_best_checkpoint(tmp_path, monkeypatch, capsys):
    from spiking_lm.train.module import LitLM

    callbacks = LitLM.configure_callbacks
    every_3 = ["--checkpoint.every_n_train_steps", "3", "--trainer.val_check_interval", "3"]
    with monkeypatch.context() as patch:
        patch.setattr(LitLM, "configure_callbacks", lambda self: [*callbacks(self), Crash(3)])
        with pytest.raises(SystemExit):
            fit(tmp_path, *every_3, steps=9)
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name.split("-")[1] for p in folder.glob("best-*.ckpt")] == ["step3"]
    fit(tmp_path, "--ckpt_path", "last", *every_3, steps=9)
    assert len(list(folder.glob("best-*.ckpt"))) == 1  # validated at steps 6 and 9 too; save_top_k is 1


# --- 9: non-finite values ------------------------------------------------------------------------------


def test_no_best_checkpoint_of_a_nan_validation(tmp_path, capsys):
    status, err = fails(
        capsys,
        [
            *tiny_fit(tmp_path / "run"),
            "--model.optim.lr",
            "1e9",
            "--model.optim.min_lr",
            "0",
            "--model.faults.skip_nonfinite",
            "true",
        ],
    )
    assert status == 1 and "the final validation loss is nan" in err
    assert not list((tmp_path / "run" / "checkpoints").glob("best-*"))


@pytest.mark.parametrize("command", [["evaluate", "--batches", "1"], ["generate"], ["export", "--out", "exported"]])
def test_a_checkpoint_with_non_finite_weights_is_explained(tmp_path, capsys, ckpt, command):
    saved = torch.load(ckpt, weights_only=True)
    saved["state_dict"]["model.lm_head.weight"][0, 0] = float("nan")
    broken = tmp_path / "diverged.ckpt"
    torch.save(saved, broken)
    status, err = fails(capsys, [command[0], "--ckpt", str(broken), *command[1:]])
    assert status == 2
    assert f"{broken} holds non-finite weights (NaN or inf in " in err and "lm_head.weight" in err
    assert "use a checkpoint from before the divergence" in err
    assert not (tmp_path / "exported").exists()


# --- 10-14: read-only and full file systems -------------------------------------------------------------


def test_export_to_a_read_only_folder(tmp_path, capsys, ckpt, monkeypatch):
    read_only(monkeypatch, tmp_path / "ro")
    status, err = fails(capsys, ["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "ro" / "model")])
    assert status == 2 and f"cannot write to {tmp_path / 'ro' / 'model'} (--out)" in err


@pytest.mark.slow
def test_export_to_a_full_disk(tmp_path, ckpt):
    result = subprocess.run(
        [*SPIKING_LM, "export", "--ckpt", str(ckpt), "--out", "model"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=file_size_limit(8),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "spiking-lm: error: the file size limit (ulimit -f) is too small"
        f" to write {Path('model') / 'model.safetensors'}"
    )
    assert not list((tmp_path / "model").iterdir()) and not list(tmp_path.glob(".model.*"))


def test_evaluate_checks_its_output_folder_before_it_starts(tmp_path, capsys, ckpt, monkeypatch):
    from spiking_lm.eval import evaluate

    read_only(monkeypatch, tmp_path / "ro")
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    status, err = fails(capsys, ["evaluate", "--ckpt", str(ckpt), "--out", str(tmp_path / "ro" / "report")])
    assert status == 2 and f"cannot write to {tmp_path / 'ro' / 'report'} (--out)" in err


@pytest.mark.slow
def test_fit_past_the_file_size_limit_ends_with_one_line(tmp_path):
    from spiking_lm.data.cache import cached_tokens

    cached_tokens("python-docs", "char")  # the token cache exists (the repro): the checkpoints hit the limit
    result = fit_under_file_size_limit(tmp_path, 60)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("spiking-lm: error: the file size limit (ulimit -f) is too small to write ")
    assert "--ckpt_path last" in last


@pytest.mark.slow
def test_a_token_cache_past_the_file_size_limit_is_named(tmp_path):
    result = fit_under_file_size_limit(tmp_path, 16)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("spiking-lm: error: the file size limit (ulimit -f) is too small to write ")
    assert "compute_fn" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("option", ["--trainer.default_root_dir", "--trainer.logger.save_dir"])
def test_fit_into_a_read_only_folder(tmp_path, capsys, monkeypatch, option):
    read_only(monkeypatch, tmp_path / "ro")
    argv = [
        "fit",
        "--config",
        TINY,
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        option,
        str(tmp_path / "ro" / "run"),
    ]
    status, err = fails(capsys, argv)
    assert status == 2 and f"cannot write to {tmp_path / 'ro' / 'run'} ({option}): " in err
    assert "Union" not in err and "Namespace" not in err


def test_sweep_into_a_read_only_folder(tmp_path, capsys, monkeypatch):
    read_only(monkeypatch, tmp_path / "ro")
    status, err = fails(capsys, ["sweep", "--config", TINY, "--out", str(tmp_path / "ro" / "sweep")])
    assert status == 2 and f"cannot write to {tmp_path / 'ro' / 'sweep'} (--out): " in err


def test_read_only_file_system_errors_name_the_file(tmp_path, capsys, ckpt, monkeypatch):
    # What a write on a read-only file system raises when nothing checked before (the check above asks first).
    def read_only_fs(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "model"))

    monkeypatch.setattr(Path, "mkdir", read_only_fs)
    status, err = fails(capsys, ["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "model")])
    assert status == 2 and f"cannot write {tmp_path / 'model'}: it is on a read-only file system" in err


# --- 15, 16: options that were offered but could not work ------------------------------------------------


@pytest.mark.slow
def test_lightning_optimizer_options_are_not_offered(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "--optimizer" not in capsys.readouterr().out
    status, err = fails(
        capsys,
        [
            "fit",
            "--config",
            TINY,
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--optimizer",
            "torch.optim.SGD",
        ],
    )
    assert status == 2 and "--optimizer" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "grid,message",
    [
        (
            ["--grid", "trainer.max_steps=2,4", "--max_steps", "3"],
            "--grid trainer.max_steps conflicts with --max_steps 3",
        ),
        (["--grid", "trainer.default_root_dir=a,b"], "--grid trainer.default_root_dir: the sweep sets"),
        (["--grid", "checkpoint.every_n_train_steps=1,2"], "--grid checkpoint.every_n_train_steps: the sweep sets"),
    ],
)
def test_a_sweep_grid_over_what_the_sweep_sets_is_refused(tmp_path, capsys, grid, message):
    status, err = fails(capsys, ["sweep", "--config", TINY, "--out", "sweep", *grid])
    assert status == 2 and message in err
    assert not (tmp_path / "sweep").exists()


# --- the smaller items ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["validate", "test"])
def test_validate_and_test_need_a_checkpoint(tmp_path, capsys, command):
    status, err = fails(capsys, [command, "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "run")])
    assert status == 2 and f"{command} needs --ckpt_path" in err and "would score an untrained model" in err


def test_test_says_which_text_it_scores(capsys):
    main(["--help"])
    assert "these are validate's windows" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model.gpt.bogus", "3"], "unrecognized arguments: --model.gpt.bogus 3"),
        (["--model.optim.lr", "nan"], "nan is not allowed: give a finite number"),
        (["--data.seed", "1e23"], 'Parser key "data.seed"'),
        (["--model.optim.weight_decay", "-1"], "optim.weight_decay must be finite and >= 0, got -1"),
    ],
)
def test_a_bad_option_is_one_error_line_and_a_hint(tmp_path, capsys, args, message):
    status, err = fails(capsys, ["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "run"), *args])
    assert status == 2 and err.startswith("spiking-lm: error: ") and message in err
    assert "usage:" not in err and len(err.splitlines()) <= 4


def test_ckpt_path_help_offers_only_what_works(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    option = out[out.index("  --ckpt_path CKPT_PATH") :]
    option = " ".join(option[: option.index("\n  --", 3)].split())
    assert "checkpoint to resume the run from: 'last' for" in option
    assert "registry" not in option and "hpc" not in option and "URL" not in option


def test_export_help_is_whole(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert "\nWrite a checkpoint's model as model.safetensors, config.json and vocab.json.\n" in out


@pytest.mark.slow
def test_folders_as_ckpt_path_are_named_for_what_they_are(tmp_path, capsys, ckpt):
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exported")])
    run = ckpt.parent.parent
    for folder, message in (
        (tmp_path / "exported", "is a spiking-lm export folder, which holds the model alone"),
        (
            run,
            f"is a folder; give a checkpoint file (this looks like a run folder: {run / 'checkpoints' / 'last.ckpt'})",
        ),
    ):
        status, err = fails(
            capsys,
            ["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "b"), "--ckpt_path", str(folder)],
        )
        assert status == 2 and f"{folder} {message}" in err


@pytest.mark.slow
def test_evaluate_draws_no_progress_bar_into_a_log(tmp_path, ckpt):
    result = subprocess.run(
        [*SPIKING_LM, "evaluate", "--ckpt", str(ckpt), "--batches", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr and "it/s" not in result.stderr


@pytest.mark.slow
def test_each_leg_of_a_resumed_run_keeps_its_config(tmp_path):
    root = fit(tmp_path, steps=3)
    config = root / "tiny" / "version_0" / "config.yaml"
    first = config.read_text()
    fit(tmp_path, "--ckpt_path", "last", "--model.optim.lr", "1e-3", steps=6)
    assert config.read_text() == first
    second = (config.parent / "config-resumed-step3.yaml").read_text()
    assert "lr: 0.001" in second and "lr: 0.001" not in first


@pytest.mark.slow
def test_a_refused_resume_leaves_no_wandb_run(tmp_path, capsys):
    import wandb

    root = tmp_path / "run"
    argv = ["fit", "--config", TINY, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
    main([*argv, "--trainer.max_steps", "2"])
    wandb.finish()
    before = sorted(p.name for p in (root / "wandb").iterdir())
    status, err = fails(capsys, [*argv, "--ckpt_path", "last", "--model.gpt.n_embd", "32"])
    assert status == 2 and "the checkpoint holds another model than this run builds" in err
    assert sorted(p.name for p in (root / "wandb").iterdir()) == before


# --- 18: the parts a kill -9 during a save leaves ---------------------------------------------------------


@pytest.mark.slow
def test_a_part_whose_writer_died_on_this_machine_is_removed_at_once_on_resume(tmp_path):
    root = fit(tmp_path, steps=3)
    writer = subprocess.Popen([sys.executable, "-c", "pass"])
    writer.wait()  # a process id that no longer runs
    here = root / "checkpoints" / f".last.ckpt.{writer.pid}@{files._HOST}.{'0' * 32}.part"
    elsewhere = root / "checkpoints" / f".last.ckpt.{writer.pid}@another-machine.{'0' * 32}.part"
    for part in (here, elsewhere):
        part.write_bytes(b"PK\x03\x04 half a checkpoint")  # written just now, as by a save killed a moment ago
    fit(tmp_path, "--ckpt_path", "last", steps=4)
    assert not here.exists()
    assert elsewhere.exists()  # its writer may still run on that machine: removed only once idle


# --- W&B: the trainer's settings and the config are in the run's config; the step axis only goes forward ----


@pytest.mark.slow
def test_wandb_gets_the_trainer_settings_and_the_config_and_no_validation_throughput_rows(tmp_path):
    root = tmp_path / "run"
    # In a process of its own, whose W&B run file is whole once it exits. One of this process would be written out
    # only when wandb.teardown() shuts the service down, which breaks the next tests' runs; read right after
    # the run finished, it once lacked its last history rows.
    argv = ["fit", "--config", TINY, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
    # ThroughputMonitor reports once 10 batches are timed: 11 training steps, and 11 batches in the validation.
    argv += ["--trainer.max_steps", "11", "--trainer.val_check_interval", "11", "--data.val_batches", "11"]
    spiking_lm_process(argv, capture_output=True, timeout=600)
    (folder,) = (root / "wandb").glob("offline-run-*")
    run = OfflineRun(folder)
    assert {"config_yaml", "seed_everything"} <= run.config.keys()
    assert {"max_steps", "precision", "gradient_clip_val"} <= run.config["trainer"].keys()
    assert run.logged("train/device/items_per_sec")
    # logged at the validation batch index, they sent the step axis backwards
    assert not [key for row in run.history for key in row if key.startswith("validate/")]


def test_a_fifo_as_data_source_is_named_for_what_it_is(tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    status, err = fails(
        capsys,
        ["fit", "--config", TINY, "--trainer.default_root_dir", str(tmp_path / "run"), "--data.source", str(fifo)],
    )
    assert status == 2 and f"data source {fifo} is not a regular file or a directory (a FIFO" in err


def test_a_token_cache_with_ids_past_its_vocabulary_is_rebuilt(tmp_path, capsys):
    import numpy as np

    from spiking_lm.data.cache import cached_tokens

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    expected, tokenizer = cached_tokens(str(corpus), cache_dir=tmp_path / "cache")
    expected = np.array(expected)
    (npy,) = (tmp_path / "cache").glob("*.npy")
    damaged = np.load(npy, mmap_mode="r+")
    damaged[3] = tokenizer.vocab_size + 7  # as a hand edit or a cache of another vocabulary could leave it
    damaged.flush()
    del damaged
    tokens, _ = cached_tokens(str(corpus), cache_dir=tmp_path / "cache")
    assert np.array_equal(tokens, expected)
    err = capsys.readouterr().err
    assert f"the token cache {npy} is damaged (it holds token id {tokenizer.vocab_size + 7}, past its vocabulary" in err

"""One folder per run: ``--trainer.default_root_dir`` holds everything a run writes, and ``--ckpt_path last``
continues the run in it, whether it stopped before its first save, was copied, or left parts of a killed save."""

from __future__ import annotations

import os
import shutil
import time
import warnings

import pytest
import torch
from conftest import TINY, ckpt_step, fails, fit, tiny_fit

from spiking_lm.cli import main

pytestmark = pytest.mark.usefixtures("isolated")


def _wandb_fit(root, *extra: str, steps: int = 3) -> None:
    """``fit`` on the tiny config as a user runs it: its W&B logger (offline), no save_dir given."""
    import wandb

    main(
        [
            "fit",
            "--config",
            TINY,
            "--trainer.default_root_dir",
            str(root),
            "--trainer.max_steps",
            str(steps),
            "--trainer.enable_progress_bar",
            "false",
            *extra,
        ]
    )
    wandb.finish()


@pytest.mark.slow
def test_default_root_dir_moves_everything_a_run_writes(tmp_path):
    for name in ("first", "second"):  # a second run beside the first, from the same folder
        _wandb_fit(tmp_path / name)
        root = tmp_path / name
        assert (root / "config.yaml").is_file() and (root / "checkpoints" / "last.ckpt").is_file()
        assert len(list((root / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["first", "second"]


@pytest.mark.slow
def test_a_run_that_stopped_before_its_first_checkpoint_starts_over_in_place(tmp_path, capsys):
    root = tmp_path / "run"
    root.mkdir()
    (root / "config.yaml").write_text("# written before the kill\n")
    # Plain fit still refuses to replace the earlier run's config, and says how to go on.
    status, err = fails(
        capsys,
        ["fit", "--config", TINY, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"],
    )
    assert status == 2 and "pass --ckpt_path last" in err
    # ... which starts it over, saying so, instead of asking for a last.ckpt that was never written.
    _wandb_fit(root, "--ckpt_path", "last")
    assert (
        "holds no checkpoint (the run stopped before its first save): starting it over in place"
        in capsys.readouterr().err
    )
    assert ckpt_step(root / "checkpoints" / "last.ckpt") == 3
    assert "# written before the kill" not in (root / "config.yaml").read_text()


@pytest.mark.slow
def test_a_copied_run_continues_in_its_new_folder(tmp_path):
    base = fit(tmp_path, steps=3, name="base")
    shutil.copytree(base, tmp_path / "base_copy", symlinks=True)
    copy = fit(tmp_path, "--ckpt_path", "last", steps=6, name="base_copy")
    saved = sorted(p.name for p in (copy / "checkpoints").iterdir())
    assert "last-v1.ckpt" not in saved and ckpt_step(copy / "checkpoints" / "last.ckpt") == 6
    best = [name for name in saved if name.startswith("best")]
    assert len(best) == 1 and best[0].startswith("best-step6-")  # save_top_k=1, validated at steps 3 and 6
    assert ckpt_step(base / "checkpoints" / "last.ckpt") == 3  # the original is left alone
    # A second resume goes on from step 6, not from the copy's original step 3.
    fit(tmp_path, "--ckpt_path", "last", "--trainer.val_check_interval", "2", steps=8, name="base_copy")
    assert ckpt_step(copy / "checkpoints" / "last.ckpt") == 8
    assert len(list((copy / "checkpoints").glob("best-*.ckpt"))) == 1


@pytest.mark.slow
def test_stale_parts_of_a_killed_save_are_removed_on_resume(tmp_path):
    root = fit(tmp_path, steps=3)
    dead = root / "checkpoints" / f".last.ckpt.999999999.{'0' * 32}.part"  # no process has that id
    alive = root / "checkpoints" / f".last.ckpt.{os.getpid()}.{'0' * 32}.part"  # a writer still at work
    an_hour_ago = time.time() - 3600
    for part in (dead, alive):
        part.write_bytes(b"PK\x03\x04 half a checkpoint")
        os.utime(part, (an_hour_ago, an_hour_ago))
    fit(tmp_path, "--ckpt_path", "last", steps=4)
    assert not dead.exists() and alive.exists()


@pytest.mark.parametrize(
    "ckpt,message",
    [
        (
            "s3://bucket/run/last.ckpt",
            "--ckpt_path s3://bucket/run/last.ckpt: spiking-lm reads checkpoints from local files only",
        ),
        ("best", "--ckpt_path best: spiking-lm reads checkpoints from local files only"),
    ],
)
def test_remote_and_keyword_checkpoints_are_refused(tmp_path, capsys, ckpt, message):
    status, err = fails(
        capsys,
        [
            *tiny_fit(tmp_path / "run"),
            "--ckpt_path",
            ckpt,
        ],
    )
    assert status == 2 and message in err
    assert not (tmp_path / "run").exists()


def test_predict_is_not_offered(capsys):
    main(["--help"])
    listed = capsys.readouterr().out
    assert "fit" in listed and "predict" not in listed
    status, err = fails(capsys, ["predict", "--config", TINY])
    assert status == 2 and "predict" in err


def test_checkpoint_state_from_a_copied_run_is_rerooted(tmp_path):
    """The one use of ``ModelCheckpoint``'s state layout (``train.callbacks._moved``) against Lightning's own."""
    from spiking_lm.train.callbacks import RunCheckpoint

    old, new = tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints"
    new.mkdir(parents=True)
    saved = RunCheckpoint(dirpath=str(old))
    best = str(old / "best-step3-val1.0000.ckpt")
    saved.best_model_path = saved.kth_best_model_path = best
    saved.best_k_models, saved.best_model_score = {best: torch.tensor(1.0)}, torch.tensor(1.0)
    restored = RunCheckpoint(dirpath=str(new))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning warns when it drops a moved run's state
        restored.load_state_dict(saved.state_dict())
    moved = str(new / "best-step3-val1.0000.ckpt")
    assert restored.best_model_path == restored.kth_best_model_path == moved
    assert list(restored.best_k_models) == [moved] and restored.best_model_score == 1.0

"""Faults during training end as ``spiking-lm: error: ...`` and keep a checkpoint from before them:
divergence, steps that were all skipped, a NaN validation, a full disk, and main memory running out."""

from __future__ import annotations

import errno

import pytest
import torch
from conftest import ckpt_step, fails, fit, poison, tiny_fit

from spiking_lm.train.module import LitLM

pytestmark = pytest.mark.usefixtures("isolated")


def fit_fails(tmp_path, capsys, *extra: str, steps: int = 6) -> tuple[int, str]:
    return fails(
        capsys,
        [
            *tiny_fit(tmp_path / "run"),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.max_steps",
            str(steps),
            *extra,
        ],
    )


DIVERGE = ["--model.optim.lr", "1e9", "--model.optim.min_lr", "0", "--checkpoint.every_n_train_steps", "1"]


def largest_weight(path) -> float:
    return max(t.abs().max().item() for t in torch.load(path, weights_only=True)["state_dict"].values())


@pytest.mark.slow
def test_a_diverging_run_keeps_the_checkpoint_from_before_the_divergence(tmp_path, capsys):
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    # The repro from the first step: no checkpoint of diverged weights is written, and saying so.
    status, err = fit_fails(tmp_path, capsys, *DIVERGE)
    assert status == 1 and "training stopped at step" in err
    assert "no sound checkpoint had been written yet: --ckpt_path last starts over" in err
    assert not last.exists()
    # As advised: --ckpt_path last with a sane learning rate starts over and trains.
    fit(tmp_path, "--ckpt_path", "last", "--trainer.logger", "false", steps=3)
    assert ckpt_step(last) == 3
    sound = largest_weight(last)
    # Diverging after a sound checkpoint: the one named is from before, and resuming from it trains on.
    status, err = fit_fails(tmp_path, capsys, "--ckpt_path", "last", *DIVERGE)
    # It may diverge to huge but finite weights, or on to NaN.
    assert status == 1 and (
        f"the last sound checkpoint, {last} (step 3), is kept" in err
        or "training ended, but the weights diverged" in err
        and f"{last} holds step 3" in err
    )
    assert ckpt_step(last) == 3 and largest_weight(last) == sound < 10
    fit(tmp_path, "--ckpt_path", "last", "--trainer.logger", "false", steps=6)
    assert ckpt_step(last) == 6


def test_skipping_until_a_nan_validation_exits_non_zero(tmp_path, capsys):
    status, err = fit_fails(tmp_path, capsys, *DIVERGE, "--model.faults.skip_nonfinite", "true")
    assert status == 1 and "the final validation loss is nan: the model diverged" in err
    assert "no sound checkpoint was written: --ckpt_path last starts the run over" in err
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_a_run_whose_steps_were_all_skipped_exits_non_zero(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, "loss", set(range(6)))
    status, err = fit_fails(tmp_path, capsys, "--model.faults.skip_nonfinite", "true")
    assert status == 1 and "all 6 training steps of this run were skipped as non-finite" in err


def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint_whole(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step") == 4:
            f.write(b"PK\x03\x04 the start of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    status, err = fit_fails(tmp_path, capsys, "--checkpoint.every_n_train_steps", "2")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert status == 1
    assert f"no space left on the device to write {last}: {last} is unchanged and whole" in err
    assert ckpt_step(last) == 3  # the validation's save at step 3 (before the full disk at step 4)
    assert [p.name for p in last.parent.iterdir() if p.suffix != ".ckpt"] == []  # no half-written part


def test_main_memory_running_out_names_the_settings_that_help(tmp_path, monkeypatch, capsys):
    def out_of_memory(self, batch, batch_idx):
        # What torch raises when a tensor does not fit (e.g. --data.block_size 30000 on a small machine).
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate"
            " memory: you tried to allocate 57600000000 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(LitLM, "training_step", out_of_memory)
    status, err = fit_fails(tmp_path, capsys)
    assert status == 1 and "out of CPU memory (can't allocate memory: you tried to allocate 57600000000 bytes" in err
    assert "--data.block_size (quadratically under attention)" in err

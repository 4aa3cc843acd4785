"""Knowledge distillation from a trained teacher checkpoint."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spiking_lm.cli import main
from spiking_lm.train.distill import distill_loss

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKING_LM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def fit(root: Path, *extra: str) -> Path:
    main(["fit", "--config", TINY, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
          "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root), *extra])
    return root / "checkpoints" / "last.ckpt"


def test_distill_loss_is_temperature_scaled_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)  # (B, L, V)
    t = 2.0
    p = F.softmax(teacher / t, -1)
    by_hand = (p * (p.log() - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    torch.testing.assert_close(distill_loss(student, teacher, t), by_hand)
    assert distill_loss(teacher, teacher, t).abs() < 1e-6


def test_student_learns_from_a_softmax_teacher(tmp_path):
    # A teacher trained well away from uniform, so the student has something to match.
    teacher = fit(tmp_path / "teacher", "--model.gpt.attention", "softmax", "--model.gpt.mlp_activation", "gelu",
                  "--trainer.max_steps", "60", "--trainer.val_check_interval", "30", "--model.optim.lr", "1e-2")
    root = tmp_path / "student"
    fit(root, "--model.distill.teacher", str(teacher), "--model.distill.weight", "1.0",
        "--trainer.max_steps", "20", "--trainer.val_check_interval", "10", "--model.optim.lr", "1e-2")
    (metrics,) = root.glob("*/version_0/metrics.csv")
    kd = [float(r["train_distill_loss"]) for r in csv.DictReader(open(metrics)) if r.get("train_distill_loss")]
    assert len(kd) == 20 and sum(kd[-5:]) < sum(kd[:5])
    saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("teacher") for k in saved["state_dict"])  # the teacher is not part of the student


def test_teacher_with_another_vocabulary_is_refused(tmp_path, capsys):
    teacher = fit(tmp_path / "teacher", "--data.tokenizer", "byte", "--trainer.max_steps", "1")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path / "student", "--model.distill.teacher", str(teacher))
    assert exit_info.value.code != 0
    assert "another vocabulary" in capsys.readouterr().err

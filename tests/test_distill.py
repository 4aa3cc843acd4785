"""Knowledge distillation from a trained teacher checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import fit, logged

from spiking_lm.train.distill import distill_loss

pytestmark = pytest.mark.usefixtures("isolated")
LAST = Path("checkpoints") / "last.ckpt"


def test_distill_loss_is_temperature_scaled_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)  # (B, L, V)
    t = 2.0
    p = F.softmax(teacher / t, -1)
    by_hand = (p * (p.log() - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    torch.testing.assert_close(distill_loss(student, teacher, t), by_hand)
    assert distill_loss(teacher, teacher, t).abs() < 1e-6


@pytest.mark.slow
def test_student_learns_from_a_softmax_teacher(tmp_path):
    # A teacher trained well away from uniform, so the student has something to match.
    teacher = fit(
        tmp_path,
        "--model.gpt.attention",
        "softmax",
        "--model.gpt.mlp_activation",
        "gelu",
        "--trainer.val_check_interval",
        "30",
        "--model.optim.lr",
        "1e-2",
        steps=60,
        name="teacher",
    )
    root = fit(
        tmp_path,
        "--model.distill.teacher",
        str(teacher / LAST),
        "--model.distill.weight",
        "1.0",
        "--trainer.val_check_interval",
        "10",
        "--model.optim.lr",
        "1e-2",
        steps=20,
        name="student",
    )
    kd = list(logged(root, "train_distill_loss").values())
    assert len(kd) == 20 and sum(kd[-5:]) < sum(kd[:5])
    saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("teacher") for k in saved["state_dict"])  # the teacher is not part of the student


@pytest.mark.slow
def test_teacher_with_another_vocabulary_is_refused(tmp_path, capsys):
    teacher = fit(tmp_path, "--data.tokenizer", "byte", steps=1, name="teacher")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path, "--model.distill.teacher", str(teacher / LAST), name="student")
    assert exit_info.value.code != 0
    assert "another vocabulary" in capsys.readouterr().err

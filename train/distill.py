"""Knowledge distillation: a trained model (usually the softmax baseline) teaches a spiking student."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spiking_lm.checkpoint import load_model


@dataclass
class DistillConfig:
    """Logit distillation from a teacher checkpoint; off while ``teacher`` is unset."""

    teacher: str | None = None
    """Checkpoint or export folder of the teacher (for example the trained softmax baseline)."""
    weight: float = 0.5
    """Share w of the distillation term: loss = (1 - w) * cross-entropy + w * T^2 * KL(teacher || student)."""
    temperature: float = 1.0
    """Softmax temperature T of both distributions in the KL term."""

    def __post_init__(self):
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"distill.weight must be in [0, 1], got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature}")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) per token, averaged; the T^2 keeps gradients comparable across T."""
    t = temperature
    student = F.log_softmax(student_logits.flatten(0, -2).float() / t, dim=-1)  # (B*L, V)
    teacher = F.log_softmax(teacher_logits.flatten(0, -2).float() / t, dim=-1)  # (B*L, V)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


class Teacher:
    """A frozen GPT from a checkpoint, with the vocabulary it was trained on."""

    def __init__(self, path: str):
        self.path = path
        try:
            model, tokenizer, _ = load_model(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"model.distill.teacher: {e}; train the teacher first, or point --model.distill.teacher at its "
                "checkpoint"
            ) from None
        self.model, self.vocab = model.requires_grad_(False).eval(), tokenizer.to_dict()

    def check_vocab(self, student_vocab: dict) -> None:
        """Distillation compares logits symbol by symbol, so both must use the same vocabulary."""
        if student_vocab != self.vocab:
            raise ValueError(
                f"the teacher {self.path} was trained with another vocabulary ({self.vocab.get('kind')}, "
                f"{self.model.config.vocab_size} symbols); train teacher and student on the same source "
                "and tokenizer"
            )

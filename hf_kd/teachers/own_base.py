"""The ``self`` teacher: the student's own base model, its PEFT adapters disabled (one copy of the weights)."""

from __future__ import annotations

import contextlib
import logging

import torch

from hf_kd.errors import SetupError
from hf_kd.models.adapters import SELF_TEACHER, adapters_disabled, require_adapters
from hf_kd.teachers.registry import Teacher, register_teacher

logger = logging.getLogger(__name__)


@register_teacher
class SelfTeacher(Teacher):
    """The student's PeftModel run with its adapters disabled and dropout off, not through DDP (no gradient, nothing
    to synchronize)."""

    kind = SELF_TEACHER
    name = SELF_TEACHER

    def __init__(self, peft_model):
        self.model = peft_model

    @classmethod
    def check_setup(cls, trainer, source) -> None:
        require_adapters(trainer.model)
        if trainer.args.teacher_model_init_kwargs:
            raise SetupError(
                "teacher_model_init_kwargs", "does not apply to teacher 'self' (the student's own weights)"
            )

    @classmethod
    def build(cls, trainer, source) -> Teacher:
        if trainer.args.alpha == 1:
            logger.warning(
                "teacher 'self' with alpha=1: freshly initialized LoRA adapters (B = 0) make the student equal to its "
                "teacher, so loss and gradients start at 0; use alpha < 1 to learn from the labels while the "
                "divergence keeps the student close to its base model"
            )
        return cls(trainer.accelerator.unwrap_model(trainer.model))

    def run(self, inputs, forward, targets):
        with torch.no_grad(), adapters_disabled(self.model) as base_model:
            return forward(base_model, inputs)

    @contextlib.contextmanager
    def generating(self):
        with adapters_disabled(self.model) as base_model:
            yield base_model

    def describe(self) -> dict[str, str]:
        return {}  # the card's teacher line says it all

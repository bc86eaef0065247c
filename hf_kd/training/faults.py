"""A NaN or infinite loss stops training before an optimizer step applies it.

Every loss of :mod:`hf_kd.objective.losses` keeps a NaN teacher (or student) visible in its value, so the guard needs nothing but
the terms ``compute_loss`` already has: per micro-batch it ORs two flags on the device (no synchronization), and once
per optimizer step -- in ``on_pre_optimizer_step``, before the update -- it sums them over processes (so that every
rank stops together) and raises :class:`NonFiniteError` with one line naming the step, the model and what to try.
The run then ends with an exception: nothing is saved and ``training_complete.json`` is never written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from transformers import TrainerCallback


class NonFiniteError(RuntimeError):
    """Training or evaluation met a NaN / infinite loss; the message is one line saying where and what to try."""


class FaultGuard(TrainerCallback):
    """Owned by the trainer: :meth:`record` each micro-batch's terms, :meth:`check` where a step is about to apply."""

    def __init__(self, reduce: Callable[[torch.Tensor], torch.Tensor], teacher_name: str | None, student_name: str):
        self._reduce, self.teacher_name, self.student_name = reduce, teacher_name, student_name
        self._flags: torch.Tensor | None = None  # [teacher, student, either] faults, accumulated on the device

    def record(self, terms: Mapping[str, torch.Tensor | None], alpha: float) -> None:
        """What would be applied is the ``loss``: a NaN there stops the step. The divergence NaN while the student's own
        CE is finite is the teacher's fault; a NaN CE the student's; without a CE, either's. With ``alpha = 0`` the
        divergence is only logged, and a NaN in it stops nothing."""
        loss, divergence, ce = terms["loss"].detach(), terms.get("distill_loss"), terms.get("ce_loss")
        bad = ~torch.isfinite(loss)
        if ce is None:  # unlabeled classification: no CE to tell the two models apart
            flags = torch.stack([torch.zeros_like(bad), torch.zeros_like(bad), bad])
        else:
            teacher_bad = bad & torch.isfinite(ce.detach()) & (alpha > 0)
            if divergence is not None:
                teacher_bad = teacher_bad & ~torch.isfinite(divergence.detach())
            flags = torch.stack([teacher_bad, bad & ~teacher_bad, torch.zeros_like(bad)])
        flags = flags.to(torch.float32)
        self._flags = flags if self._flags is None else self._flags + flags

    def check(self, where: str) -> None:
        """Raise :class:`NonFiniteError` if any process recorded a fault since the last check (one sync)."""
        if self._flags is None:
            return
        teacher_bad, student_bad, either_bad = (self._reduce(self._flags) > 0).tolist()
        self._flags = None
        if either_bad and not (teacher_bad or student_bad):
            raise NonFiniteError(
                f"{where}: the loss is NaN or infinite (the teacher {self.teacher_name} or the student "
                f"{self.student_name}); no update was applied and nothing was saved. Check both models' logits: load "
                "the teacher in bfloat16 or float32, lower learning_rate, set max_grad_norm"
            )
        if teacher_bad:
            raise NonFiniteError(
                f"{where}: the teacher ({self.teacher_name}) gave NaN or +inf logits, so the distillation loss is NaN; "
                "no update was applied and nothing was saved. Load the teacher in bfloat16 or float32 (fp16 logits "
                "overflow; teacher_model_init_kwargs dtype), check its weights for NaN, or use another teacher"
            )
        if student_bad:
            raise NonFiniteError(
                f"{where}: the student ({self.student_name}) produced a NaN or infinite loss; no update was applied and "
                "nothing was saved. Lower learning_rate, set max_grad_norm, train in bf16 rather than fp16, or resume "
                "from the last checkpoint"
            )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.check(f"step {state.global_step + 1}")

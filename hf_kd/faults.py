"""A NaN or infinite loss stops training before an optimizer step applies it.

Every loss of :mod:`hf_kd.losses` keeps a NaN teacher (or student) visible in its value, so the guard needs nothing but
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
        self._flags: torch.Tensor | None = None  # [teacher fault, student fault], accumulated on the device

    def record(self, terms: Mapping[str, torch.Tensor | None]) -> None:
        """The divergence NaN while the student's own CE is finite: the teacher's fault; otherwise the student's."""
        loss, divergence, ce = terms["loss"].detach(), terms.get("distill_loss"), terms.get("ce_loss")
        student_ok = torch.isfinite(ce.detach()) if ce is not None else torch.ones_like(loss, dtype=torch.bool)
        teacher_bad = student_ok & ~torch.isfinite(divergence.detach()) if divergence is not None else ~student_ok
        flags = torch.stack([teacher_bad, ~student_ok | (~torch.isfinite(loss) & ~teacher_bad)]).to(torch.float32)
        self._flags = flags if self._flags is None else self._flags + flags

    def check(self, where: str) -> None:
        """Raise :class:`NonFiniteError` if any process recorded a fault since the last check (one sync)."""
        if self._flags is None:
            return
        teacher_bad, student_bad = (self._reduce(self._flags) > 0).tolist()
        self._flags = None
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

"""The one place that pairs a student signal and a teacher signal with the loss path that fits them.

The signals are in :mod:`hf_kd.objective.signals`. A teacher signal that computes its own terms (a ``terms`` method,
e.g. :class:`hf_kd.teachers.cross_tokenizer.loss.TeacherAligned`) is asked to; otherwise a :class:`StudentHidden`
runs the chunked loss (:func:`hf_kd.objective.fused.fused_objective`) against any built-in teacher signal, and full
student logits run :func:`hf_kd.distillation_loss`, or :func:`hf_kd.sparse_distillation_loss` against a top-k
teacher. The trainer never branches on the kind of teacher.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping

import torch

from hf_kd.models.gathering import as_head_forward, gathered_head
from hf_kd.models.heads import LMHeadSpec, is_sharded, lm_head_spec
from hf_kd.objective.chunking import CHUNK_SIZE
from hf_kd.objective.fused import fused_objective
from hf_kd.objective.losses import Objective, distillation_loss, target_rows
from hf_kd.objective.metrics import add_sums, agreement_sums, health_sums
from hf_kd.objective.signals import StudentHidden, TeacherHidden, TeacherLogits, TeacherSignal, TeacherTopK
from hf_kd.objective.sparse import sparse_distillation_loss


def signal_of(outputs, model, task) -> TeacherLogits | TeacherHidden:
    """A teacher's view of the batch as a signal aligned with the targets: model outputs become hidden states + head
    (the fused path captured them) or logits; a signal stays as it is."""
    if not isinstance(outputs, Mapping):
        return outputs
    if "final_hidden_state" in outputs:
        # a sharded head (FSDP2 / ZeRO-3) is gathered when the loss reads it: with_heads_gathered
        return TeacherHidden(task.aligned(outputs["final_hidden_state"]), lm_head_spec(model, sharded=True)[0])
    return TeacherLogits(task.aligned(outputs["logits"]))


def with_heads_gathered(compute: Callable, student, teacher, student_model, teacher_model):
    """``compute(student, teacher)`` with every sharded head in the two signals whole (FSDP2 / ZeRO-3); the signals
    as they are otherwise. Every process must call it together (the gathers are collectives).

    The teacher's head is gathered for the block, without a gradient. A student head that trains runs ``compute`` as
    its module's forward (:func:`hf_kd.models.gathering.as_head_forward`), so that the engine reduces the gradient
    the loss gives the weight into each process's shard; without a gradient it is gathered like the teacher's."""
    with contextlib.ExitStack() as stack:
        if isinstance(teacher, TeacherHidden) and is_sharded(teacher.head.weight):
            teacher = dataclasses.replace(teacher, head=stack.enter_context(gathered_head(teacher_model)))
        if not (isinstance(student, StudentHidden) and is_sharded(student.head.weight)):
            return compute(student, teacher)
        if torch.is_grad_enabled():
            return as_head_forward(
                student_model, student.hidden, lambda hidden, head: compute(StudentHidden(hidden, head), teacher)
            )
        student = dataclasses.replace(student, head=stack.enter_context(gathered_head(student_model)))
        return compute(student, teacher)


def objective_terms(
    student: torch.Tensor | StudentHidden,
    teacher: TeacherSignal,
    labels: torch.Tensor | None,
    objective: Objective,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> dict[str, torch.Tensor | None]:
    """``{"loss", "distill_loss", "ce_loss"}`` of ``objective`` for a student and a teacher signal, aligned with
    ``labels`` (a signal with its own ``terms`` may add keys: a cross-tokenizer teacher adds ``aligned_fraction`` and
    ``shared_mass``). ``vocab_size`` cuts both sides to a shared prefix; ``chunk_size``: rows per chunk (fused)."""
    chunk_size = chunk_size or CHUNK_SIZE
    if hasattr(teacher, "terms"):  # a signal of its own kind: it knows its loss
        return teacher.terms(
            student,
            labels,
            objective,
            num_items_in_batch=num_items_in_batch,
            chunk_size=chunk_size,
            vocab_size=vocab_size,
        )
    names = ("loss", "distill_loss", "ce_loss")
    return dict(zip(names, _terms(student, teacher, labels, objective, num_items_in_batch, chunk_size, vocab_size)))


def _terms(student, teacher, labels, objective, num_items_in_batch, chunk_size, vocab_size):
    if isinstance(student, StudentHidden):
        return fused_objective(
            student,
            teacher,
            labels,
            objective,
            num_items_in_batch=num_items_in_batch,
            chunk_size=chunk_size,
            vocab_size=vocab_size,
            return_components=True,
        )
    kwargs = {**objective.loss_kwargs(), "num_items_in_batch": num_items_in_batch, "return_components": True}
    student = student[..., :vocab_size]  # padded vocabularies: the shared prefix (vocab_size None keeps all)
    if isinstance(teacher, TeacherTopK):
        return sparse_distillation_loss(
            student, teacher.topk_ids, teacher.topk_logprobs, teacher.tail_logprob, labels, **kwargs
        )
    teacher_logits = teacher.logits if isinstance(teacher, TeacherLogits) else full_logits(teacher.hidden, teacher.head)
    return distillation_loss(student, teacher_logits[..., :vocab_size], labels, **kwargs)


def full_logits(hidden: torch.Tensor, head: LMHeadSpec, chunk_size: int | None = None) -> torch.Tensor:
    """``[..., H]`` final hidden states -> ``[..., V]`` logits (float32 at least), ``chunk_size`` rows at a time so that
    no float32 copy of more than a chunk of intermediate values exists besides the result."""
    flat = hidden.detach().reshape(-1, hidden.shape[-1])
    chunk = chunk_size or max(flat.shape[0], 1)
    with torch.no_grad():
        parts = [head.logits(flat[start : start + chunk]) for start in range(0, flat.shape[0], chunk)]
    logits = torch.cat(parts) if parts else head.logits(flat)
    return logits.reshape(*hidden.shape[:-1], logits.shape[-1])


@torch.no_grad()
def agreement(
    student: torch.Tensor | StudentHidden,
    teacher: TeacherSignal,
    labels: torch.Tensor | None,
    *,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    calibration: bool = False,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """The teacher-agreement sums of :func:`hf_kd.objective.metrics.agreement_sums` over the valid positions, built
    ``chunk_size`` rows at a time from hidden states (never ``[N, V]`` at once); ``{}`` for a top-k teacher."""
    if not _has_full_rows(teacher):
        return {}
    sums: dict[str, torch.Tensor] = {}
    for s_logits, t_logits, flat in _chunks(student, teacher, labels, chunk_size, vocab_size, ignore_index):
        add_sums(sums, agreement_sums(s_logits, t_logits, flat, calibration=calibration))
    return sums


@torch.no_grad()
def sample_health(
    student: torch.Tensor | StudentHidden,
    teacher: TeacherSignal,
    labels: torch.Tensor | None,
    *,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """The on-policy health sums of :func:`hf_kd.objective.metrics.health_sums` over the target positions of a batch
    the student wrote, ``chunk_size`` rows at a time (one more head matmul per chunk and side, no forward). Against a
    teacher without one full row of the student's vocabulary per position (top-k, another tokenizer, several teachers)
    only the student's entropy."""
    teacher = teacher if _has_full_rows(teacher) else None
    sums: dict[str, torch.Tensor] = {}
    for s_logits, t_logits, _ in _chunks(student, teacher, labels, chunk_size, vocab_size, ignore_index):
        add_sums(sums, health_sums(s_logits, t_logits))
    return sums


def _has_full_rows(teacher: TeacherSignal) -> bool:
    """Whether the teacher signal holds one full row of the student's vocabulary per position: not top-k buckets,
    not a signal of its own kind (another tokenizer's positions, several teachers)."""
    return not (isinstance(teacher, TeacherTopK) or hasattr(teacher, "terms"))


def _chunks(student, teacher, labels, chunk_size, vocab_size, ignore_index):
    """``(student logits, teacher logits or None, labels or None)`` of the target rows, ``chunk_size`` at a time
    (hidden states projected chunk by chunk: never ``[N, V]`` at once); one chunk, possibly empty, when none."""
    student_rows = student.hidden if isinstance(student, StudentHidden) else student
    student_rows = student_rows.reshape(-1, student_rows.shape[-1])
    teacher_rows = None
    if teacher is not None:
        teacher_rows = teacher.hidden if isinstance(teacher, TeacherHidden) else teacher.logits
        teacher_rows = teacher_rows.reshape(-1, teacher_rows.shape[-1])
    flat, keep = target_rows(labels, ignore_index)
    if keep is not None:
        student_rows = student_rows[keep]
        teacher_rows = None if teacher_rows is None else teacher_rows[keep]
    count = student_rows.shape[0]
    chunk = chunk_size or max(count, 1)
    for start in range(0, max(count, 1), chunk):
        rows = slice(start, start + chunk)
        t_logits = None if teacher_rows is None else _logits(teacher, teacher_rows[rows], vocab_size)
        yield _logits(student, student_rows[rows], vocab_size), t_logits, None if flat is None else flat[rows]


def _logits(signal, rows: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """A chunk of a signal's rows as logits cut to ``vocab_size``: projected through the head for hidden states."""
    if isinstance(signal, (StudentHidden, TeacherHidden)):
        return signal.head.logits(rows, vocab_size)
    return rows[..., :vocab_size]

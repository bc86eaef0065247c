"""What each side hands the loss, and the one function that pairs them with the loss that fits.

A teacher hands over one of three *signals*, all aligned position by position with the labels (a causal-LM caller has
already dropped the last position: logits at position i predict the token at i + 1):

* :class:`TeacherLogits` -- full logits ``[..., V]`` (a plain forward, or a ``teacher_forward`` override);
* :class:`TeacherHidden` -- final hidden states ``[..., H]`` and the head that turns them into logits, so that the
  fused loss can build the logits chunk by chunk;
* :class:`TeacherTopK` -- cached top-k log-probabilities (:mod:`hf_kd.cache`, :mod:`hf_kd.sparse`);
* :class:`TeacherAligned` -- a teacher with its own tokenizer: its logits (or hidden states) over *its* tokenization
  of the batch, and the alignment of the two tokenizations (:mod:`hf_kd.alignment`, :mod:`hf_kd.cross_tokenizer`).

The student hands over full logits ``[..., V]`` or a :class:`StudentHidden`. :func:`objective_terms` is the only place
that decides which loss function runs for which pair; the trainer never branches on the kind of teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .alignment import Alignment
from .cross_tokenizer import CrossTokenizerWeights, cross_tokenizer_terms
from .losses import Objective, target_rows
from .metrics import add_sums, agreement_sums
from .models import LMHeadSpec
from .vocabulary import SharedVocabulary


@dataclass(frozen=True)
class TeacherLogits:
    logits: torch.Tensor  # [..., V] full teacher logits, aligned with the labels


@dataclass(frozen=True)
class TeacherHidden:
    hidden: torch.Tensor  # [..., H] final (post-norm) hidden states, aligned with the labels
    head: LMHeadSpec  # how they become logits: softcap(scale * (hidden @ weight.T + bias))


@dataclass(frozen=True)
class TeacherTopK:
    topk_ids: torch.Tensor  # [..., k] the teacher's k most likely ids per position
    topk_logprobs: torch.Tensor  # [..., k] their log-probabilities at T = 1
    tail_logprob: torch.Tensor  # [...] log of the remaining mass (see hf_kd.sparse)


@dataclass(frozen=True)
class TeacherAligned:
    teacher: TeacherLogits | TeacherHidden  # [B, S_t - 1, ...] aligned with the teacher's own tokens
    alignment: Alignment  # which student targets each teacher position speaks for
    shared: SharedVocabulary  # tokens spelled alike in both vocabularies
    weights: CrossTokenizerWeights  # the exact and ULD terms' weights


@dataclass(frozen=True)
class StudentHidden:
    hidden: torch.Tensor  # [..., H] final hidden states (receive a gradient), aligned with the labels
    head: LMHeadSpec  # the student's head: its weight (and bias) receive a gradient


TeacherSignal = TeacherLogits | TeacherHidden | TeacherTopK | TeacherAligned


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
    ``labels`` (a cross-tokenizer teacher adds ``aligned_fraction`` and ``shared_mass``).

    A :class:`TeacherAligned` runs :func:`hf_kd.cross_tokenizer.cross_tokenizer_terms` (either student form). Else a
    :class:`StudentHidden` runs the chunked loss (:func:`hf_kd.fused.fused_objective`, ``chunk_size`` rows at a time)
    against any teacher signal; full student logits ``[..., V]`` run :func:`hf_kd.distillation_loss`, or
    :func:`hf_kd.sparse_distillation_loss` against a top-k teacher. ``vocab_size`` cuts both sides to a shared prefix.
    """
    if isinstance(teacher, TeacherAligned):
        from .chunking import CHUNK_SIZE

        return cross_tokenizer_terms(student, teacher.teacher, teacher.alignment, teacher.shared, labels, objective,
                                     weights=teacher.weights, num_items_in_batch=num_items_in_batch,
                                     chunk_size=chunk_size or CHUNK_SIZE)  # fmt: skip
    return dict(zip(("loss", "distill_loss", "ce_loss"), _terms(student, teacher, labels, objective,
                                                              num_items_in_batch, chunk_size, vocab_size)))  # fmt: skip


def _terms(student, teacher, labels, objective, num_items_in_batch, chunk_size, vocab_size):
    from .losses import distillation_loss
    from .sparse import sparse_distillation_loss

    if isinstance(student, StudentHidden):
        from .chunking import CHUNK_SIZE
        from .fused import fused_objective  # fused imports this module's signals

        return fused_objective(student, teacher, labels, objective, num_items_in_batch=num_items_in_batch,
                               chunk_size=chunk_size or CHUNK_SIZE, vocab_size=vocab_size, return_components=True)  # fmt: skip
    kwargs = {**objective.loss_kwargs(), "num_items_in_batch": num_items_in_batch, "return_components": True}
    student = student[..., :vocab_size]  # padded vocabularies: the shared prefix (vocab_size None keeps all)
    if isinstance(teacher, TeacherTopK):
        return sparse_distillation_loss(student, teacher.topk_ids, teacher.topk_logprobs, teacher.tail_logprob,
                                        labels, **kwargs)  # fmt: skip
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
    """The teacher-agreement sums of :func:`hf_kd.metrics.agreement_sums` over the valid positions, built
    ``chunk_size`` rows at a time from hidden states (never ``[N, V]`` at once); ``{}`` for a top-k teacher."""
    if isinstance(teacher, (TeacherTopK, TeacherAligned)):
        return {}  # top-k rows hold no full distribution; another tokenizer's positions are not the student's
    student_rows = student.hidden if isinstance(student, StudentHidden) else student
    teacher_rows = teacher.hidden if isinstance(teacher, TeacherHidden) else teacher.logits
    student_rows = student_rows.reshape(-1, student_rows.shape[-1])
    teacher_rows = teacher_rows.reshape(-1, teacher_rows.shape[-1])
    flat, keep = target_rows(labels, ignore_index)
    if keep is not None:
        student_rows, teacher_rows = student_rows[keep], teacher_rows[keep]
    count = student_rows.shape[0]
    chunk = chunk_size or max(count, 1)
    sums: dict[str, torch.Tensor] = {}
    for start in range(0, max(count, 1), chunk):
        rows = slice(start, start + chunk)
        s_logits = _logits(student, student_rows[rows], vocab_size)
        t_logits = _logits(teacher, teacher_rows[rows], vocab_size)
        part = agreement_sums(s_logits, t_logits, None if flat is None else flat[rows], calibration=calibration)
        add_sums(sums, part)
    return sums


def _logits(signal, rows: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """A chunk of a signal's rows as logits cut to ``vocab_size``: projected through the head for hidden states."""
    if isinstance(signal, (StudentHidden, TeacherHidden)):
        return signal.head.logits(rows, vocab_size)
    return rows[..., :vocab_size]

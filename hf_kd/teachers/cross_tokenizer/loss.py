"""The cross-tokenizer loss: a student against a teacher that tokenizes the same text differently.

:mod:`hf_kd.teachers.cross_tokenizer.alignment` pairs the two tokenizations; this module turns the pairing into one objective, a sum over the
student's target positions divided by their count (``num_items_in_batch`` in training), as every hf_kd loss:

* **exact term** (weight ``exact_weight``), where both models have read the same text (a one-to-one target, or the
  first target of a merged span): the configured divergence between the student's next-token distribution and the
  teacher's *projected* onto the student's vocabulary -- each teacher token's probability credited to the student
  token its text starts with (:func:`projected_log_probs`; " the cat" counts for " the"). That is the event the
  student's next token is about, "the text goes on with this token"; comparing only the tokens both vocabularies
  spell alike would take a coarse teacher's P(" the") -- which excludes " the cat" -- for it and mislead the student
  (``benchmarks/cross_tokenizer.py`` measured it). With a permuted vocabulary the projection is the permutation and
  the term is the same-tokenizer loss. On every merged span, the same divergence between the two-bucket distributions
  ``{the span's text, anything else}``: the text's probability is the chain-rule product over each side's tokens
  (:func:`span_log_probs`); a span adds its term once, its student targets all count in the divisor.
* **ULD term** (weight ``uld_weight``), where a merged span starts: the L1 distance between the two distributions'
  probabilities sorted in decreasing order (:func:`uld_distance`, Boizard et al. 2024), at temperature ``T``, not
  ``T**2``-scaled; it needs no vocabulary mapping at all.
* **CE** over every student target, aligned or not; ``alpha`` mixes it in as everywhere.

Temperature acts on the teacher's probabilities before they are projected, and on the span's two buckets as in
:mod:`hf_kd.objective.sparse`. ``mse`` needs logits over one vocabulary and is refused. The loss runs through the one
chunk driver, :func:`hf_kd.objective.chunking.run`, which owns the pass over the student's target rows: each chunk's
student logits (from hidden states and head, or full logits), the gradient taken at once and folded into ``d(hidden)``
and ``d(weight)`` (or ``d(logits)``), the sums and their one division, so that on the fused path nothing of size
``[tokens, vocab]`` is held. This module supplies what is its own: a teacher *source* (the teacher rows a chunk reads,
each projected once: :func:`_teacher_source`), a *divergence* (the terms above and the shared mass it logs:
:class:`_Divergence`) and the span term, which depends on sums across chunks: it is evaluated first, and its gradient
enters the pass as fixed weights on each token's log-probability (:func:`span_term`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from hf_kd.models.heads import finish_logits
from hf_kd.objective.chunking import ChunkPlan, LogitRows, run
from hf_kd.objective.divergences import uld_distance  # noqa: F401 (the ULD term; importable from here)
from hf_kd.objective.losses import Objective, normalizer, target_rows
from hf_kd.objective.signals import TeacherHidden, TeacherLogits
from hf_kd.teachers.cross_tokenizer.alignment import Alignment
from hf_kd.teachers.cross_tokenizer.spans import (  # noqa: F401 (span_log_probs, two_buckets: importable here)
    last_in_group,
    last_log_probs,
    span_log_probs,
    span_term,
    two_buckets,
)
from hf_kd.teachers.cross_tokenizer.vocabulary import SharedVocabulary

EXACT_WEIGHT = 1.0  # the exact term is the objective itself
ULD_WEIGHT = 0.0  # off: on benchmarks/cross_tokenizer.py it cost a fifth of the gain kept (48% vs 63%)


@dataclass(frozen=True)
class CrossTokenizerWeights:
    exact: float = EXACT_WEIGHT
    uld: float = ULD_WEIGHT


@dataclass(frozen=True)
class TeacherAligned:
    """A teacher with its own tokenizer, as the loss sees it: its outputs over *its* tokenization of the batch and the
    alignment of the two tokenizations. It computes its own terms (:func:`cross_tokenizer_terms`)."""

    teacher: TeacherLogits | TeacherHidden  # [B, S_t - 1, ...] aligned with the teacher's own tokens
    alignment: Alignment  # which student targets each teacher position speaks for
    shared: SharedVocabulary  # tokens spelled alike in both vocabularies
    weights: CrossTokenizerWeights  # the exact and ULD terms' weights

    def terms(
        self,
        student,
        labels,
        objective: Objective,
        *,
        num_items_in_batch=None,
        chunk_size: int = 256,
        vocab_size: int | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """:func:`hf_kd.objective.terms.objective_terms` for this signal (``vocab_size`` does not apply: the
        vocabularies are mapped, not cut)."""
        return cross_tokenizer_terms(
            student,
            self.teacher,
            self.alignment,
            self.shared,
            labels,
            objective,
            weights=self.weights,
            num_items_in_batch=num_items_in_batch,
            chunk_size=chunk_size,
        )


def projected_log_probs(
    teacher_logits: torch.Tensor, projection: torch.Tensor, student_vocab: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, V_t]`` teacher logits -> ``[N, V_s]`` log-probabilities over the student's vocabulary: the teacher's
    probabilities at ``temperature``, each credited to ``projection[id]`` (the student token its text starts with,
    :attr:`hf_kd.teachers.cross_tokenizer.alignment.SharedVocabulary.projection`), renormalized over the mass that maps (a teacher token that
    maps to nothing, or a padding row, drops out). ``-inf`` where no teacher token maps; and ``[N]`` whether any mass
    maps at all (else the row has no signal)."""
    probs = torch.softmax(teacher_logits / temperature if temperature != 1 else teacher_logits, dim=-1)
    width = min(probs.shape[-1], projection.shape[0])
    target = projection[:width]
    keep = (target >= 0) & (target < student_vocab)
    out = probs.new_zeros(probs.shape[0], student_vocab).index_add_(1, target[keep], probs[:, :width][:, keep])
    mass = out.sum(-1, keepdim=True)
    return torch.log(out / mass.clamp_min(torch.finfo(out.dtype).tiny)), mass.squeeze(-1) > 0


def inner_log_probs(
    teacher_logits: torch.Tensor,
    before: torch.Tensor,
    segmentation: torch.Tensor,
    student_vocab: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's word on a student target *inside* one of its tokens: ``[N, V_t]`` logits of the position that
    predicts that token and ``[N, D]`` the student ids already read since its start (-1 pads) -> ``[N, V_s]``
    log-probabilities of the next student token: the mass of the teacher tokens that spell ``before`` and then each
    student token (:attr:`hf_kd.teachers.cross_tokenizer.alignment.SharedVocabulary.segmentation`), renormalized; and ``[N]`` whether any
    teacher token spells ``before`` (else the row has no signal)."""
    probs = torch.softmax(teacher_logits / temperature if temperature != 1 else teacher_logits, dim=-1)
    width = min(probs.shape[-1], segmentation.shape[0])
    table, probs = segmentation[:width], probs[:, :width]
    depth = (before >= 0).sum(-1)  # [N]
    parts = []
    for start in range(0, probs.shape[0], 16):  # [16, V_t, D] comparisons at a time
        rows = slice(start, start + 16)
        wanted = before[rows].unsqueeze(1)  # [n, 1, D]
        spells = ((table[:, : wanted.shape[-1]].unsqueeze(0) == wanted) | (wanted < 0)).all(-1)  # [n, V_t]
        following = table.T[depth[rows]]  # [n, V_t]: the student token each teacher token spells next
        keep = spells & (following >= 0) & (following < student_vocab)
        out = probs.new_zeros(probs[rows].shape[0], student_vocab)
        parts.append(out.scatter_add_(1, following.clamp_min(0), probs[rows] * keep))
    out = torch.cat(parts) if parts else probs.new_zeros(0, student_vocab)
    mass = out.sum(-1, keepdim=True)
    return torch.log(out / mass.clamp_min(torch.finfo(out.dtype).tiny)), mass.squeeze(-1) > 0


def cross_tokenizer_terms(
    student,
    teacher,
    alignment: Alignment,
    shared: SharedVocabulary,
    labels: torch.Tensor | None,
    objective: Objective,
    *,
    weights: CrossTokenizerWeights = CrossTokenizerWeights(),
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 256,
) -> dict[str, torch.Tensor | None]:
    """``{"loss", "distill_loss", "ce_loss", "aligned_fraction", "shared_mass"}`` for a student and a teacher with
    different tokenizers.

    Args:
        student: ``[B, S - 1, V_s]`` aligned logits, or a :class:`hf_kd.objective.signals.StudentHidden` (fused path).
        teacher: ``[B, S_t - 1, V_t]`` aligned logits of the teacher's batch (``alignment.teacher_inputs``) as a
            ``TeacherLogits`` / ``TeacherHidden``.
        alignment: :func:`hf_kd.teachers.cross_tokenizer.alignment.align_batch` of this batch; ``labels``: ``[B, S - 1]``
            aligned labels.
    Returns:
        Scalars; ``aligned_fraction`` is the one-to-one targets and ``shared_mass`` the teacher's probability on shared
        tokens summed over them, both divided like the loss (their ratio is the mean shared mass per aligned target).
    """
    flat_labels, keep = target_rows(labels, objective.ignore_index)
    kept = keep.nonzero().flatten()  # every student row that counts; pairs and span rows are among them
    s_rows, t_rows = _rows(student, kept), _rows(teacher)
    device, dtype = s_rows.rows.device, s_rows.dtype  # float64 in, float64 out
    denominator = normalizer(alignment.targets, num_items_in_batch, device=device, dtype=dtype)
    chunk = max(chunk_size, 1)
    span_value, span_weight = span_term(s_rows, t_rows, alignment, shared, objective, chunk)
    row_plan = _RowPlan.of(alignment, keep.numel(), span_weight)[kept]
    head = s_rows.head
    plan = ChunkPlan(
        objective,
        s_rows.vocab,
        chunk,
        dtype,
        need_divergence=True,
        need_ce=True,  # both always logged
        student_softcap=None if head is None else head.softcap,
        student_logit_scale=None if head is None else head.logit_scale,
        dense_teacher=False,
    )
    source = _teacher_source(t_rows, row_plan, uld=bool(weights.uld))
    # the span term's value is added once; its gradient comes through the chunks (fixed weights, see span_term)
    total, divergence, ce, extras = run(
        s_rows,
        source,
        flat_labels,
        plan,
        _Divergence(shared, weights, device),
        denominator,
        offset=weights.exact * span_value,
    )
    pairs = torch.tensor(float(alignment.pairs.shape[1]), device=device, dtype=dtype)
    shared_mass = extras.get("shared_mass", torch.zeros((), device=device, dtype=dtype))  # no chunk: no target
    return {
        "loss": total,
        "distill_loss": divergence,
        "ce_loss": ce,
        "aligned_fraction": pairs / denominator,
        "shared_mass": shared_mass,
    }


def _rows(signal, kept: torch.Tensor | None = None) -> LogitRows:
    """A side's rows, flattened over their positions, as the chunk driver reads them: full logits (a tensor or a
    ``TeacherLogits``) or hidden states with their head (``StudentHidden`` / ``TeacherHidden``)."""
    head = getattr(signal, "head", None)
    rows = signal.hidden if head is not None else getattr(signal, "logits", signal)
    rows = rows.reshape(-1, rows.shape[-1])
    dtype = torch.promote_types(rows.dtype, torch.float32)
    if head is not None:
        dtype = torch.promote_types(dtype, head.weight.dtype)
    return LogitRows(rows, head, dtype, rows.shape[-1] if head is None else head.weight.shape[0], kept)


@dataclass(frozen=True)
class _RowPlan:
    """What each student row is to the loss (-1: none): its teacher row if it aligns one to one, the teacher row where
    it and the teacher have read the same text (``boundary_row``), where its span group starts if it starts one, the
    teacher row of the token it is read inside and the student ids read since that token began, its token if it is in
    a span group and whether it is the span's last, and that token's weight in the span term's gradient."""

    teacher_row: torch.Tensor  # [N]
    boundary_row: torch.Tensor  # [N]
    start_row: torch.Tensor  # [N]
    inner_row: torch.Tensor  # [N]
    inner_before: torch.Tensor  # [N, DEPTH]
    span_token: torch.Tensor  # [N]
    span_last: torch.Tensor  # [N] bool
    span_weight: torch.Tensor  # [N]

    @classmethod
    def of(cls, alignment: Alignment, rows: int, span_weight: torch.Tensor) -> _RowPlan:
        """The plan of the ``rows`` flat student rows of a batch."""
        device = span_weight.device
        none = lambda: torch.full((rows,), -1, dtype=torch.long, device=device)  # noqa: E731
        teacher_row, start_row, span_token, inner_row = none(), none(), none(), none()
        teacher_row[alignment.pairs[0]] = alignment.pairs[1]
        start_row[alignment.span_starts[0]] = alignment.span_starts[1]
        # after the same text, where the projection speaks for the target: one to one, or a span start that fits
        fitting = torch.where(alignment.span_start_fits, alignment.span_starts[1], -1)
        boundary_row = teacher_row.clone()
        boundary_row[alignment.span_starts[0]] = torch.maximum(boundary_row[alignment.span_starts[0]], fitting)
        span_token[alignment.span_student[0]] = alignment.span_student[1]
        inner_row[alignment.inner[0]] = alignment.inner[1]
        inner_before = torch.full((rows, alignment.inner.shape[0] - 2), -1, dtype=torch.long, device=device)
        inner_before[alignment.inner[0]] = alignment.inner[2:].T
        span_last = torch.zeros(rows, dtype=torch.bool, device=device)
        span_last[alignment.span_student[0]] = last_in_group(alignment.span_student[2])
        return cls(teacher_row, boundary_row, start_row, inner_row, inner_before, span_token, span_last, span_weight)

    def __getitem__(self, rows) -> _RowPlan:
        """The plan of some rows (an index or a slice)."""
        return _RowPlan(*(getattr(self, f.name)[rows] for f in fields(self)))


@dataclass(frozen=True)
class _ChunkTeacher:
    """What one chunk of student rows reads of the teacher: the chunk's row plan, and every teacher row it reads (after
    the same text, inside a token, where a span starts) as logits, each projected once."""

    rows: _RowPlan
    read: torch.Tensor  # [r] the teacher rows read, sorted
    logits: torch.Tensor | None  # [r, V_t]

    def at(self, teacher_rows: torch.Tensor) -> torch.Tensor:
        """``[m]`` teacher rows among those read -> their ``[m, V_t]`` logits."""
        return self.logits[torch.searchsorted(self.read, teacher_rows)]


def _teacher_source(teacher: LogitRows, row_plan: _RowPlan, uld: bool):
    """The chunk driver's source: a slice of the student's target rows -> its :class:`_ChunkTeacher`."""

    def chunk(rows: slice, _scratch) -> _ChunkTeacher:
        part = row_plan[rows]
        wanted = torch.cat([part.boundary_row, part.inner_row] + ([part.start_row] if uld else []))
        read = torch.unique(wanted[wanted >= 0])  # sorted: looked up by searchsorted
        return _ChunkTeacher(part, read, teacher.logits(read) if read.numel() else None)

    return chunk


class _Divergence:
    """The chunk driver's divergence: a chunk's ``(exact + ULD term sum, CE sum, d(alpha-mix)/d(student logits),
    {"shared_mass": sum})``, the gradient by autograd through the chunk's terms (:meth:`terms`)."""

    def __init__(self, shared: SharedVocabulary, weights: CrossTokenizerWeights, device):
        self.shared, self.weights = shared, weights
        self.t_ids, self.segmentation = shared.teacher_ids.to(device), shared.segmentation.to(device)

    def __call__(self, student, teacher: _ChunkTeacher, labels, plan: ChunkPlan, want_grad: bool, _scratch):
        raw = student.detach().requires_grad_(want_grad)  # a leaf of its own over the chunk's buffer
        with torch.set_grad_enabled(want_grad):
            logits = finish_logits(raw, plan.student_logit_scale, plan.student_softcap)
            divergence, ce, mass = self.terms(logits, teacher, labels, plan.objective)
            mix = plan.objective.combine(divergence, ce)
            grad = None
            if want_grad:  # a chunk with nothing aligned and alpha = 1 has no term that reaches the student
                grad = torch.autograd.grad(mix, raw)[0] if mix.requires_grad else torch.zeros_like(raw)
        return divergence.detach(), ce.detach(), grad, {"shared_mass": mass}

    def terms(self, s_logits: torch.Tensor, teacher: _ChunkTeacher, targets: torch.Tensor, objective: Objective):
        """``(exact and ULD terms, CE, shared mass)`` sums of a chunk of target rows (``s_logits``: their student
        logits ``[c, V_s]``; ``targets`` ``[c]``)."""
        temperature, weights, part = objective.temperature, self.weights, teacher.rows
        log_p_s = torch.log_softmax(s_logits, dim=-1)
        ce = -log_p_s.gather(-1, targets.unsqueeze(-1)).sum()
        exact = uld = mass = log_p_s.new_zeros(())
        at_boundary = part.boundary_row >= 0
        if at_boundary.any():  # both have read the same text: next-token distributions, the teacher's projected
            with torch.no_grad():
                t_logits = teacher.at(part.boundary_row[at_boundary])
                t_projected, has = projected_log_probs(
                    t_logits, self.segmentation[:, 0], s_logits.shape[-1], temperature
                )
                paired = part.teacher_row[at_boundary] >= 0
                mass = torch.softmax(t_logits[paired], -1)[:, self.t_ids].sum()  # on shared tokens, one-to-one targets
            # the teacher side as "logits" whose log_softmax(x / T) is its projected distribution itself
            exact = objective.divergence(s_logits[at_boundary][has], temperature * t_projected[has]).sum()
        inside = part.inner_row >= 0
        if inside.any():  # a target inside a teacher token: what the teacher's token says comes next
            with torch.no_grad():
                t_inner, has = inner_log_probs(
                    teacher.at(part.inner_row[inside]),
                    part.inner_before[inside],
                    self.segmentation,
                    s_logits.shape[-1],
                    temperature,
                )
            if has.any():
                exact = exact + objective.divergence(s_logits[inside][has], temperature * t_inner[has]).sum()
        in_span = part.span_token >= 0
        if in_span.any():  # the span term's gradient: fixed weights on these factors' log-probs (see span_term)
            tokens = part.span_token[in_span]
            factor = log_p_s[in_span].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            ends = part.span_last[in_span]
            if ends.any():
                ends_lp = last_log_probs(log_p_s[in_span][ends], tokens[ends], self.shared.student_extensions)
                factor = factor.masked_scatter(ends, ends_lp)
            weighted = (part.span_weight[in_span] * factor).sum()
            exact = exact + weighted - weighted.detach()  # adds the gradient, not the value (the driver's offset)
        starts = part.start_row >= 0
        if weights.uld and starts.any():  # where a span group starts, both sides have read the same text
            with torch.no_grad():
                t_probs = torch.softmax(teacher.at(part.start_row[starts]) / temperature, dim=-1)
            s_probs = log_p_s[starts].exp() if temperature == 1 else torch.softmax(s_logits[starts] / temperature, -1)
            uld = uld_distance(s_probs, t_probs).sum()
        return weights.exact * exact + weights.uld * uld, ce, mass.detach()

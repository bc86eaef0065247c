"""The cross-tokenizer loss: a student against a teacher that tokenizes the same text differently.

:mod:`hf_kd.alignment` pairs the two tokenizations; this module turns the pairing into one objective, a sum over the
student's target positions divided by their count (``num_items_in_batch`` in training), as every hf_kd loss:

* **exact term** (weight ``exact_weight``), on one-to-one positions: the configured divergence between the two
  next-token distributions over the shared vocabulary, plus one bucket on each side for the mass on every other token
  (the buckets of :mod:`hf_kd.sparse`; with every token shared the rest buckets are empty and the term is the
  same-tokenizer loss). And on span groups, the same divergence between the two-bucket distributions ``{the group's
  text, anything else}``: the text's probability is the chain-rule product over each side's tokens in the group
  (:func:`span_log_probs`), the same event for both models. A span group adds its term once, its student targets all
  count in the divisor.
* **ULD term** (weight ``uld_weight``), where no token-to-token correspondence exists: at the position where a span
  group starts (both models have read the same text), the L1 distance between the two distributions' probabilities
  sorted in decreasing order (:func:`uld_distance`, Boizard et al. 2024), at temperature ``T``, not ``T**2``-scaled.
* **CE** over every student target, aligned or not; ``alpha`` mixes it in as everywhere.

Temperature acts on the buckets as in :mod:`hf_kd.sparse` (exact on one-to-one positions whose tokens are all shared).
``mse`` needs logits over one vocabulary and is refused. The student's and teacher's ``[rows, V]`` logits exist one
chunk at a time: the student's rows are projected and reduced inside ``torch.utils.checkpoint`` (recomputed in the
backward), so nothing of size ``[tokens, vocab]`` is ever held, fused path or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .alignment import Alignment, SharedVocabulary
from .losses import Objective, normalizer, target_rows
from .sparse import EMPTY_TAIL, student_bucket_log_probs

EXACT_WEIGHT = 1.0  # the exact term is the objective itself
ULD_WEIGHT = 1.0  # ULD is in [0, 2], the scale of a KL between near distributions; 0 turns it off


@dataclass(frozen=True)
class CrossTokenizerWeights:
    exact: float = EXACT_WEIGHT
    uld: float = ULD_WEIGHT


def uld_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """``[N, V_s]`` and ``[N, V_t]`` probabilities -> ``[N]`` L1 distance between them sorted in decreasing order, the
    shorter padded with zeros (the closed-form Wasserstein distance of ULD, which needs no vocabulary mapping)."""
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    sorted_s = torch.nn.functional.pad(student_probs.sort(-1, descending=True).values, (0, width - student_probs.shape[-1]))
    sorted_t = torch.nn.functional.pad(teacher_probs.sort(-1, descending=True).values, (0, width - teacher_probs.shape[-1]))
    return (sorted_s - sorted_t.detach()).abs().sum(-1)


def span_log_probs(token_log_probs: torch.Tensor, groups: torch.Tensor, count: int) -> torch.Tensor:
    """``[M]`` log-probabilities of the tokens of span groups and ``[M]`` their group index -> ``[count]`` the log
    probability of each group's text, by the chain rule (the sum of its tokens' log-probabilities)."""
    return token_log_probs.new_zeros(count).index_add(0, groups, token_log_probs)


def two_buckets(log_prob: torch.Tensor) -> torch.Tensor:
    """``[G]`` log P(text) -> ``[G, 2]`` log-probabilities of ``{the text, anything else}`` (an empty bucket is
    :data:`EMPTY_TAIL`, as in the sparse loss)."""
    log_prob = log_prob.clamp_max(0.0)
    rest = torch.log(-torch.expm1(log_prob.clamp_max(-1e-30)))  # log(1 - P), stable for P near 0 and near 1
    return torch.stack([log_prob.clamp_min(EMPTY_TAIL), rest.clamp_min(EMPTY_TAIL)], dim=-1)


class _Rows:
    """A side's aligned rows as logits, a chunk at a time: full logits ``[N, V]`` or hidden states ``[N, H]`` with the
    head that projects them (:class:`hf_kd.targets.StudentHidden` / ``TeacherHidden``)."""

    def __init__(self, signal):
        head = getattr(signal, "head", None)
        rows = signal.hidden if head is not None else getattr(signal, "logits", signal)
        self.rows, self.head = rows.reshape(-1, rows.shape[-1]), head

    def logits(self, index: torch.Tensor) -> torch.Tensor:
        rows = self.rows[index]
        logits = self.head.logits(rows) if self.head is not None else rows
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunked_sum(fn, student: _Rows, student_index: torch.Tensor, *extra: torch.Tensor, chunk: int) -> torch.Tensor:
    """``sum over chunks of fn(student_logits_chunk, *extra_chunks)`` with the student's logits recomputed in the
    backward (``checkpoint``) instead of kept: ``[chunk, V]`` at a time."""
    total = student.rows.new_zeros((), dtype=torch.float32)
    for start in range(0, student_index.numel(), chunk):
        part = slice(start, start + chunk)
        run = lambda rows, *args: fn(student.logits(rows), *args)
        if torch.is_grad_enabled() and student.rows.requires_grad:
            value = checkpoint(run, student_index[part], *(e[part] for e in extra), use_reentrant=False)
        else:
            value = run(student_index[part], *(e[part] for e in extra))
        total = total + value
    return total


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
        student: ``[B, S - 1, V_s]`` aligned logits, or a :class:`hf_kd.targets.StudentHidden` (fused path).
        teacher: ``[B, S_t - 1, V_t]`` aligned logits of the teacher's batch (``alignment.teacher_inputs``) as a
            ``TeacherLogits`` / ``TeacherHidden``.
        alignment: :func:`hf_kd.alignment.align_batch` of this batch; ``labels``: ``[B, S - 1]`` aligned labels.
    Returns:
        Scalars; ``aligned_fraction`` is the one-to-one targets and ``shared_mass`` the teacher's probability on shared
        tokens summed over them, both divided like the loss (their ratio is the mean shared mass per aligned target).
    """
    student_rows, teacher_rows = _Rows(student), _Rows(teacher)
    device = student_rows.rows.device
    denominator = normalizer(alignment.targets, num_items_in_batch, device=device, dtype=torch.float32)
    s_ids, t_ids = shared.student_ids.to(device), shared.teacher_ids.to(device)
    chunk = max(chunk_size, 1)
    stats = {}

    def teacher_log_probs(index: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(teacher_rows.logits(index), dim=-1)

    with torch.set_grad_enabled(torch.is_grad_enabled() and objective.alpha > 0):
        # one-to-one positions: the divergence over shared tokens + a rest bucket each
        s_index, t_index = alignment.pairs
        t_buckets, mass = [], []
        for start in range(0, t_index.numel(), chunk):
            log_p_t = teacher_log_probs(t_index[start : start + chunk])
            t_buckets.append(student_bucket_log_probs(log_p_t, t_ids.expand(log_p_t.shape[0], -1)))
            mass.append(log_p_t[:, t_ids].exp().sum())
        t_buckets = torch.cat(t_buckets) if t_buckets else None
        stats["shared_mass"] = (sum(mass) if mass else torch.zeros((), device=device)) / denominator
        stats["aligned_fraction"] = torch.tensor(float(s_index.numel()), device=device) / denominator

        def exact(logits, t_bucket):
            s_bucket = student_bucket_log_probs(torch.log_softmax(logits, -1), s_ids.expand(logits.shape[0], -1))
            return objective.divergence(s_bucket, t_bucket).sum()

        divergence = _chunked_sum(exact, student_rows, s_index, *([t_buckets] if t_buckets is not None else []), chunk=chunk)  # fmt: skip
        # span groups: the chain-rule probability of each group's text, on two buckets
        groups = alignment.span_starts.shape[1]
        if groups:
            s_rows, s_tokens, s_groups = alignment.span_student
            t_rows, t_tokens, t_groups = alignment.span_teacher
            s_token_lp = _token_log_probs(student_rows, s_rows, s_tokens, chunk)
            with torch.no_grad():
                t_token_lp = _token_log_probs(teacher_rows, t_rows, t_tokens, chunk)
            s_span = span_log_probs(s_token_lp, s_groups, groups)
            t_span = span_log_probs(t_token_lp, t_groups, groups)
            divergence = divergence + objective.divergence(two_buckets(s_span), two_buckets(t_span)).sum()
        divergence = weights.exact * divergence
        if groups and weights.uld:  # where the span groups start, both sides have read the same text
            temperature = objective.temperature

            def uld(logits, t_probs):
                return uld_distance(torch.softmax(logits / temperature, -1), t_probs).sum()

            s_start, t_start = alignment.span_starts
            with torch.no_grad():
                t_probs = torch.softmax(teacher_rows.logits(t_start) / temperature, -1)
            divergence = divergence + weights.uld * _chunked_sum(uld, student_rows, s_start, t_probs, chunk=chunk)
        divergence = divergence / denominator

    ce = None
    if labels is not None and objective.needs_ce(True, True):
        flat_labels, keep = target_rows(labels, objective.ignore_index)
        rows = keep.nonzero().flatten()
        with torch.set_grad_enabled(torch.is_grad_enabled() and objective.alpha < 1):
            ce = -_token_log_probs(student_rows, rows, flat_labels, chunk).sum() / denominator
    total = objective.combine(divergence, ce)
    return {"loss": total, "distill_loss": divergence.detach(), "ce_loss": None if ce is None else ce.detach(), **stats}


def _token_log_probs(side: _Rows, rows: torch.Tensor, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    """``[M]`` log p(token) at each row (T = 1), ``chunk`` rows at a time (the student's recomputed in the backward)."""

    def gather(index, ids):
        return torch.log_softmax(side.logits(index), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    parts = []
    for start in range(0, rows.numel(), chunk):
        part = slice(start, start + chunk)
        if torch.is_grad_enabled() and side.rows.requires_grad:
            parts.append(checkpoint(gather, rows[part], tokens[part], use_reentrant=False))
        else:
            parts.append(gather(rows[part], tokens[part]))
    return torch.cat(parts) if parts else side.rows.new_zeros(0, dtype=torch.float32)

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
:mod:`hf_kd.objective.sparse`. ``mse`` needs logits over one vocabulary and is refused. One pass over the student's target
rows, a chunk at a time, makes both models' logits for the chunk and takes the chunk's gradient at once (with respect
to the student's hidden states and head, or its logits), as :mod:`hf_kd.objective.chunking` does; only ``d(hidden)`` and
``d(weight)`` outlive a chunk, so on the fused path nothing of size ``[tokens, vocab]`` is held. The span term depends
on sums across chunks: it is evaluated first, and its gradient enters the pass as fixed weights on each token's
log-probability (:func:`_span_term`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from hf_kd.objective.divergences import uld_distance  # noqa: F401 (the ULD term; importable from here)
from hf_kd.objective.signals import TeacherHidden, TeacherLogits
from hf_kd.teachers.cross_tokenizer.alignment import Alignment
from hf_kd.objective.losses import Objective, normalizer, target_rows
from hf_kd.models.heads import as_projection_weight, finish_logits, project
from hf_kd.objective.sparse import EMPTY_TAIL
from hf_kd.teachers.cross_tokenizer.vocabulary import Extensions, SharedVocabulary

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

    def terms(self, student, labels, objective: Objective, *, num_items_in_batch=None, chunk_size: int = 256,
              vocab_size: int | None = None) -> dict[str, torch.Tensor | None]:  # fmt: skip
        """:func:`hf_kd.objective.terms.objective_terms` for this signal (``vocab_size`` does not apply: the
        vocabularies are mapped, not cut)."""
        return cross_tokenizer_terms(student, self.teacher, self.alignment, self.shared, labels, objective,
                                     weights=self.weights, num_items_in_batch=num_items_in_batch,
                                     chunk_size=chunk_size)  # fmt: skip


def projected_log_probs(teacher_logits: torch.Tensor, projection: torch.Tensor, student_vocab: int,
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
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


def inner_log_probs(teacher_logits: torch.Tensor, before: torch.Tensor, segmentation: torch.Tensor,
                    student_vocab: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
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
    head that projects them (:class:`hf_kd.objective.terms.StudentHidden` / ``TeacherHidden``). ``tensors``: what a gradient
    may reach (the rows, and the head's weight and bias). The head's weight is made ready for the matmul once per call
    (:func:`hf_kd.models.loading.as_projection_weight`: a CUDA bf16 weight stays bf16), never per chunk."""

    def __init__(self, signal):
        head = getattr(signal, "head", None)
        rows = signal.hidden if head is not None else getattr(signal, "logits", signal)
        self.rows, self.head = rows.reshape(-1, rows.shape[-1]), head
        self.tensors = [self.rows] + ([] if head is None else [t for t in (head.weight, head.bias) if t is not None])
        self.dtype = torch.promote_types(self.rows.dtype, torch.float32)
        if head is not None:
            self.dtype = torch.promote_types(self.dtype, head.weight.dtype)
            self.weight = as_projection_weight(head.weight.detach(), self.dtype)
            self.bias = None if head.bias is None else head.bias.detach().to(self.dtype)

    def raw(self, index: torch.Tensor) -> torch.Tensor:
        """The rows' logits before the head's scale and softcap (no graph)."""
        with torch.no_grad(), torch.autocast(self.rows.device.type, enabled=False):
            if self.head is None:
                return self.rows[index].detach().to(self.dtype)
            return project(self.rows[index].detach(), self.weight, self.bias, self.dtype)

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        return raw if self.head is None else finish_logits(raw, self.head.logit_scale, self.head.softcap)

    def logits(self, index: torch.Tensor) -> torch.Tensor:
        """Float32 (at least) logits of the rows at ``index``, without a graph."""
        return self.finish(self.raw(index))

    def add_gradients(self, grads: list, index: torch.Tensor, d_raw: torch.Tensor) -> None:
        """Add a chunk's ``d(loss) / d(raw logits)`` to the gradients of the rows, the weight and the bias: the chain
        rule through the head by hand (matmuls that accept a CUDA bf16 weight; autograd has no derivative for them)."""
        if self.head is None:
            if grads[0] is not None:
                grads[0].index_add_(0, index, d_raw)
            return
        with torch.no_grad(), torch.autocast(self.rows.device.type, enabled=False):
            if grads[0] is not None:  # d(hidden) = d_raw @ W
                grads[0].index_add_(0, index, project(d_raw, self.weight.T, None, self.dtype))
            if len(grads) > 1 and grads[1] is not None:  # d(W) = d_raw.T @ hidden
                hidden = as_projection_weight(self.rows[index].detach(), self.dtype)
                grads[1] += project(d_raw.T, hidden.T, None, self.dtype)
            if len(grads) > 2 and grads[2] is not None:
                grads[2] += d_raw.sum(0)


class _WithGradients(torch.autograd.Function):
    """A value whose gradients were computed in the forward, chunk by chunk: the backward scales them by the incoming
    gradient (no chunk is kept or recomputed, as in :mod:`hf_kd.objective.chunking`)."""

    @staticmethod
    def forward(ctx, value, grads, *tensors):
        ctx.grads, ctx.dtypes = grads, [t.dtype for t in tensors]
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, *(None if g is None else (grad_output * g).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)))


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
        student: ``[B, S - 1, V_s]`` aligned logits, or a :class:`hf_kd.objective.terms.StudentHidden` (fused path).
        teacher: ``[B, S_t - 1, V_t]`` aligned logits of the teacher's batch (``alignment.teacher_inputs``) as a
            ``TeacherLogits`` / ``TeacherHidden``.
        alignment: :func:`hf_kd.teachers.cross_tokenizer.alignment.align_batch` of this batch; ``labels``: ``[B, S - 1]`` aligned labels.
    Returns:
        Scalars; ``aligned_fraction`` is the one-to-one targets and ``shared_mass`` the teacher's probability on shared
        tokens summed over them, both divided like the loss (their ratio is the mean shared mass per aligned target).
    """
    student_rows, teacher_rows = _Rows(student), _Rows(teacher)
    device = student_rows.rows.device
    flat_labels, keep = target_rows(labels, objective.ignore_index)
    rows = keep.nonzero().flatten()  # every student row that counts; pairs and span rows are among them
    dtype = torch.promote_types(student_rows.rows.dtype, torch.float32)  # float64 in, float64 out
    plan = _RowPlan(alignment, keep.numel(), device, dtype)
    denominator = normalizer(alignment.targets, num_items_in_batch, device=device, dtype=dtype)
    span_value, plan.span_weight = _span_term(student_rows, teacher_rows, alignment, shared, objective, chunk_size)
    t_ids, segmentation = shared.teacher_ids.to(device), shared.segmentation.to(device)
    projection = segmentation[:, 0]
    temperature = objective.temperature

    def chunk_terms(s_logits: torch.Tensor, index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``[divergence, ce, shared mass]`` sums of a chunk of target rows (``s_logits``: their student logits)."""
        log_p_s = torch.log_softmax(s_logits, dim=-1)
        zero = log_p_s.new_zeros(())
        ce = -log_p_s.gather(-1, targets.unsqueeze(-1)).sum()
        exact = uld = mass = zero
        # every teacher row this chunk reads (after the same text, inside a token, where a span starts), projected once
        wanted = [plan.boundary_row[index], plan.inner_row[index]]
        if weights.uld:
            wanted.append(plan.start_row[index])
        wanted = torch.cat(wanted)
        teacher_ids_read = torch.unique(wanted[wanted >= 0])  # sorted: looked up by searchsorted below
        with torch.no_grad():
            read = teacher_rows.logits(teacher_ids_read) if teacher_ids_read.numel() else None
        t_at = lambda rows_: read[torch.searchsorted(teacher_ids_read, rows_)]  # noqa: E731
        at_boundary = plan.boundary_row[index] >= 0
        if at_boundary.any():  # both have read the same text: next-token distributions, the teacher's projected
            with torch.no_grad():
                t_logits = t_at(plan.boundary_row[index][at_boundary])
                t_projected, has = projected_log_probs(t_logits, projection, s_logits.shape[-1], temperature)
                paired = plan.teacher_row[index][at_boundary] >= 0
                mass = torch.softmax(t_logits[paired], -1)[:, t_ids].sum()  # on shared tokens, one-to-one targets
            # the teacher side as "logits" whose log_softmax(x / T) is its projected distribution itself
            exact = objective.divergence(s_logits[at_boundary][has], temperature * t_projected[has]).sum()
        inside = plan.inner_row[index] >= 0
        if inside.any():  # a target inside a teacher token: what the teacher's token says comes next
            with torch.no_grad():
                t_logits = t_at(plan.inner_row[index][inside])
                t_inner, has = inner_log_probs(t_logits, plan.inner_before[index][inside], segmentation,
                                               s_logits.shape[-1], temperature)  # fmt: skip
            if has.any():
                exact = exact + objective.divergence(s_logits[inside][has], temperature * t_inner[has]).sum()
        in_span = plan.span_token[index] >= 0
        if in_span.any():  # the span term's gradient: fixed weights on these factors' log-probs (see _span_term)
            tokens = plan.span_token[index][in_span]
            factor = log_p_s[in_span].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            ends = plan.span_last[index][in_span]
            if ends.any():
                ends_lp = last_log_probs(log_p_s[in_span][ends], tokens[ends], shared.student_extensions)
                factor = factor.masked_scatter(ends, ends_lp)
            weighted = (plan.span_weight[index][in_span] * factor).sum()
            exact = exact + weighted - weighted.detach()  # adds the gradient, not the value (counted once, below)
        starts = plan.start_row[index] >= 0
        if weights.uld and starts.any():  # where a span group starts, both sides have read the same text
            with torch.no_grad():
                t_probs = torch.softmax(t_at(plan.start_row[index][starts]) / temperature, dim=-1)
            s_probs = log_p_s[starts].exp() if temperature == 1 else torch.softmax(s_logits[starts] / temperature, -1)
            uld = uld_distance(s_probs, t_probs).sum()
        return torch.stack([weights.exact * exact + weights.uld * uld, ce, mass.detach()])

    track = torch.is_grad_enabled() and any(t.requires_grad for t in student_rows.tensors)
    coefficients = (objective.alpha / denominator, (1 - objective.alpha) / denominator)  # d total / d (sums0, sums1)
    grads = [None if not t.requires_grad else torch.zeros(t.shape, dtype=dtype, device=device)
             for t in student_rows.tensors] if track else []  # fmt: skip
    sums = torch.zeros(3, device=device, dtype=dtype)
    chunk = max(chunk_size, 1)
    for start in range(0, rows.numel(), chunk):
        index, targets = rows[start : start + chunk], flat_labels[start : start + chunk]
        with torch.enable_grad() if track else contextlib.nullcontext():
            raw = student_rows.raw(index).requires_grad_(track)
            part = chunk_terms(student_rows.finish(raw), index, targets)
            if track:  # this chunk's share of the gradient, now: its logits are freed before the next chunk
                share = coefficients[0] * part[0] + coefficients[1] * part[1]
                (d_raw,) = torch.autograd.grad(share, raw)
                student_rows.add_gradients(grads, index, d_raw.to(dtype))
        sums = sums + part.detach()
    divergence = (sums[0] + weights.exact * span_value) / denominator
    ce = sums[1] / denominator
    stats = {"aligned_fraction": torch.tensor(float(alignment.pairs.shape[1]), device=device, dtype=dtype) / denominator,
             "shared_mass": sums[2] / denominator}  # fmt: skip
    total = objective.combine(divergence, ce)
    if track:
        total = _WithGradients.apply(total, grads, *student_rows.tensors)
    return {"loss": total, "distill_loss": divergence, "ce_loss": ce, **stats}


class _RowPlan:
    """What each flat student row is to the loss: its teacher row if it aligns one to one, the teacher row where its
    span group starts if it starts one, its token if it is in a span group (-1: none), and that token's weight in the
    span term's gradient."""

    def __init__(self, alignment: Alignment, rows: int, device, dtype):
        self.teacher_row = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.teacher_row[alignment.pairs[0]] = alignment.pairs[1]
        self.start_row = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.start_row[alignment.span_starts[0]] = alignment.span_starts[1]
        # after the same text, where the projection speaks for the target: one to one, or a span start that fits
        fitting = torch.where(alignment.span_start_fits, alignment.span_starts[1], -1)
        self.boundary_row = self.teacher_row.clone()
        self.boundary_row[alignment.span_starts[0]] = torch.maximum(self.boundary_row[alignment.span_starts[0]], fitting)
        self.span_token = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.span_token[alignment.span_student[0]] = alignment.span_student[1]
        self.inner_row = torch.full((rows,), -1, dtype=torch.long, device=device)  # the teacher row of its token
        self.inner_row[alignment.inner[0]] = alignment.inner[1]
        self.inner_before = torch.full((rows, alignment.inner.shape[0] - 2), -1, dtype=torch.long, device=device)
        self.inner_before[alignment.inner[0]] = alignment.inner[2:].T
        self.span_last = torch.zeros(rows, dtype=torch.bool, device=device)  # the last token of its span
        self.span_last[alignment.span_student[0]] = last_in_group(alignment.span_student[2])
        self.span_weight = torch.zeros(rows, device=device, dtype=dtype)


def _span_term(student: _Rows, teacher: _Rows, alignment: Alignment, shared: SharedVocabulary, objective: Objective,
               chunk: int):  # fmt: skip
    """The span groups' term and, per student row, the weight of its factor's log-probability in its gradient.

    Each side's probability that the text goes on with the span's text: the chain rule over its tokens in the span,
    the last factor summed over every token whose text starts with the last token's (" s5 s3" goes on with " s5" as
    well as " s5" itself does; :func:`last_log_probs`). The term is a function of sums across chunks: it is evaluated
    here without a graph, and its derivative with respect to every factor becomes a fixed weight, so that the chunk
    pass adds the exact gradient while holding one chunk at a time."""
    rows = student.rows.shape[0]
    weight = torch.zeros(rows, device=student.rows.device, dtype=torch.promote_types(student.rows.dtype, torch.float32))
    groups = alignment.span_starts.shape[1]
    if not groups:
        return student.rows.new_zeros((), dtype=torch.float32), weight
    s_rows, s_tokens, s_groups = alignment.span_student
    t_rows, t_tokens, t_groups = alignment.span_teacher
    with torch.no_grad():
        s_token_lp = _factor_log_probs(student, s_rows, s_tokens, last_in_group(s_groups), shared.student_extensions, chunk)
        t_token_lp = _factor_log_probs(teacher, t_rows, t_tokens, last_in_group(t_groups), shared.teacher_extensions, chunk)
    with torch.enable_grad():
        leaf = s_token_lp.detach().requires_grad_(True)
        s_span = span_log_probs(leaf, s_groups, groups)
        t_span = span_log_probs(t_token_lp, t_groups, groups)
        value = objective.divergence(two_buckets(s_span), two_buckets(t_span)).sum()
        (grad,) = torch.autograd.grad(value, leaf)
    weight[s_rows] = grad.to(weight.dtype)
    return value.detach(), weight


def last_in_group(groups: torch.Tensor) -> torch.Tensor:
    """``[M]`` group index of each token, in order -> ``[M]`` whether it is its group's last."""
    return torch.cat([groups[1:] != groups[:-1], groups.new_ones(min(groups.numel(), 1), dtype=torch.bool)])


def last_log_probs(log_probs: torch.Tensor, tokens: torch.Tensor, extensions: Extensions) -> torch.Tensor:
    """``[N, V]`` log-probabilities and ``[N]`` tokens -> ``[N]`` log of the probability of every token whose text
    starts with the token's (itself included): that the text goes on with the token's text."""
    order = extensions.order.to(log_probs.device)
    width = order.numel()
    ranked = log_probs[:, order]  # sorted by text: a token's extensions are one range
    position = torch.arange(width, device=log_probs.device)
    lo, hi = extensions.lo.to(log_probs.device)[tokens], extensions.hi.to(log_probs.device)[tokens]
    inside = (position >= lo.unsqueeze(-1)) & (position < hi.unsqueeze(-1))
    return torch.logsumexp(ranked.masked_fill(~inside, -torch.inf), dim=-1)


def _factor_log_probs(side: _Rows, rows: torch.Tensor, tokens: torch.Tensor, last: torch.Tensor,
                      extensions: Extensions, chunk: int) -> torch.Tensor:  # fmt: skip
    """``[M]`` each span token's factor at its row (T = 1): log p(token), or for the last of a span
    :func:`last_log_probs`; ``chunk`` rows at a time, without a graph."""
    parts = []
    for i in range(0, rows.numel(), chunk):
        log_p = torch.log_softmax(side.logits(rows[i : i + chunk]), -1)
        factor = log_p.gather(-1, tokens[i : i + chunk].unsqueeze(-1)).squeeze(-1)
        ends = last[i : i + chunk]
        if ends.any():
            factor = factor.masked_scatter(ends, last_log_probs(log_p[ends], tokens[i : i + chunk][ends], extensions))
        parts.append(factor)
    return torch.cat(parts) if parts else side.rows.new_zeros(0, dtype=torch.float32)

"""The fused lm_head + distillation loss: the same value and gradients as :func:`hf_kd.objective.losses.distillation_loss`
on full logits, computed chunk by chunk from the student's final hidden states so that no ``[N, V]`` tensor of the
student's ever exists.

* :func:`fused_distillation_loss` (teacher hidden states + head) and :func:`fused_sparse_distillation_loss` (teacher
  top-k cache) are thin wrappers that name every knob, as the unfused losses do;
* :func:`fused_objective` is the entry point behind them: validation (each error names the argument), masked rows
  dropped before any matmul, the dtype rule and the denominator, then the one chunk driver
  (:func:`hf_kd.objective.chunking.run`) with a teacher source for any signal of :mod:`hf_kd.objective.signals`
  (hidden states, full logits, top-k);
* a *divergence* is what one chunk computes: :func:`_autograd_divergence` for any objective, or
  :func:`_forward_kl_closed_form`, the same numbers with the gradient written out, where it applies.

:func:`lm_head_spec` reads the pieces (weight, bias, softcap, logit scale) off a Hugging Face causal LM, or says why
its head cannot be fused so that the caller falls back to full logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from hf_kd.models.heads import LMHeadSpec, finish_logits, lm_head_spec  # noqa: F401 (re-export)
from hf_kd.objective.chunking import CHUNK_SIZE, SOURCES, ChunkPlan, ChunkTeacher, LogitRows, Scratch, kept_rows, run
from hf_kd.objective.losses import Objective, check_label_ids, check_labels, normalizer, target_rows
from hf_kd.objective.signals import StudentHidden, TeacherHidden, TeacherLogits, TeacherSignal, TeacherTopK
from hf_kd.objective.sparse import check_cache_shapes, sampled_buckets, sparse_weights


def fused_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    chunk_size: int = CHUNK_SIZE,
    loss_type: str | Mapping[str, float] = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    scale_by_temperature: bool = True,
    return_components: bool = False,
    objective: Objective | None = None,
    divergence_params: Mapping[str, Mapping] | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float | None = None,
    teacher_logit_scale: float | None = None,
    vocab_size: int | None = None,
):
    """:func:`hf_kd.objective.losses.distillation_loss` on logits built from hidden states, one chunk of rows at a time.

    Each side's logits are ``softcap(logit_scale * (hidden @ weight.T + bias))[..., :vocab_size]`` (each step only
    when given; ``softcap(x) = cap * tanh(x / cap)``), which is how Gemma 2/3 and Cohere compute theirs.

    Args:
        student_hidden: ``[..., H_s]`` final (post-norm) student hidden states, e.g. ``[N, H_s]`` or ``[B, T, H_s]``,
            aligned with ``labels`` (a causal-LM caller drops the last position first).
        student_weight: ``[V_s, H_s]`` student lm_head weight. Receives a gradient, as do ``student_hidden`` and
            ``student_bias`` (``[V_s]``).
        teacher_hidden: ``[..., H_t]`` with the same leading dims. No gradient flows to any teacher input.
        teacher_weight: ``[V_t, H_t]``; ``teacher_bias`` ``[V_t]``.
        labels: ``[...]`` target ids (the leading dims of the hidden states), ``ignore_index`` where masked; ``None``:
            every position counts and ``alpha`` must be 1.
        chunk_size: positions per chunk; peak memory grows with ``chunk_size * V``, not with N.
        vocab_size: cut both logits to their first ``vocab_size`` columns (padded vocabularies of different size);
            without it ``V_s`` and ``V_t`` must be equal.
        The other arguments are :func:`~hf_kd.objective.losses.distillation_loss`'s.

    Returns:
        What ``distillation_loss`` returns on the full logits: a scalar (float32, float64 for float64 inputs), or
        ``(total, divergence, ce)`` with ``return_components``. Chunk logits are computed in float32 from low-precision
        inputs, so bfloat16 hidden states and weights give the float32 loss of those bfloat16 values (on CUDA from
        tensor-core matmuls with float32 output, which also make the gradients: see :mod:`hf_kd.objective.chunking`).
        Under bf16 autocast over float32 weights (CPU or CUDA) both heads' GEMMs take bf16 inputs the same way; at
        logit std 10 that rounding costs the loss ~2e-4 relative and the gradients 0.8-1.7% (norm of the error /
        norm), measured in ``tests/test_mixed_precision.py``.
    """
    if objective is None:  # the keyword form: the same objective, spelled out
        objective = Objective(
            loss_type,
            temperature,
            alpha,
            jsd_beta,
            skew_lambda,
            scale_by_temperature,
            ignore_index,
            divergence_params or {},
        )
    s_head = LMHeadSpec(student_weight, student_bias, student_softcap, student_logit_scale)
    t_head = LMHeadSpec(teacher_weight, teacher_bias, teacher_softcap, teacher_logit_scale)
    student, teacher = StudentHidden(student_hidden, s_head), TeacherHidden(teacher_hidden, t_head)
    return fused_objective(
        student,
        teacher,
        labels,
        objective,
        num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
        return_components=return_components,
    )


def fused_sparse_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    chunk_size: int = CHUNK_SIZE,
    loss_type: str | Mapping[str, float] = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    scale_by_temperature: bool = True,
    return_components: bool = False,
    objective: Objective | None = None,
    divergence_params: Mapping[str, Mapping] | None = None,
    student_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    student_logit_scale: float | None = None,
    vocab_size: int | None = None,
):
    """:func:`hf_kd.objective.sparse.sparse_distillation_loss` on student logits built chunk by chunk from hidden states.

    The student side is :func:`fused_distillation_loss`'s (``student_hidden`` ``[..., H]``, ``student_weight``
    ``[V, H]``, bias, softcap, logit scale, ``vocab_size`` cut); the teacher is a cache's rows: ``topk_ids`` and
    ``topk_logprobs`` ``[..., k]``, ``tail_logprob`` ``[...]`` (see :mod:`hf_kd.objective.sparse` for the tail bucket). Same value
    and gradients as the sparse loss on full logits, without ever holding ``[N, V]``.
    """
    if objective is None:  # the keyword form: the same objective, spelled out
        objective = Objective(
            loss_type,
            temperature,
            alpha,
            jsd_beta,
            skew_lambda,
            scale_by_temperature,
            ignore_index,
            divergence_params or {},
        )
    s_head = LMHeadSpec(student_weight, student_bias, student_softcap, student_logit_scale)
    student, teacher = StudentHidden(student_hidden, s_head), TeacherTopK(topk_ids, topk_logprobs, tail_logprob)
    return fused_objective(
        student,
        teacher,
        labels,
        objective,
        num_items_in_batch=num_items_in_batch,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
        return_components=return_components,
    )


def fused_objective(
    student: StudentHidden,
    teacher: TeacherSignal,
    labels: torch.Tensor | None,
    objective: Objective,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
    vocab_size: int | None = None,
    return_components: bool = False,
    return_extras: bool = False,
):
    """``objective`` between a student known by its final hidden states and any teacher signal, chunk by chunk.

    Args:
        student: ``hidden`` ``[..., H_s]`` and the head ``weight`` ``[V_s, H_s]`` (+ ``bias`` ``[V_s]``, softcap,
            logit scale) that makes its logits; hidden, weight and bias receive a gradient.
        teacher: aligned position by position with the student: ``TeacherHidden`` (``hidden`` ``[..., H_t]``, head
            ``[V_t, H_t]``), ``TeacherLogits`` (``logits`` ``[..., V_t]``) or ``TeacherTopK`` (``[..., k]`` ids and
            log-probs, ``[...]`` tail; ``mse`` is refused). No gradient flows to it.
        labels: ``[...]`` target ids, ``objective.ignore_index`` where masked; ``None``: every position counts and
            ``objective.alpha`` must be 1.
        num_items_in_batch: the divisor, as in :func:`~hf_kd.objective.losses.distillation_loss` (``None``: the valid count).
        chunk_size: positions per chunk; peak memory grows with ``chunk_size * V``, not with N.
        vocab_size: cut both sides to their first ``vocab_size`` columns; without it ``V_s`` and ``V_t`` must agree.

        return_extras: also return the sums a teacher source logs beside the loss (``ChunkTeacher.sums``: several
            teachers' own divergences), normalized like the loss, as a last element ``{name: value}``.

    Returns:
        A scalar (float32, float64 for float64 student inputs), or ``(total, divergence, ce)`` with
        ``return_components`` (``None`` for a term not computed), as ``distillation_loss`` returns on full logits.
    """
    vocab = _check(student, teacher, labels, objective, chunk_size, vocab_size)
    # The dtype distillation_loss would compute in on logits made by the student's matmul.
    dtype = torch.promote_types(torch.promote_types(student.hidden.dtype, student.head.weight.dtype), torch.float32)
    position_dims = student.hidden.dim() - 1
    # Masked rows are dropped first: prompts and padding never reach a matmul, an all-masked chunk does not exist.
    flat_labels, keep = target_rows(labels, objective.ignore_index)
    s_hidden = kept_rows(student.hidden, position_dims, keep)

    plan = ChunkPlan(
        objective=objective,
        vocab=vocab,
        chunk_size=chunk_size,
        dtype=dtype,
        need_divergence=objective.needs_divergence(return_components),
        need_ce=objective.needs_ce(labels is not None, return_components),
        student_softcap=student.head.softcap,
        student_logit_scale=student.head.logit_scale,
        dense_teacher=not isinstance(teacher, TeacherTopK),
    )
    if plan.need_ce or (plan.need_divergence and objective.reads_targets() and flat_labels is not None):
        check_label_ids(flat_labels, vocab, objective.ignore_index)  # the sampled estimator gathers at them too
    # alpha = 0 and nothing logged: the teacher is never read (a hidden teacher's weight is not even cast)
    # a signal of its own kind (several teachers' mixture) brings its own source of chunk rows
    make_source = SOURCES.get(type(teacher)) or type(teacher).chunk_source
    teacher_chunk = make_source(teacher, keep, plan) if plan.need_divergence else None
    divergence = _with_teacher_sums(_forward_kl_closed_form if _closed_form_applies(plan) else _autograd_divergence)
    # Normalization exactly as in distillation_loss: sum over valid positions / (num_items_in_batch or count).
    denominator = normalizer(s_hidden.shape[0], num_items_in_batch, device=s_hidden.device, dtype=dtype)
    rows = LogitRows(s_hidden, student.head, dtype, vocab)  # hidden, weight and bias receive a gradient
    total, div, ce, extras = run(rows, teacher_chunk, flat_labels, plan, divergence, denominator)
    out = (
        (total, div if plan.need_divergence else None, ce if plan.need_ce else None) if return_components else (total,)
    )
    out = (*out, extras) if return_extras else out
    return out if len(out) > 1 else total


# ---- checks: each names the argument that does not fit ------------------------------------------------------------


def _check(student: StudentHidden, teacher, labels, objective: Objective, chunk_size, vocab_size) -> int:
    """Raise a ValueError naming the offending argument; return the vocabulary the loss runs over."""
    if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    s_vocab = check_head("student", student.hidden, student.head)
    t_name, t_vocab = check_teacher(teacher, student.hidden, objective)
    t_vocab = s_vocab if t_vocab is None else t_vocab  # top-k ids index the student's vocabulary
    if vocab_size is not None:
        most = min(s_vocab, t_vocab)
        if not (isinstance(vocab_size, int) and 0 < vocab_size <= most):
            raise ValueError(f"vocab_size must be an int in [1, {most}] (the smaller vocabulary), got {vocab_size!r}")
        s_vocab = t_vocab = vocab_size
    if s_vocab != t_vocab:
        raise ValueError(
            f"student_weight has {s_vocab} rows and {t_name} {t_vocab}: the logits would differ in shape; pass "
            f"vocab_size={min(s_vocab, t_vocab)} to distill over the shared prefix of padded vocabularies"
        )
    check_labels(labels, student.hidden.shape[:-1], objective.alpha, "student_hidden without its hidden dim")
    if labels is None and objective.reads_targets():
        raise ValueError("loss_type: reverse_kl_sampled reads the token sampled at each position: pass labels")
    return s_vocab


def check_head(side: str, hidden: torch.Tensor, head: LMHeadSpec) -> int:
    """Raise a ValueError naming the ``{side}_...`` argument unless ``hidden [..., H]`` fits ``head``; return its
    number of rows (the vocabulary of its logits)."""
    for knob in ("softcap", "logit_scale"):
        value = getattr(head, knob)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{side}_{knob} must be a finite number > 0 or None, got {value!r}")
    if hidden.dim() < 2 or not hidden.is_floating_point():
        raise ValueError(f"{side}_hidden {tuple(hidden.shape)} must be floating point [..., hidden_size]")
    weight, bias = head.weight, head.bias
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{side}_weight {tuple(weight.shape)} must be [vocab, {hidden.shape[-1]}] to match {side}_hidden "
            f"{tuple(hidden.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{side}_bias {tuple(bias.shape)} must be [{weight.shape[0]}] to match {side}_weight")
    return weight.shape[0]


def _same_positions(student_hidden: torch.Tensor, name: str, tensor: torch.Tensor) -> None:
    if tensor.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and {name} {tuple(tensor.shape)} must have the same "
            "positions (all dims but the last)"
        )


def check_teacher(teacher, student_hidden: torch.Tensor, objective: Objective) -> tuple[str, int | None]:
    """Raise a ValueError naming what does not fit the student; return ``(name, rows)``: what to call the teacher's
    vocabulary in a message, and its size (``None`` for top-k rows, whose ids index the student's vocabulary)."""
    if isinstance(teacher, TeacherHidden):
        rows = check_head("teacher", teacher.hidden, teacher.head)
        _same_positions(student_hidden, "teacher_hidden", teacher.hidden)
        return "teacher_weight", rows
    if isinstance(teacher, TeacherLogits):
        if teacher.logits.dim() < 2 or not teacher.logits.is_floating_point():
            raise ValueError(f"teacher_logits {tuple(teacher.logits.shape)} must be floating point [..., vocab]")
        _same_positions(student_hidden, "teacher_logits", teacher.logits)
        return "teacher_logits", teacher.logits.shape[-1]
    if hasattr(teacher, "check_against"):  # a signal of its own kind checks itself
        return teacher.check_against(student_hidden, objective)
    if isinstance(teacher, TeacherTopK):
        sparse_weights(objective.weights)  # refuses mse: the cache holds no raw logits
        check_cache_shapes(student_hidden.shape[:-1], teacher.topk_ids, teacher.topk_logprobs, teacher.tail_logprob)
        return "topk_ids", None
    raise TypeError(f"teacher: expected TeacherHidden, TeacherLogits or TeacherTopK, got {type(teacher).__name__}")


# ---- divergences: one chunk's (divergence sum, CE sum, d(alpha-mix)/d(student logits)) ------------------------------


def _autograd_divergence(
    student, teacher: ChunkTeacher | None, labels, plan: ChunkPlan, want_grad: bool, _scratch: Scratch | None = None
):
    """Any objective: ``objective.divergence`` on the finished student logits (or their top-k buckets) and the CE,
    the gradient by autograd.

    Args: ``student`` ``[chunk, V]`` raw logits (before logit scale and softcap), ``teacher`` the chunk's teacher side
    (``None`` when the divergence is not needed), ``labels`` ``[chunk]`` or ``None``.
    Returns: ``(divergence_sum, ce_sum, d_student)``: detached 0-dim sums (``None`` where not computed) and
    ``[chunk, V]`` (``None`` unless ``want_grad``).
    """
    objective = plan.objective
    student = student.detach().requires_grad_(want_grad)  # a leaf of its own over the chunk's buffer
    with torch.set_grad_enabled(want_grad):
        logits = finish_logits(student, plan.student_logit_scale, plan.student_softcap)
        divergence = ce = None
        if plan.need_divergence:
            with torch.set_grad_enabled(want_grad and objective.alpha > 0):
                if teacher.ids is not None and objective.reads_targets():  # the sampled token's own bucket
                    log_p = torch.log_softmax(logits, dim=-1)
                    student_side, values, targets = sampled_buckets(log_p, teacher.ids, teacher.values, labels)
                else:
                    student_side, values, targets = teacher.student_side(logits), teacher.values, labels
                divergence = objective.divergence(student_side, values, targets).sum()
        if plan.need_ce:
            with torch.set_grad_enabled(want_grad and objective.alpha < 1):
                ce = F.cross_entropy(logits, labels, reduction="sum")  # at T = 1, as in distillation_loss
        grad = torch.autograd.grad(objective.combine(divergence, ce), student)[0] if want_grad else None
    return (None if divergence is None else divergence.detach()), (None if ce is None else ce.detach()), grad


def _with_teacher_sums(divergence):
    """``divergence`` with the teacher side's own sums (:attr:`ChunkTeacher.sums`) added to its extras, computed
    first: the divergence may overwrite the student's and the teacher's buffers."""

    def chunk(student, teacher, labels, plan: ChunkPlan, want_grad: bool, scratch: Scratch):
        sums = {}
        if teacher is not None and getattr(teacher, "sums", None) is not None:
            sums = teacher.sums(finish_logits(student, plan.student_logit_scale, plan.student_softcap), labels)
        div, ce, grad, *more = divergence(student, teacher, labels, plan, want_grad, scratch)
        return div, ce, grad, {**(more[0] if more else {}), **sums}

    return chunk


def _closed_form_applies(plan: ChunkPlan) -> bool:
    """Forward KL and/or CE on plain student logits against a dense teacher: the gradient has a closed form."""
    plain_student = plan.student_softcap is None and plan.student_logit_scale is None
    return plan.dense_teacher and set(plan.objective.weights) == {"forward_kl"} and plain_student


def _forward_kl_closed_form(
    student, teacher: ChunkTeacher | None, labels, plan: ChunkPlan, want_grad: bool, scratch: Scratch
):
    """:func:`_autograd_divergence` for ``w * T^2 * KL(p_t || p_s)`` (+ CE) with its gradient written out, computed in
    the chunk's buffers (``student`` and ``teacher.values`` are overwritten) and at most two more of the call's.

    d/ds [w * c * KL(softmax(t/T) || softmax(s/T))] = w * c / T * (softmax(s/T) - softmax(t/T)), c = T^2 or 1;
    d/ds CE(s, y) = softmax(s) - onehot(y). The values use sum_v p_t = 1 and the log-sum-exp read off a softmax,
    lse(x) = max x - log(top), top = max_v softmax(x) = exp(max x - lse(x)): per row, with s and t already over T,
    KL = sum_v p_t (t - s) - (max t - max s) - log(top_s / top_t) (the two lse, ~log V each, never subtracted in
    float32) and CE = (max s - s_y) - log(top) at T = 1. So: one softmax per model (two for the student when T != 1
    and the CE is needed), one pass for the cross term, no log-probabilities stored. Tests hold it to the autograd
    path it replaces.
    """
    objective = plan.objective
    temperature, alpha = objective.temperature, objective.alpha
    scale = objective.weights["forward_kl"] * objective.temperature_scale
    rows = student.shape[0]
    divergence = ce = p_ce = p_s = None
    s_max = student.amax(-1)
    if plan.need_ce:
        s_y = student.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # the label's logit, before any division by T
        if temperature != 1 or not plan.need_divergence:  # the CE's softmax at T = 1 is not the KL's
            p_ce = torch.softmax(student, -1, out=scratch("student_softmax", rows))
            ce = (s_max - s_y - p_ce.amax(-1).log_()).sum()
    if plan.need_divergence:
        t = teacher.values
        if temperature != 1:
            student.div_(temperature)
            t.div_(temperature)
            s_max = s_max / temperature  # x -> x / T is monotone: the max of s / T is (max s) / T, bit for bit
        t_max = t.amax(-1)
        p_t = torch.softmax(t, -1, out=scratch("teacher_softmax", rows))
        # sum_v p_t (t - s) per row, in t's buffer: where the teacher rules an id out (t = -inf, p_t = 0) 0 * -inf is
        # nan and nansum counts 0, as distillation_loss does; a nan logit elsewhere still reaches the loss via max/top
        cross = t.sub_(student).mul_(p_t).nansum(-1)
        p_s = torch.softmax(student, -1, out=t)  # t's buffer is free again
        s_top = p_s.amax(-1)
        divergence = scale * (cross - (t_max - s_max) - (s_top / p_t.amax(-1)).log_()).sum()
        if plan.need_ce and p_ce is None:  # T = 1: one softmax of the student for both terms
            p_ce, ce = p_s, (s_max - s_y - s_top.log()).sum()
    if not want_grad:
        return divergence, ce, None
    # gradient = a * softmax(s/T) - a * p_t + c * (softmax(s) - onehot(y)), built in a buffer that holds a softmax
    a = alpha * scale / temperature if alpha > 0 else 0.0
    c = 1 - alpha if alpha < 1 else 0.0
    grad = None
    if a and p_s is p_ce:  # T = 1 with the CE: (a + c) * softmax(s) - a * p_t (a + c = 1 when w = 1)
        grad = (p_s if a + c == 1 else p_s.mul_(a + c)).sub_(p_t, alpha=a)
    elif a:
        grad = p_s.sub_(p_t) if a == 1 else p_s.sub_(p_t).mul_(a)
        if c:
            grad.add_(p_ce, alpha=c)
    elif c:
        grad = p_ce if c == 1 else p_ce.mul_(c)
    if grad is None:
        return divergence, ce, torch.zeros_like(student)
    if c:
        grad.scatter_add_(-1, labels.unsqueeze(-1), grad.new_full((rows, 1), -c))
    return divergence, ce, grad

"""The fused lm_head + distillation loss: the same value and gradients as :func:`hf_kd.losses.distillation_loss`
on full logits, computed chunk by chunk from the final hidden states so that no ``[N, V]`` tensor ever exists.

For each chunk of ``chunk_size`` valid positions the forward pass builds that chunk's logits (float32, float64 for
float64 inputs), evaluates the core objective on them with :func:`hf_kd.losses.per_position_divergence`, takes the
gradient of the chunk's sum w.r.t. the chunk's logits with ``torch.autograd.grad``, and folds it straight into
d(hidden) and d(lm_head weight). The backward pass only scales those stored gradients by the incoming gradient.
Peak extra memory is a few ``[chunk_size, V]`` buffers plus one float32 ``[V, H]`` gradient accumulator, whatever N.

:func:`lm_head_spec` reads the pieces (weight, bias, softcap, logit scale) off a Hugging Face causal LM, or says why
its head cannot be fused so that the caller falls back to full logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models import LMHeadSpec, as_projection_weight, finish_logits, lm_head_spec, project  # noqa: F401 (re-export)
from .losses import check_hyperparameters, normalize_loss_type, normalizer, per_position_divergence
from .sparse import check_cache_shapes, sparse_weights, student_bucket_log_probs, teacher_bucket_log_probs

def fused_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    chunk_size: int = 1024,
    loss_type: str | Mapping[str, float] = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    scale_by_temperature: bool = True,
    return_components: bool = False,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float | None = None,
    teacher_logit_scale: float | None = None,
    vocab_size: int | None = None,
):
    """:func:`hf_kd.losses.distillation_loss` on logits built from hidden states, one chunk of rows at a time.

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
        The other arguments are :func:`~hf_kd.losses.distillation_loss`'s.

    Returns:
        What ``distillation_loss`` returns on the full logits: a scalar (float32, float64 for float64 inputs), or
        ``(total, divergence, ce)`` with ``return_components``. Chunk logits are computed in float32 from low-precision
        inputs, so bfloat16 hidden states and weights give the float32 loss of those bfloat16 values.
    """
    weights = normalize_loss_type(loss_type)
    check_hyperparameters(temperature=temperature, alpha=alpha, jsd_beta=jsd_beta, skew_lambda=skew_lambda)
    vocab = _check_inputs(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels, alpha,
        vocab_size, chunk_size,
        {"student_softcap": student_softcap, "teacher_softcap": teacher_softcap,
         "student_logit_scale": student_logit_scale, "teacher_logit_scale": teacher_logit_scale},
    )  # fmt: skip

    # The dtype distillation_loss would compute in on logits made by this matmul.
    dtype = torch.promote_types(torch.promote_types(student_hidden.dtype, student_weight.dtype), torch.float32)
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    flat_labels = None
    if labels is not None:
        flat_labels = labels.reshape(-1)
        valid = flat_labels != ignore_index
        # Drop masked rows first: prompts and padding never reach a matmul, an all-masked chunk does not exist.
        s_hidden, t_hidden, flat_labels = s_hidden[valid], t_hidden[valid], flat_labels[valid]
    count = s_hidden.shape[0]

    need_divergence = alpha > 0 or return_components  # alpha = 0: the divergence is only computed to be logged
    need_ce = labels is not None and (alpha < 1 or return_components)
    if need_ce and ((flat_labels < 0) | (flat_labels >= vocab)).any():
        raise ValueError(f"labels: ids must be in [0, {vocab}) or equal to ignore_index={ignore_index}")

    plan = _Plan(
        weights=weights, temperature=temperature, alpha=alpha, jsd_beta=jsd_beta, skew_lambda=skew_lambda,
        scale_by_temperature=scale_by_temperature, vocab=vocab, chunk_size=chunk_size, dtype=dtype,
        need_divergence=need_divergence, need_ce=need_ce,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap,
        student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
    )  # fmt: skip
    # Normalization exactly as in distillation_loss: sum over valid positions / (num_items_in_batch or count).
    denominator = normalizer(count, num_items_in_batch, device=s_hidden.device, dtype=dtype)

    teacher = (t_hidden, teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach())
    return _run((s_hidden, student_weight, student_bias), teacher, flat_labels, plan, denominator, return_components)


def _run(student, teacher, flat_labels, plan: _Plan, denominator, return_components: bool):
    """The chunked loss of prepared inputs: ``student`` (hidden, weight, bias), ``teacher`` (hidden, weight, bias, or
    for a cache (ids, log-probs, tail), None, None) -> what the public functions return."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in student):
        # total = (alpha * sum_div + (1 - alpha) * sum_ce) / denominator = alpha * div + (1 - alpha) * ce
        total, divergence, ce = _FusedDistillation.apply(*student, *teacher, flat_labels, plan, denominator)
    else:  # evaluation: values only, no per-chunk gradients
        sums, _ = _chunked_loss(*student, *teacher, flat_labels, plan, (False, False, False))
        total, divergence, ce = (value / denominator for value in sums)
    if return_components:
        return total, divergence if plan.need_divergence else None, ce if plan.need_ce else None
    return total


def fused_sparse_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    chunk_size: int = 1024,
    loss_type: str | Mapping[str, float] = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    scale_by_temperature: bool = True,
    return_components: bool = False,
    student_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    student_logit_scale: float | None = None,
    vocab_size: int | None = None,
):
    """:func:`hf_kd.sparse.sparse_distillation_loss` on student logits built chunk by chunk from hidden states.

    The student side is :func:`fused_distillation_loss`'s (``student_hidden`` ``[..., H]``, ``student_weight``
    ``[V, H]``, bias, softcap, logit scale, ``vocab_size`` cut); the teacher is a cache's rows: ``topk_ids`` and
    ``topk_logprobs`` ``[..., k]``, ``tail_logprob`` ``[...]`` (see :mod:`hf_kd.sparse` for the tail bucket). Same value
    and gradients as the sparse loss on full logits, without ever holding ``[N, V]``.
    """
    weights = sparse_weights(loss_type)
    check_hyperparameters(temperature=temperature, alpha=alpha, jsd_beta=jsd_beta, skew_lambda=skew_lambda)
    k = topk_ids.shape[-1]
    check_cache_shapes(student_hidden.shape[:-1], topk_ids, topk_logprobs, tail_logprob)
    # the student against itself checks shapes, labels, alpha, chunk_size and vocab_size like the dense loss
    vocab = _check_inputs(
        student_hidden, student_weight, student_bias, student_hidden, student_weight, student_bias, labels, alpha,
        vocab_size, chunk_size, {"student_softcap": student_softcap, "student_logit_scale": student_logit_scale},
    )  # fmt: skip
    dtype = torch.promote_types(torch.promote_types(student_hidden.dtype, student_weight.dtype), torch.float32)
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher = (topk_ids.reshape(-1, k).long(), topk_logprobs.detach().reshape(-1, k), tail_logprob.detach().reshape(-1))
    flat_labels = None
    if labels is not None:
        flat_labels = labels.reshape(-1)
        valid = flat_labels != ignore_index
        # Drop masked rows first: their cache entries are fillers and they never reach a matmul.
        s_hidden, flat_labels, teacher = s_hidden[valid], flat_labels[valid], tuple(t[valid] for t in teacher)
    if ((teacher[0] < 0) | (teacher[0] >= vocab)).any():
        raise ValueError(f"topk_ids: ids must be in [0, {vocab}), the student's vocabulary")
    need_divergence = alpha > 0 or return_components
    need_ce = labels is not None and (alpha < 1 or return_components)
    if need_ce and ((flat_labels < 0) | (flat_labels >= vocab)).any():
        raise ValueError(f"labels: ids must be in [0, {vocab}) or equal to ignore_index={ignore_index}")
    plan = _Plan(
        weights=weights, temperature=temperature, alpha=alpha, jsd_beta=jsd_beta, skew_lambda=skew_lambda,
        scale_by_temperature=scale_by_temperature, vocab=vocab, chunk_size=chunk_size, dtype=dtype,
        need_divergence=need_divergence, need_ce=need_ce, student_softcap=student_softcap, teacher_softcap=None,
        student_logit_scale=student_logit_scale, teacher_logit_scale=None, sparse=True,
    )  # fmt: skip
    denominator = normalizer(s_hidden.shape[0], num_items_in_batch, device=s_hidden.device, dtype=dtype)
    return _run((s_hidden, student_weight, student_bias), (teacher, None, None), flat_labels, plan, denominator,
                return_components)  # fmt: skip


# ---- validation ---------------------------------------------------------------------------------------------------


def _check_inputs(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, alpha, vocab_size, chunk_size, knobs):
    """Raise a ValueError naming the offending argument; return the vocabulary the loss runs over."""
    if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    for name, value in knobs.items():
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0 or None, got {value!r}")
    for name, tensor in (("student_hidden", s_hidden), ("teacher_hidden", t_hidden)):
        if tensor.dim() < 2 or not tensor.is_floating_point():
            raise ValueError(f"{name} {tuple(tensor.shape)} must be floating point [..., hidden_size]")
    if s_hidden.shape[:-1] != t_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(s_hidden.shape)} and teacher_hidden {tuple(t_hidden.shape)} must have the same "
            "positions (all dims but the last)"
        )
    sides = (("student", s_hidden, s_weight, s_bias), ("teacher", t_hidden, t_weight, t_bias))
    for side, hidden, weight, bias in sides:
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"{side}_weight {tuple(weight.shape)} must be [vocab, {hidden.shape[-1]}] to match {side}_hidden "
                f"{tuple(hidden.shape)}"
            )
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(f"{side}_bias {tuple(bias.shape)} must be [{weight.shape[0]}] to match {side}_weight")
    s_vocab, t_vocab = s_weight.shape[0], t_weight.shape[0]
    if vocab_size is not None:
        if not (isinstance(vocab_size, int) and 0 < vocab_size <= min(s_vocab, t_vocab)):
            raise ValueError(
                f"vocab_size must be an int in [1, {min(s_vocab, t_vocab)}] (the smaller lm_head), got {vocab_size!r}"
            )
        s_vocab = t_vocab = vocab_size
    if s_vocab != t_vocab:
        raise ValueError(
            f"student_weight has {s_vocab} rows and teacher_weight {t_vocab}: the logits would differ in shape; pass "
            f"vocab_size={min(s_vocab, t_vocab)} to distill over the shared prefix of padded vocabularies"
        )
    if labels is None:
        if alpha != 1:
            raise ValueError(f"alpha={alpha} needs labels for the cross-entropy term; pass labels or set alpha=1")
    elif labels.shape != s_hidden.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match student_hidden without its hidden dim "
            f"{tuple(s_hidden.shape[:-1])}"
        )
    return s_vocab


# ---- the chunked computation --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Everything about one call that is not a tensor."""

    weights: dict[str, float]
    temperature: float
    alpha: float
    jsd_beta: float
    skew_lambda: float
    scale_by_temperature: bool
    vocab: int
    chunk_size: int
    dtype: torch.dtype
    need_divergence: bool
    need_ce: bool
    student_softcap: float | None
    teacher_softcap: float | None
    student_logit_scale: float | None
    teacher_logit_scale: float | None
    sparse: bool = False  # the teacher is cached top-k rows (ids, log-probs, tail), not hidden states


class _FusedDistillation(torch.autograd.Function):
    """Forward computes the normalized loss and its gradients chunk by chunk; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, plan, denominator):
        wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], s_bias is not None and ctx.needs_input_grad[2])
        sums, grads = _chunked_loss(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, plan, wanted)
        # Divide by the denominator in float32 before the cast to a bf16 parameter dtype: the incoming gradient is
        # then 1 (or a small integer) and the backward multiplication is exact.
        likes = (s_hidden, s_weight, s_bias)
        grads = [None if g is None else g.div_(denominator).to(like.dtype) for g, like in zip(grads, likes)]
        ctx.save_for_backward(*grads)
        total, divergence, ce = (value / denominator for value in sums)
        ctx.mark_non_differentiable(divergence, ce)  # logged components are detached, as in distillation_loss
        return total, divergence, ce

    @staticmethod
    def backward(ctx, grad_total, _grad_divergence, _grad_ce):
        # bf16 * float32 0-dim: computed in float32, rounded once
        grads = tuple(None if g is None else g * grad_total for g in ctx.saved_tensors)
        return (*grads, None, None, None, None, None, None)


def _chunked_loss(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, plan: _Plan, wanted):
    """Sum the objective, divergence and CE over chunks of rows.

    Returns ``((objective_sum, divergence_sum, ce_sum), (d_hidden, d_weight, d_bias))``: the sums are 0-dim tensors
    in ``plan.dtype`` (0 for a term not computed) and the gradients those of ``objective_sum`` in ``plan.dtype``
    (``None`` where not ``wanted``).
    """
    want_hidden, want_weight, want_bias = wanted
    want_any = any(wanted)
    dtype, vocab = plan.dtype, plan.vocab
    device = s_hidden.device
    with torch.autocast(device.type, enabled=False):  # the Trainer's bf16 autocast must not touch the logits
        # Cast each weight once per call (rows past vocab are never needed: logits are cut to the shared prefix).
        s_w = s_weight.detach()[:vocab].to(dtype)
        s_b = None if s_bias is None else s_bias.detach()[:vocab].to(dtype)
        t_w = as_projection_weight(t_weight[:vocab], dtype) if plan.need_divergence and not plan.sparse else None
        t_b = None if t_bias is None else t_bias[:vocab].to(dtype)

        sums = {name: torch.zeros((), dtype=dtype, device=device) for name in ("objective", "divergence", "ce")}
        d_hidden = torch.empty(s_hidden.shape, dtype=dtype, device=device) if want_hidden else None
        # d(weight) accumulates in float32 over chunks; rows past vocab stay 0 (those logits are cut away).
        d_weight = torch.zeros(s_weight.shape, dtype=dtype, device=device) if want_weight else None
        d_bias = torch.zeros(s_bias.shape, dtype=dtype, device=device) if want_bias else None

        for start in range(0, s_hidden.shape[0], plan.chunk_size):
            rows = slice(start, start + plan.chunk_size)
            hidden = s_hidden[rows].detach().to(dtype)
            student = project(hidden, s_w, s_b, dtype)  # [chunk, vocab] float32, straight from the matmul
            teacher = None
            if plan.need_divergence and plan.sparse:  # cached (ids, log-probs, tail) of these rows -> k + 1 buckets
                ids, top, tail = (t[rows] for t in t_hidden)
                teacher = (ids, teacher_bucket_log_probs(top.to(dtype), tail.to(dtype)))
            elif plan.need_divergence:
                teacher = project(t_hidden[rows], t_w, t_b, dtype)
                teacher = finish_logits(teacher, plan.teacher_logit_scale, plan.teacher_softcap)
            chunk_labels = None if labels is None else labels[rows]
            d_logits = _chunk_loss(student, teacher, chunk_labels, plan, sums, want_any)
            if d_logits is None:
                continue
            if want_hidden:
                torch.mm(d_logits, s_w, out=d_hidden[rows])
            if want_weight:
                d_weight[:vocab].addmm_(d_logits.T, hidden)
            if want_bias:
                d_bias[:vocab] += d_logits.sum(0)
    return (sums["objective"], sums["divergence"], sums["ce"]), (d_hidden, d_weight, d_bias)


def _chunk_loss(student, teacher, labels, plan: _Plan, sums: dict, want_grad: bool):
    """Add one chunk's sums to ``sums``; return d(objective)/d(raw student logits) ``[chunk, vocab]`` if wanted."""
    if _closed_form_applies(plan):
        return _forward_kl_closed_form(student, teacher, labels, plan, sums, want_grad)
    student.requires_grad_(want_grad)
    with torch.set_grad_enabled(want_grad):
        logits = finish_logits(student, plan.student_logit_scale, plan.student_softcap)
        divergence = ce = None
        if plan.need_divergence:
            with torch.set_grad_enabled(want_grad and plan.alpha > 0):
                student_in = logits
                if plan.sparse:  # the student's log-probs collapsed onto the teacher's top-k + rest buckets
                    ids, teacher = teacher
                    student_in = student_bucket_log_probs(torch.log_softmax(logits, dim=-1), ids)
                divergence = per_position_divergence(
                    student_in,
                    teacher,
                    plan.weights,
                    temperature=plan.temperature,
                    jsd_beta=plan.jsd_beta,
                    skew_lambda=plan.skew_lambda,
                    scale_by_temperature=plan.scale_by_temperature,
                ).sum()
        if plan.need_ce:
            with torch.set_grad_enabled(want_grad and plan.alpha < 1):
                ce = F.cross_entropy(logits, labels, reduction="sum")  # at T = 1, as in distillation_loss
        if plan.alpha == 1:
            objective = divergence
        elif plan.alpha == 0:
            objective = ce
        else:
            objective = plan.alpha * divergence + (1 - plan.alpha) * ce
    for name, value in (("objective", objective), ("divergence", divergence), ("ce", ce)):
        if value is not None:
            sums[name] += value.detach()
    return torch.autograd.grad(objective, student)[0] if want_grad else None


def _closed_form_applies(plan: _Plan) -> bool:
    """Forward KL and/or CE on plain student logits: the gradient has a closed form, no autograd needed."""
    return (not plan.sparse and set(plan.weights) == {"forward_kl"} and plan.student_softcap is None
            and plan.student_logit_scale is None)  # fmt: skip


def _forward_kl_closed_form(student, teacher, labels, plan: _Plan, sums: dict, want_grad: bool):
    """``_chunk_loss`` for ``w * T^2 * KL(p_t || p_s)`` (+ CE) with its gradient written out (~2.5x faster on CPU):

    d/ds [w * c * KL(softmax(t/T) || softmax(s/T))] = w * c / T * (softmax(s/T) - softmax(t/T)), c = T^2 or 1;
    d/ds CE(s, y) = softmax(s) - onehot(y). Tests hold it to the autograd path it replaces.
    """
    temperature, alpha = plan.temperature, plan.alpha
    scale = plan.weights["forward_kl"] * (temperature**2 if plan.scale_by_temperature else 1.0)
    want_div_grad, want_ce_grad = want_grad and alpha > 0, want_grad and alpha < 1
    divergence = ce = grad = None
    log_p1 = None  # log_softmax(student) at T = 1, shared by the KL (when T = 1) and the CE
    if plan.need_divergence:
        log_ps = torch.log_softmax(student if temperature == 1 else student / temperature, dim=-1)
        log_pt = torch.log_softmax(teacher if temperature == 1 else teacher / temperature, dim=-1)
        # a teacher logit of -inf: p_t = 0 there, and a finite floor makes p_t * (log_pt - log_ps) exactly 0, not nan
        log_pt.clamp_min_(torch.finfo(log_pt.dtype).min)
        p_t = log_pt.exp()
        divergence = scale * (p_t * (log_pt - log_ps)).sum()  # as a difference: no cancellation when KL is small
        if temperature == 1:
            log_p1 = log_ps
    if plan.need_ce:
        if log_p1 is None:
            log_p1 = torch.log_softmax(student, dim=-1)
        ce = -log_p1.gather(-1, labels.unsqueeze(-1)).sum()
    # gradient = a * softmax(s/T) - b * p_t + c * (softmax(s) - onehot(y)), built in place in one [chunk, V] buffer
    a, b = (alpha * scale / temperature, alpha * scale / temperature) if want_div_grad else (0.0, 0.0)
    c = (1 - alpha) if want_ce_grad else 0.0
    if want_div_grad and temperature == 1:  # softmax(s/T) is softmax(s): one buffer for both terms
        grad = log_ps.exp_().mul_(a + c)
        grad.sub_(p_t.mul_(b))
    else:
        if want_div_grad:
            grad = log_ps.exp_().mul_(a).sub_(p_t.mul_(b))
        if want_ce_grad:
            g_ce = log_p1.exp_().mul_(c)
            grad = g_ce if grad is None else grad.add_(g_ce)
    if want_ce_grad:
        grad.scatter_add_(-1, labels.unsqueeze(-1), grad.new_full((labels.shape[0], 1), -c))
    if alpha == 1:
        objective = divergence
    elif alpha == 0:
        objective = ce
    else:
        objective = alpha * divergence + (1 - alpha) * ce
    for name, value in (("objective", objective), ("divergence", divergence), ("ce", ce)):
        if value is not None:
            sums[name] += value.detach()
    if not want_grad:
        return None
    return grad if grad is not None else torch.zeros_like(student)

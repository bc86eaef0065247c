"""The chunk machinery behind :mod:`hf_kd.objective.fused`: teacher sources, the chunk loop and the autograd Function.

For each chunk of ``chunk_size`` valid positions the loop builds that chunk's student logits ``[chunk, V]`` (float32,
float64 for float64 inputs) from the final hidden states, asks the teacher's *source* for the chunk's teacher side,
hands both to a *divergence* (a function of :mod:`hf_kd.objective.fused` that returns the chunk's divergence and CE sums and the
gradient of their alpha-mix w.r.t. the student logits), and folds that gradient straight into d(hidden), d(weight)
and d(bias). The backward pass only scales those stored gradients by the incoming gradient. Peak extra memory is a
few ``[chunk_size, V]`` buffers (:class:`Scratch`: allocated once per call, rewritten by every chunk) plus one float32
``[V, H]`` gradient accumulator, whatever N.

On CUDA a bf16/fp16 student head stays in its dtype: the logits, d(hidden) and d(weight) are tensor-core matmuls with
float32 output (``out_dtype``), and no float32 copy of the weight is made. Elsewhere (CPU, float32 or float64 weights)
the weight is cast once per call to the chunk dtype.

A source is built once per call from one of the signals of :mod:`hf_kd.objective.terms`, and turns a slice of the kept rows
into a :class:`ChunkTeacher`:

* :class:`~hf_kd.objective.terms.TeacherHidden` -- the chunk's hidden states through the teacher's head (weight cast once);
* :class:`~hf_kd.objective.terms.TeacherLogits` -- the chunk's rows of the full logits (a ``teacher_forward`` override that
  returns plain logits, with a fused student);
* :class:`~hf_kd.objective.terms.TeacherTopK` -- the chunk's cached rows as ``k + 1`` bucket log-probs (:mod:`hf_kd.objective.sparse`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hf_kd.objective.losses import Objective
from hf_kd.models.heads import LMHeadSpec, as_projection_weight, finish_logits, project
from hf_kd.objective.sparse import check_cache_shapes, sparse_weights, student_bucket_log_probs, teacher_bucket_log_probs
from hf_kd.objective.signals import TeacherHidden, TeacherLogits, TeacherTopK

CHUNK_SIZE = 256  # default rows per chunk: 128 MB per float32 [256, 128k] buffer; on CPU no slower than 1024


@dataclass(frozen=True)
class ChunkPlan:
    """Everything about one call that is not a tensor: the objective and how the chunks are computed."""

    objective: Objective
    vocab: int  # logits are cut to their first `vocab` columns (the shared prefix of padded vocabularies)
    chunk_size: int
    dtype: torch.dtype  # of the chunk logits and every sum: float32, float64 for float64 inputs
    need_divergence: bool  # alpha > 0, or logged
    need_ce: bool  # labels given, and alpha < 1 or logged
    student_softcap: float | None
    student_logit_scale: float | None
    dense_teacher: bool  # the teacher side is full logits (hidden states or logits), not top-k buckets


@dataclass(frozen=True)
class ChunkTeacher:
    """The teacher side of one chunk: full logits ``[chunk, V]``, or ``k + 1`` bucket log-probs over ``ids``."""

    # [chunk, V] logits in a Scratch buffer (a divergence may overwrite them), or [chunk, k + 1] bucket log-probs;
    # in the plan's dtype
    values: torch.Tensor
    ids: torch.Tensor | None = None  # [chunk, k] the teacher's top-k ids; None: dense logits

    def student_side(self, logits: torch.Tensor) -> torch.Tensor:
        """What ``values`` is compared with: the student's ``[chunk, V]`` logits themselves, or (top-k) its
        log-probs collapsed onto the same ``k + 1`` buckets."""
        if self.ids is None:
            return logits
        return student_bucket_log_probs(torch.log_softmax(logits, dim=-1), self.ids)


class Scratch:
    """The ``[rows, V]`` buffers of one call, by name, each allocated on first use and handed to every chunk (its first
    rows for a ragged last chunk). Filling a fresh 128 MB buffer costs more on CPU than the pass that writes it."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (rows, vocab), dtype, device
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, rows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Buffer ``name`` cut to its first ``rows`` rows (contiguous), in ``dtype`` (default: the chunk dtype)."""
        if name not in self.buffers:
            self.buffers[name] = torch.empty(self.shape, dtype=dtype or self.dtype, device=self.device)
        return self.buffers[name][:rows]


# ---- teacher sources: check a signal, then slices of kept rows -> ChunkTeacher ------------------------------------


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
    if isinstance(teacher, TeacherTopK):
        sparse_weights(objective.weights)  # refuses mse: the cache holds no raw logits
        check_cache_shapes(student_hidden.shape[:-1], teacher.topk_ids, teacher.topk_logprobs, teacher.tail_logprob)
        return "topk_ids", None
    raise TypeError(f"teacher: expected TeacherHidden, TeacherLogits or TeacherTopK, got {type(teacher).__name__}")


def kept_rows(tensor: torch.Tensor, position_dims: int, keep: torch.Tensor | None) -> torch.Tensor:
    """``[*positions, ...]`` -> ``[rows, ...]``: flattened over the ``position_dims`` leading dims, the rows where
    ``keep`` ``[N]`` is False dropped (``None``: all kept)."""
    flat = tensor.flatten(0, position_dims - 1)
    return flat if keep is None else flat[keep]


def _hidden_source(teacher: TeacherHidden, keep, plan: ChunkPlan) -> Callable[[slice, Scratch], ChunkTeacher]:
    head, dtype = teacher.head, plan.dtype
    hidden = kept_rows(teacher.hidden.detach(), teacher.hidden.dim() - 1, keep)
    # Cast the weight once per call, not per chunk (rows past vocab are never needed: logits are cut to the prefix).
    weight = as_projection_weight(head.weight.detach()[: plan.vocab], dtype)
    bias = None if head.bias is None else head.bias.detach()[: plan.vocab].to(dtype)

    def chunk(rows: slice, scratch: Scratch) -> ChunkTeacher:
        chunk_hidden = hidden[rows]
        logits = project(chunk_hidden, weight, bias, dtype, out=scratch("teacher", chunk_hidden.shape[0]))
        return ChunkTeacher(finish_logits(logits, head.logit_scale, head.softcap, in_place=True))

    return chunk


def _logits_source(teacher: TeacherLogits, keep, plan: ChunkPlan) -> Callable[[slice, Scratch], ChunkTeacher]:
    logits = teacher.logits.detach().flatten(0, teacher.logits.dim() - 2)
    # Gather the kept rows chunk by chunk: a mask applied up front would copy the whole [N, V] tensor once more.
    index = None if keep is None else keep.nonzero().squeeze(1)

    def chunk(rows: slice, scratch: Scratch) -> ChunkTeacher:
        values = logits[rows] if index is None else logits.index_select(0, index[rows])
        # copied into the buffer, never a view: a divergence may overwrite its teacher's values
        return ChunkTeacher(scratch("teacher", values.shape[0]).copy_(values[:, : plan.vocab]))

    return chunk


def _topk_source(teacher: TeacherTopK, keep, plan: ChunkPlan) -> Callable[[slice, Scratch], ChunkTeacher]:
    dims = teacher.tail_logprob.dim()
    ids = kept_rows(teacher.topk_ids, dims, keep).long()  # masked rows' entries are fillers: dropped before the check
    top = kept_rows(teacher.topk_logprobs.detach(), dims, keep)
    tail = kept_rows(teacher.tail_logprob.detach(), dims, keep)
    if ((ids < 0) | (ids >= plan.vocab)).any():
        raise ValueError(f"topk_ids: ids must be in [0, {plan.vocab}), the student's vocabulary")

    def chunk(rows: slice, _scratch: Scratch) -> ChunkTeacher:
        return ChunkTeacher(teacher_bucket_log_probs(top[rows].to(plan.dtype), tail[rows].to(plan.dtype)), ids[rows])

    return chunk


SOURCES = {TeacherHidden: _hidden_source, TeacherLogits: _logits_source, TeacherTopK: _topk_source}

# A divergence: (student logits [chunk, V], ChunkTeacher or None, labels [chunk] or None, plan, want_grad, scratch)
# -> (divergence sum or None, CE sum or None, d(alpha-mix)/d(student logits) [chunk, V] or None). The student logits
# and dense teacher values are Scratch buffers that it may overwrite (the gradient may be one of them).
Divergence = Callable[..., tuple]


# ---- the chunked computation --------------------------------------------------------------------------------------


def run(student, teacher_chunk, labels, plan: ChunkPlan, divergence: Divergence, denominator, return_components):
    """The normalized loss of prepared inputs -> what the public fused losses return.

    ``student`` is ``(hidden [N, H], weight [V_s, H], bias [V_s] or None)`` with masked rows already dropped,
    ``teacher_chunk`` a source's ``(rows, scratch) -> ChunkTeacher`` (``None`` when the divergence is not needed),
    ``labels`` ``[N]`` or ``None``.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in student):
        total, div, ce = _FusedObjective.apply(*student, teacher_chunk, labels, plan, divergence, denominator)
    else:  # evaluation: values only, no per-chunk gradients
        sums, _ = _chunk_sums(*student, teacher_chunk, labels, plan, divergence, (False, False, False))
        total, div, ce = _normalized(sums, plan, denominator)
    if return_components:
        return total, div if plan.need_divergence else None, ce if plan.need_ce else None
    return total


def _normalized(sums, plan: ChunkPlan, denominator):
    """``(divergence_sum, ce_sum)`` -> ``(total, divergence, ce)``, each divided once by the denominator."""
    div_sum, ce_sum = sums
    # combine() of the sums, then one division: a tensor of its own even where alpha = 1 or 0 returns one term
    return plan.objective.combine(div_sum, ce_sum) / denominator, div_sum / denominator, ce_sum / denominator


class _FusedObjective(torch.autograd.Function):
    """Forward computes the normalized loss and its gradients chunk by chunk; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, teacher_chunk, labels, plan, divergence, denominator):
        wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], s_bias is not None and ctx.needs_input_grad[2])
        sums, grads = _chunk_sums(s_hidden, s_weight, s_bias, teacher_chunk, labels, plan, divergence, wanted)
        # Divide by the denominator in float32 before the cast to a bf16 parameter dtype: the incoming gradient is
        # then 1 (or a small integer) and the backward multiplication is exact.
        likes = (s_hidden, s_weight, s_bias)
        grads = [None if g is None else g.div_(denominator).to(like.dtype) for g, like in zip(grads, likes)]
        ctx.save_for_backward(*grads)
        total, div, ce = _normalized(sums, plan, denominator)
        ctx.mark_non_differentiable(div, ce)  # logged components are detached, as in distillation_loss
        return total, div, ce

    @staticmethod
    def backward(ctx, grad_total, _grad_divergence, _grad_ce):
        # bf16 * float32 0-dim: computed in float32, rounded once
        grads = tuple(None if g is None else g * grad_total for g in ctx.saved_tensors)
        return (*grads, None, None, None, None, None)


def _chunk_sums(s_hidden, s_weight, s_bias, teacher_chunk, labels, plan: ChunkPlan, divergence, wanted):
    """Sum the divergence and CE over chunks of rows.

    Returns ``((divergence_sum, ce_sum), (d_hidden, d_weight, d_bias))``: the sums are 0-dim tensors in ``plan.dtype``
    (0 for a term not computed), the gradients those of ``alpha * divergence_sum + (1 - alpha) * ce_sum`` in
    ``plan.dtype`` (``None`` where not ``wanted``).
    """
    want_hidden, want_weight, want_bias = wanted
    dtype, vocab, device = plan.dtype, plan.vocab, s_hidden.device
    with torch.autocast(device.type, enabled=False):  # the Trainer's bf16 autocast must not touch the logits
        # Once per call: a bf16/fp16 weight stays as it is where CUDA matmuls emit float32, else it is cast to dtype
        # (rows past vocab: their logits are cut away).
        s_w = as_projection_weight(s_weight.detach()[:vocab], dtype)
        s_b = None if s_bias is None else s_bias.detach()[:vocab].to(dtype)
        scratch = Scratch(min(plan.chunk_size, s_hidden.shape[0]), vocab, dtype, device)

        div_sum, ce_sum = (torch.zeros((), dtype=dtype, device=device) for _ in range(2))
        d_hidden = torch.empty(s_hidden.shape, dtype=dtype, device=device) if want_hidden else None
        # d(weight) accumulates in float32 over chunks; rows past vocab stay 0 (those logits are cut away).
        d_weight = torch.zeros(s_weight.shape, dtype=dtype, device=device) if want_weight else None
        d_bias = torch.zeros(s_bias.shape, dtype=dtype, device=device) if want_bias else None

        for start in range(0, s_hidden.shape[0], plan.chunk_size):
            rows = slice(start, start + plan.chunk_size)
            hidden = s_hidden[rows].detach()
            # [chunk, vocab] float32 straight from the matmul, into the call's buffer
            student = project(hidden, s_w, s_b, dtype, out=scratch("student", hidden.shape[0]))
            teacher = None if teacher_chunk is None else teacher_chunk(rows, scratch)
            chunk_div, chunk_ce, d_logits = divergence(
                student, teacher, None if labels is None else labels[rows], plan, any(wanted), scratch
            )
            if chunk_div is not None:
                div_sum += chunk_div
            if chunk_ce is not None:
                ce_sum += chunk_ce
            if d_logits is None:
                continue
            if want_bias:
                d_bias[:vocab] += d_logits.sum(0)
            d_rows = d_hidden[rows] if want_hidden else None
            d_w = d_weight[:vocab] if want_weight else None
            if s_w.dtype != dtype:
                _tensor_core_grads(d_logits, hidden, s_w, d_rows, d_w, scratch)
                continue
            hidden = hidden.to(dtype)
            if want_hidden:
                torch.mm(d_logits, s_w, out=d_rows)
            if want_weight:
                d_w.addmm_(d_logits.T, hidden)
    return (div_sum, ce_sum), (d_hidden, d_weight, d_bias)


def _tensor_core_grads(d_logits, hidden, weight, d_hidden, d_weight, scratch: Scratch) -> None:
    """``d_hidden = d_logits @ weight`` and ``d_weight += d_logits.T @ hidden`` for a bf16/fp16 ``weight`` on CUDA.

    ``d_logits`` ``[c, V]`` (float32) is rounded once to the weight's dtype; both matmuls run on tensor cores with
    float32 output. ``d_weight`` ``[V, H]`` (float32, ``None``: not wanted) takes the product straight from the matmul
    where torch can (``addmm(..., out_dtype=)`` on a float32 ``self``), else from a float32 matmul (older torch):
    never through a ``[V, H]`` temporary.
    """
    low = weight.dtype
    rounded = scratch("low_precision_grad", d_logits.shape[0], low).copy_(d_logits)
    if d_hidden is not None:
        torch.mm(rounded, weight, out_dtype=d_hidden.dtype, out=d_hidden)
    if d_weight is None:
        return
    if _addmm_accumulates(d_weight.device, low, d_weight.dtype):
        torch.addmm(d_weight, rounded.T, hidden.to(low), out_dtype=d_weight.dtype, out=d_weight)
    else:
        d_weight.addmm_(d_logits.T, hidden.to(d_weight.dtype))


@functools.cache
def _addmm_accumulates(device: torch.device, in_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(c, a, b, out_dtype=out_dtype, out=c)`` adds an ``in_dtype`` product into an ``out_dtype``
    ``c`` on ``device`` (CUDA, torch versions whose ``addmm.dtype`` takes a float32 ``self``)."""
    try:
        c = torch.ones(2, 2, device=device, dtype=out_dtype)
        probe = torch.ones(2, 2, device=device, dtype=in_dtype)
        return bool(torch.addmm(c, probe, probe, out_dtype=out_dtype, out=c).eq(3).all())
    except (RuntimeError, TypeError):
        return False

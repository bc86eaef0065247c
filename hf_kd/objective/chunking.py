"""The one chunk driver: the student's target rows a chunk at a time, each chunk's loss and its gradient at once.

:func:`run` is called with the student's rows (:class:`LogitRows`: final hidden states and the head that makes their
logits, or full logits themselves -- the identity head), a teacher *source* and a *divergence*. For each chunk of
``chunk_size`` rows it builds the chunk's student logits ``[chunk, V]`` (float32, float64 for float64 inputs), asks
the source for the chunk's teacher side, hands both to the divergence, which returns the chunk's divergence and CE
sums (and any extra sums it logs) and the gradient of their alpha-mix w.r.t. the student logits, and folds that
gradient straight into d(hidden), d(weight) and d(bias) (or d(logits)). Summing, the one division by the denominator
and the autograd Function whose backward only scales the stored gradients are the driver's too. Peak extra memory
is a few ``[chunk_size, V]`` buffers (:class:`Scratch`: allocated once per call, rewritten by every chunk) plus one
float32 ``[V, H]`` gradient accumulator, whatever N.

On CUDA a bf16/fp16 head stays in its dtype: the logits, d(hidden) and d(weight) are tensor-core matmuls with float32
output (``out_dtype``), and no float32 copy of the weight is made (:class:`LogitRows`, :func:`_low_precision_grads`).
Under the Trainer's autocast (``bf16=True`` over float32 master weights, CUDA or CPU) each head's weight is cast once
per call to the autocast dtype and takes the same path; on CPU, where no matmul emits float32, the logits come from
:func:`~hf_kd.models.heads.compensated_mm` (two bf16 matmuls: float32-exact products of the bf16 inputs), d(hidden)
from one bf16 matmul and d(weight) from bf16 matmuls added block by block into its float32 accumulator. The
softmax/divergence math is float32 either way. Elsewhere (outside autocast: CPU, float32 or float64 weights) the
weight is cast once per call to the chunk dtype.

Two losses plug into it: :mod:`hf_kd.objective.fused` (sources below, divergences there) and the cross-tokenizer loss
(:mod:`hf_kd.teachers.cross_tokenizer.loss`: a source that reads another tokenization's rows, a divergence of its
own). The built-in sources are built once per call from a signal of :mod:`hf_kd.objective.signals`, and turn a slice
of the kept rows into a :class:`ChunkTeacher`:

* :class:`~hf_kd.objective.signals.TeacherHidden` -- the chunk's hidden states through the teacher's head (weight
  cast once);
* :class:`~hf_kd.objective.signals.TeacherLogits` -- the chunk's rows of the full logits (a ``teacher_forward``
  override that returns plain logits, with a fused student);
* :class:`~hf_kd.objective.signals.TeacherTopK` -- the chunk's cached rows as ``k + 1`` bucket log-probs
  (:mod:`hf_kd.objective.sparse`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from hf_kd.models.heads import LMHeadSpec, _mm_emits, as_projection_weight, autocast_dtype, finish_logits, project
from hf_kd.objective.losses import Objective
from hf_kd.objective.signals import TeacherHidden, TeacherLogits, TeacherTopK
from hf_kd.objective.sparse import student_bucket_log_probs, teacher_bucket_log_probs

CHUNK_SIZE = 256  # default rows per chunk: 128 MB per float32 [256, 128k] buffer; on CPU no slower than 1024
BLOCK_ELEMENTS = 2**20  # a 2 MB bf16 block of d(weight) on CPU: 3x a float32 addmm's speed (4 MB: as fast, 16 MB: 2x)


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
    """The teacher side of one chunk from a built-in source: full logits ``[chunk, V]``, or ``k + 1`` bucket
    log-probs over ``ids``."""

    # [chunk, V] logits in a Scratch buffer (a divergence may overwrite them), or [chunk, k + 1] bucket log-probs;
    # in the plan's dtype
    values: torch.Tensor
    ids: torch.Tensor | None = None  # [chunk, k] the teacher's top-k ids; None: dense logits
    # (the chunk's student logits [chunk, V] after scale and softcap, read only; its labels [chunk] or None) ->
    # {name: 0-dim sum} to log beside the loss (several teachers: each one's divergence); called before the
    # divergence, which may overwrite values
    sums: Callable[[torch.Tensor, torch.Tensor | None], dict[str, torch.Tensor]] | None = None

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
        key = f"{name} {dtype or self.dtype}"  # one buffer per name and dtype
        if key not in self.buffers:
            self.buffers[key] = torch.empty(self.shape, dtype=dtype or self.dtype, device=self.device)
        return self.buffers[key][:rows]


class LogitRows:
    """One side's rows and how a chunk of them becomes logits ``[c, vocab]`` in ``dtype``: final hidden states
    ``[N, H]`` through ``head`` (``softcap(scale * (h @ weight.T + bias))``), or logits ``[N, V]`` themselves
    (``head=None``: the identity head). The head's weight is made ready for the matmul here, once per call
    (:func:`~hf_kd.models.heads.as_projection_weight`: a bf16/fp16 weight stays so on CUDA; under autocast, the
    autocast dtype, read here, where the caller's autocast is still on), never per chunk.

    ``kept`` ``[n]``: the rows the chunk loop runs over, in order (``None``: every row); a gradient reaches the others
    as 0. Full logits are read through it chunk by chunk: a mask applied up front would copy ``[N, V]`` once more.
    """

    def __init__(
        self,
        rows: torch.Tensor,
        head: LMHeadSpec | None,
        dtype: torch.dtype,
        vocab: int,
        kept: torch.Tensor | None = None,
    ):
        self.rows, self.head, self.dtype, self.vocab, self.kept = rows, head, dtype, vocab, kept
        self.count = rows.shape[0] if kept is None else kept.shape[0]  # rows the chunk loop runs over
        self.weight = self.bias = None  # as the matmul takes them; rows past vocab are never needed (logits are cut)
        self.trained = (rows, None, None)  # what a gradient may reach: the rows, the head's weight and bias
        if head is not None:
            low = autocast_dtype(rows.device, dtype)  # bf16 GEMMs under the Trainer's autocast, float32 math after
            self.weight = as_projection_weight(head.weight.detach()[:vocab], dtype, low)
            self.bias = None if head.bias is None else head.bias.detach()[:vocab].to(dtype)
            self.trained = (rows, head.weight, head.bias)

    def index(self, chunk: slice) -> slice | torch.Tensor:
        """A slice of the kept rows -> where they are in ``rows``."""
        return chunk if self.kept is None else self.kept[chunk]

    def take(self, index: slice | torch.Tensor) -> torch.Tensor:
        """The rows at ``index`` (a slice: a view), without a graph."""
        rows = self.rows.detach()
        return rows[index] if isinstance(index, slice) else rows.index_select(0, index)

    def raw(self, taken: torch.Tensor, out: torch.Tensor | None = None, scratch: Scratch | None = None) -> torch.Tensor:
        """Taken rows -> their logits before the head's scale and softcap, written into ``out`` when given (without
        ``out``, logits rows may come back as a view of the caller's tensor: read them, do not write). ``scratch``:
        the call's buffers, for a low-precision matmul's own (free again when this returns)."""
        if self.weight is None:
            taken = taken[:, : self.vocab]
            return taken.to(self.dtype) if out is None else out.copy_(taken)
        low, low_out = self.weight.dtype, None
        if scratch is not None and low != self.dtype and not _mm_emits(taken.device, low, self.dtype):
            low_out = scratch("low_precision", taken.shape[0], low)  # compensated_mm's [c, V] buffer
        return project(taken, self.weight, self.bias, self.dtype, out=out, low_out=low_out)

    def finish(self, raw: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        head = self.head
        return raw if head is None else finish_logits(raw, head.logit_scale, head.softcap, in_place=in_place)

    def logits(self, index: slice | torch.Tensor) -> torch.Tensor:
        """The finished logits of the rows at ``index``, without a graph and outside any autocast."""
        with torch.no_grad(), torch.autocast(self.rows.device.type, enabled=False):
            return self.finish(self.raw(self.take(index)))


# ---- teacher sources: a slice of the kept rows (and the call's Scratch) -> ChunkTeacher ------------------------------


def kept_rows(tensor: torch.Tensor, position_dims: int, keep: torch.Tensor | None) -> torch.Tensor:
    """``[*positions, ...]`` -> ``[rows, ...]``: flattened over the ``position_dims`` leading dims, the rows where
    ``keep`` ``[N]`` is False dropped (``None``: all kept)."""
    flat = tensor.flatten(0, position_dims - 1)
    return flat if keep is None else flat[keep]


def _hidden_source(teacher: TeacherHidden, keep, plan: ChunkPlan) -> Callable[[slice, Scratch], ChunkTeacher]:
    hidden = kept_rows(teacher.hidden.detach(), teacher.hidden.dim() - 1, keep)
    rows = LogitRows(hidden, teacher.head, plan.dtype, plan.vocab)  # the weight cast once per call, not per chunk

    def chunk(chunk_rows: slice, scratch: Scratch) -> ChunkTeacher:
        taken = rows.take(chunk_rows)
        raw = rows.raw(taken, out=scratch("teacher", taken.shape[0]), scratch=scratch)
        return ChunkTeacher(rows.finish(raw, in_place=True))

    return chunk


def _logits_source(teacher: TeacherLogits, keep, plan: ChunkPlan) -> Callable[[slice, Scratch], ChunkTeacher]:
    logits = teacher.logits.detach().flatten(0, teacher.logits.dim() - 2)
    rows = LogitRows(logits, None, plan.dtype, plan.vocab, None if keep is None else keep.nonzero().squeeze(1))

    def chunk(chunk_rows: slice, scratch: Scratch) -> ChunkTeacher:
        taken = rows.take(rows.index(chunk_rows))
        # copied into the buffer, never a view: a divergence may overwrite its teacher's values
        return ChunkTeacher(rows.raw(taken, out=scratch("teacher", taken.shape[0])))

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

# A source: (a slice of the kept rows, the call's Scratch) -> the chunk's teacher side, whatever its divergence reads
# (a ChunkTeacher for the built-in sources above).
Source = Callable[[slice, Scratch], object]
# A divergence: (student logits [chunk, V] before scale and softcap, the teacher side or None, labels [chunk] or None,
# plan, want_grad, scratch) -> (divergence sum or None, CE sum or None, d(alpha-mix)/d(student logits) [chunk, V] or
# None[, {name: extra sum}]). The student logits and dense teacher values are Scratch buffers that it may overwrite
# (the gradient may be one of them); the extra sums (0-dim) are summed over chunks and normalized like the loss.
Divergence = Callable[..., tuple]


# ---- the chunked computation --------------------------------------------------------------------------------------


class Totals(NamedTuple):
    """What :func:`run` returns, each divided once by the denominator."""

    total: torch.Tensor  # the objective; carries the gradients of the student's rows and head
    divergence: torch.Tensor  # detached, as every logged component
    ce: torch.Tensor  # detached
    extras: dict[str, torch.Tensor]  # a divergence's extra sums, detached


def run(
    student: LogitRows,
    source: Source | None,
    labels,
    plan: ChunkPlan,
    divergence: Divergence,
    denominator,
    *,
    offset: torch.Tensor | None = None,
) -> Totals:
    """The normalized loss of prepared inputs, chunk by chunk.

    ``student``'s kept rows are the rows the loss sums over (masked rows dropped before any matmul), ``source`` makes
    each chunk's teacher side (``None`` when the divergence is not needed), ``labels`` ``[n]`` (the kept rows') or
    ``None``. ``offset``: a divergence sum computed before the pass (0-dim), added to the chunks' before the division;
    a term over sums across chunks, whose gradient the divergence adds chunk by chunk (its value must not).
    """
    trained = student.trained
    wanted = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in trained)
    # the Trainer's autocast must not touch the logits: LogitRows read it already and chose each matmul's dtype
    with torch.no_grad(), torch.autocast(student.rows.device.type, enabled=False):
        (div_sum, ce_sum), extras, grads = _chunk_sums(student, source, labels, plan, divergence, wanted)
    if offset is not None:
        div_sum = div_sum + offset
    # combine() of the sums, then one division: a tensor of its own even where alpha = 1 or 0 returns one term
    total = plan.objective.combine(div_sum, ce_sum) / denominator
    extras = {name: value / denominator for name, value in extras.items()}
    if any(wanted):
        # Divide by the denominator in float32 before the cast to a bf16 parameter dtype: the incoming gradient is
        # then 1 (or a small integer) and the backward multiplication is exact.
        grads = [None if g is None else g.div_(denominator).to(t.dtype) for g, t in zip(grads, trained)]
        total = _StoredGradients.apply(total, grads, *trained)
    return Totals(total, div_sum / denominator, ce_sum / denominator, extras)


class _StoredGradients(torch.autograd.Function):
    """The loss, whose gradients :func:`run` computed with it chunk by chunk: backward only scales them by the incoming
    gradient (no chunk is kept or recomputed)."""

    @staticmethod
    def forward(ctx, total, grads, *trained):
        ctx.save_for_backward(*grads)
        return total.clone()  # an output of its own, not the input itself

    @staticmethod
    def backward(ctx, grad_total):
        # bf16 * float32 0-dim: computed in float32, rounded once
        return None, None, *(None if g is None else g * grad_total for g in ctx.saved_tensors)


def _chunk_sums(student: LogitRows, source, labels, plan: ChunkPlan, divergence, wanted):
    """Sum the divergence, the CE and any extra sums over chunks of the kept rows.

    Returns ``((divergence_sum, ce_sum), extras, (d_rows, d_weight, d_bias))``: the sums are 0-dim tensors in
    ``plan.dtype`` (0 for a term not computed), the gradients those of ``alpha * divergence_sum + (1 - alpha) *
    ce_sum`` in ``plan.dtype`` (``None`` where not ``wanted``).
    """
    want_rows, want_weight, want_bias = wanted
    dtype, vocab, device = plan.dtype, plan.vocab, student.rows.device
    scratch = Scratch(min(plan.chunk_size, student.count), vocab, dtype, device)
    div_sum, ce_sum = (torch.zeros((), dtype=dtype, device=device) for _ in range(2))
    extras: dict[str, torch.Tensor] = {}
    d_rows = d_weight = d_bias = None
    if want_rows:  # every row written by its chunk, unless some are not kept or logit columns are cut away
        partial = student.kept is not None or student.weight is None
        d_rows = (torch.zeros if partial else torch.empty)(student.rows.shape, dtype=dtype, device=device)
    if want_weight:  # d(weight) accumulates in float32 over chunks; rows past vocab stay 0 (those logits are cut away)
        d_weight = torch.zeros(student.head.weight.shape, dtype=dtype, device=device)
    if want_bias:
        d_bias = torch.zeros(student.head.bias.shape, dtype=dtype, device=device)

    for start in range(0, student.count, plan.chunk_size):
        rows = slice(start, start + plan.chunk_size)
        index = student.index(rows)
        taken = student.take(index)
        # [chunk, vocab] float32 straight from the matmul, into the call's buffer
        logits = student.raw(taken, out=scratch("student", taken.shape[0]), scratch=scratch)
        teacher = None if source is None else source(rows, scratch)
        chunk_labels = None if labels is None else labels[rows]
        chunk_div, chunk_ce, d_logits, *more = divergence(logits, teacher, chunk_labels, plan, any(wanted), scratch)
        if chunk_div is not None:
            div_sum += chunk_div
        if chunk_ce is not None:
            ce_sum += chunk_ce
        for name, value in (more[0] if more else {}).items():
            extras[name] = extras[name] + value if name in extras else value.to(dtype)
        if d_logits is not None:
            _add_gradients(student, d_logits, taken, index, (d_rows, d_weight, d_bias), scratch)
    return (div_sum, ce_sum), extras, (d_rows, d_weight, d_bias)


def _add_gradients(student: LogitRows, d_logits, taken, index, grads, scratch: Scratch) -> None:
    """One chunk's ``d_logits`` ``[c, vocab]`` (w.r.t. its logits before scale and softcap) into ``grads``: the rows
    at ``index`` of ``d_rows``, and added to ``d_weight`` and ``d_bias`` -- the chain rule through the head by hand
    (matmuls that take a bf16 weight; autograd has no derivative for them). ``taken``: the chunk's rows."""
    d_rows, d_weight, d_bias = grads
    vocab, dtype = student.vocab, d_logits.dtype
    if d_bias is not None:
        d_bias[:vocab] += d_logits.sum(0)
    if student.weight is None:  # the identity head: d(logits) is the gradient of the rows themselves
        if d_rows is not None:
            _put(d_rows[:, :vocab], index, d_logits)
        return
    d_w = None if d_weight is None else d_weight[:vocab]
    d_chunk = None
    if d_rows is not None:  # d(hidden) = d_logits @ W, straight into d_rows where the chunk is a slice of it
        d_chunk = d_rows[index] if isinstance(index, slice) else taken.new_empty(taken.shape, dtype=dtype)
    if student.weight.dtype != dtype:
        _low_precision_grads(d_logits, taken, student.weight, d_chunk, d_w, scratch)
    else:
        if d_chunk is not None:
            torch.mm(d_logits, student.weight, out=d_chunk)
        if d_w is not None:  # d(W) += d_logits.T @ hidden
            d_w.addmm_(d_logits.T, taken.to(dtype))
    if d_chunk is not None and not isinstance(index, slice):
        _put(d_rows, index, d_chunk)


def _put(target: torch.Tensor, index: slice | torch.Tensor, rows: torch.Tensor) -> None:
    if isinstance(index, slice):
        target[index].copy_(rows)
    else:
        target.index_copy_(0, index, rows)


def _low_precision_grads(d_logits, hidden, weight, d_hidden, d_weight, scratch: Scratch) -> None:
    """``d_hidden = d_logits @ weight`` and ``d_weight += d_logits.T @ hidden`` for a bf16/fp16 ``weight`` (CUDA, or
    under autocast).

    ``d_logits`` ``[c, V]`` (float32) is rounded once to the weight's dtype; both matmuls take it. On CUDA they run on
    tensor cores with float32 output, and ``d_weight`` ``[V, H]`` (float32, ``None``: not wanted) takes the product
    straight from the matmul where torch can (``addmm(..., out_dtype=)`` on a float32 ``self``), else from a float32
    matmul (older torch): never through a ``[V, H]`` temporary. Without ``out_dtype`` (CPU), d(hidden) comes out of
    the matmul in bf16 (up to 2^-8 relative per element, as its input's rounding; 0.2% in norm, where the rounding of
    the logits' inputs costs ~1%) and d(weight) is added in float32 block by block of the vocabulary
    (:func:`_add_low_precision_product`).
    """
    low = weight.dtype
    rounded = scratch("low_precision", d_logits.shape[0], low).copy_(d_logits)
    emits = _mm_emits(weight.device, low, torch.float32)
    if d_hidden is not None:
        if emits:
            torch.mm(rounded, weight, out_dtype=d_hidden.dtype, out=d_hidden)
        else:
            d_hidden.copy_(torch.mm(rounded, weight))
    if d_weight is None:
        return
    if emits and _addmm_accumulates(d_weight.device, low, d_weight.dtype):
        torch.addmm(d_weight, rounded.T, hidden.to(low), out_dtype=d_weight.dtype, out=d_weight)
    elif emits:
        d_weight.addmm_(d_logits.T, hidden.to(d_weight.dtype))
    else:
        _add_low_precision_product(d_weight, rounded.T, hidden.to(low))


def _add_low_precision_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``total [V, H] += a [V, c] @ b [c, H]`` for bf16/fp16 ``a`` and ``b`` and a float32 ``total``, where no matmul
    adds into float32 (CPU): the product of ``BLOCK_ELEMENTS // H`` rows of ``a`` at a time in a small temporary,
    added while it is still in cache. Each block's product is rounded once (2^-8 relative) and the sum over chunks
    is float32; no ``[V, H]`` temporary."""
    rows = max(1, BLOCK_ELEMENTS // total.shape[1])
    block = torch.empty(min(rows, total.shape[0]), total.shape[1], dtype=a.dtype, device=a.device)
    for start in range(0, total.shape[0], rows):
        part = a[start : start + rows]
        total[start : start + rows].add_(torch.mm(part, b, out=block[: part.shape[0]]))


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

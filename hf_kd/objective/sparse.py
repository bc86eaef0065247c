"""The sparse distillation loss: a student's full logits against a teacher known only by its top-k log-probabilities.

A teacher cache (:mod:`hf_kd.teachers.cache.build`) stores, per target position, the teacher's ``k`` most likely token ids, their
log-probabilities at T = 1, and the log of the remaining mass (the *tail*, ``log(1 - sum(top-k probs))``). The loss
compares the two models on ``k + 1`` buckets: the teacher's ``k`` ids, and one "rest" bucket for every other token.

* **Teacher buckets**: ``[topk_logprobs, tail_logprob]``, exactly as cached.
* **Student buckets**: the student's own distribution collapsed the same way: its log-probs at the teacher's ``k`` ids,
  plus ``logsumexp`` of its log-probs over every other id (its mass outside the teacher's top-k).
* **Temperature**: applied to the buckets of both models, ``softmax(bucket_log_probs / T)``. With ``k = V`` this is
  exactly ``softmax(logits / T)``; with ``k < V`` it treats the rest bucket as one token whose "logit" is its log-mass,
  which is exact at T = 1 and an approximation otherwise (the true tail at T would need the teacher's individual tail
  log-probs, which the cache does not hold). Both models get the same transform, so a student equal to its teacher
  has loss 0 at every temperature.
* **Divergences**: every :data:`SPARSE_LOSS_TYPES` entry is the dense definition evaluated on the ``k + 1`` buckets
  (:func:`hf_kd.objective.losses.per_position_divergence`), ``T**2``-scaled alike. ``mse`` is refused: it compares raw logits,
  which the cache does not hold.
* **Empty tail** (``k = V``): the rest bucket's log-mass is :data:`EMPTY_TAIL` (``exp`` of it is exactly 0 in float32
  and float64), so with ``k = V`` the loss and its gradients equal :func:`hf_kd.objective.losses.distillation_loss`'s.

The cross-entropy term uses the student's full logits, as in the dense loss. Masking and normalization follow
:func:`hf_kd.objective.losses.distillation_loss` exactly: a sum over positions whose label is not ``ignore_index``, divided
once by ``num_items_in_batch`` (or the local count), never 0/0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from hf_kd.objective.divergences import DIVERGENCES
from hf_kd.objective.losses import (
    LOSS_TYPES,
    Objective,
    check_label_ids,
    check_labels,
    normalize_loss_type,
    normalizer,
    target_rows,
)

# the classic divergences a top-k teacher defines (every registered one with on_buckets, in general)
SPARSE_LOSS_TYPES = tuple(name for name in LOSS_TYPES if DIVERGENCES[name].on_buckets)
EMPTY_TAIL = -1.0e4  # log-mass of an empty rest bucket: finite (finite gradients), exp() underflows to exactly 0


def student_bucket_log_probs(student_log_probs: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The student's T = 1 log-probs collapsed onto the teacher's buckets.

    Args:
        student_log_probs: ``[N, V]`` ``log_softmax`` of the student logits (float32 or float64).
        topk_ids: ``[N, k]`` distinct token ids per row, ``0 <= id < V``.

    Returns:
        ``[N, k + 1]``: ``log p_s(id)`` for each of the ``k`` ids, then ``log`` of the student's mass on every other id
        (``EMPTY_TAIL + log(V)`` when ``k = V``: a mass that is exactly 0 after ``exp``).
    """
    top = student_log_probs.gather(-1, topk_ids)
    # logsumexp over the ids outside the top-k: the top-k overwritten by EMPTY_TAIL (exp -> 0), which sums the rest
    # directly (no 1 - sum(top) cancellation) and keeps an empty tail finite, so that no gradient is ever nan
    tail = student_log_probs.scatter(-1, topk_ids, EMPTY_TAIL).logsumexp(-1, keepdim=True)
    return torch.cat([top, tail], dim=-1)


def sampled_buckets(
    student_log_probs: torch.Tensor, topk_ids: torch.Tensor, teacher_buckets: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k + 1`` buckets with the sampled token out of the tail in a bucket of its own, for ``reverse_kl_sampled``,
    which reads both models' log-probability *of that token*.

    Args:
        student_log_probs: ``[N, V]`` the student's T = 1 log-probs; topk_ids: ``[N, k]``; teacher_buckets:
            ``[N, k + 1]`` (:func:`teacher_bucket_log_probs`); targets: ``[N]`` each row's sampled id.

    Returns:
        ``(student [N, k + 2], teacher [N, k + 2], bucket [N])``: the top-k ids, the sampled token's own bucket, the
        rest of the tail; ``bucket`` is the sampled token's column (its top-k column when it is one of them: its own
        bucket is then empty on both sides). The teacher's tail is spread uniformly over the ``V - k`` ids outside
        its top-k (all it tells of them): the sampled token gets ``tail - log(V - k)``, the rest the remainder, so
        each side still sums to 1.
    """
    vocab, k = student_log_probs.shape[-1], topk_ids.shape[-1]
    hit = topk_ids == targets.unsqueeze(-1)  # [N, k]
    in_top = hit.any(-1)
    own = student_log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    rest = student_log_probs.scatter(-1, topk_ids, EMPTY_TAIL).scatter(-1, targets.unsqueeze(-1), EMPTY_TAIL)
    student = torch.cat(
        [
            student_log_probs.gather(-1, topk_ids),
            torch.where(in_top, EMPTY_TAIL, own).unsqueeze(-1),
            rest.logsumexp(-1, keepdim=True),
        ],
        dim=-1,
    )
    tail, outside = teacher_buckets[:, k], max(vocab - k, 1)
    share = math.log1p(-1 / outside) if outside > 1 else -math.inf  # the rest's part of the tail
    teacher = torch.cat(
        [
            teacher_buckets[:, :k],
            torch.where(in_top, EMPTY_TAIL, tail - math.log(outside)).unsqueeze(-1),
            torch.where(in_top, tail, tail + share).clamp_min(EMPTY_TAIL).unsqueeze(-1),
        ],
        dim=-1,
    )
    return student, teacher, torch.where(in_top, hit.long().argmax(-1), k)


def teacher_bucket_log_probs(topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor) -> torch.Tensor:
    """``[N, k]`` top-k log-probs and ``[N]`` tail log-mass (as cached) -> ``[N, k + 1]`` bucket log-probs.

    A tail of ``-inf`` (or below :data:`EMPTY_TAIL`) is raised to ``EMPTY_TAIL``; ``exp`` of both is 0.
    """
    return torch.cat([topk_logprobs, tail_logprob.clamp_min(EMPTY_TAIL).unsqueeze(-1)], dim=-1)


def sparse_weights(loss_type: str | Mapping[str, float]) -> dict[str, float]:
    """:func:`hf_kd.objective.losses.normalize_loss_type`, refusing the divergences a top-k teacher cannot define
    (those not ``on_buckets``: ``mse`` compares raw logits, ``uld`` sorts a whole distribution)."""
    weights = normalize_loss_type(loss_type)
    sampled = [name for name in weights if DIVERGENCES[name].reads_targets]
    if sampled and len(weights) > 1:
        raise ValueError(
            f"loss_type: {sampled[0]} on a top-k teacher splits the tail bucket at the sampled token, which would "
            "change the other divergences' buckets; use it alone"
        )
    for name in weights:
        if not DIVERGENCES[name].on_buckets:
            usable = ", ".join(n for n, cls in DIVERGENCES.items() if cls.on_buckets)
            raise ValueError(
                f"loss_type: {name!r} compares raw teacher logits or whole distributions over one vocabulary, which a "
                f"top-k teacher cache does not hold; with a cache use {usable} (or distill from the live teacher)"
            )
    return weights


def check_cache_shapes(positions: torch.Size, topk_ids, topk_logprobs, tail_logprob) -> None:
    """Raise a ValueError unless the cached rows are ``[*positions, k]``, ``[*positions, k]`` and ``[*positions]``."""
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[:-1] != positions or tail_logprob.shape != positions:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} must be [..., k] and "
            f"tail_logprob {tuple(tail_logprob.shape)} [...] for the {tuple(positions)} positions of the student"
        )


def sparse_distillation_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
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
):
    """``alpha * divergence + (1 - alpha) * CE`` against a top-k teacher, summed over valid positions, normalized once.

    Args:
        student_logits: ``[..., V]`` student logits (computed in float32 at least).
        topk_ids: ``[..., k]`` the teacher's top-k token ids per position (distinct, in ``[0, V)``; any int dtype).
        topk_logprobs: ``[..., k]`` the teacher's log-probabilities of those ids at T = 1. No gradient flows to them.
        tail_logprob: ``[...]`` log of the teacher's remaining mass, ``log(1 - sum(exp(topk_logprobs)))``.
        labels: ``[...]`` target ids aligned with the logits; ``ignore_index`` positions count in neither term (their
            teacher entries are never read). ``None``: every position counts and ``alpha`` must be 1.
        loss_type, temperature, alpha, num_items_in_batch, jsd_beta, skew_lambda, scale_by_temperature,
        return_components: as in :func:`hf_kd.objective.losses.distillation_loss`; ``loss_type`` names come from
            :data:`SPARSE_LOSS_TYPES` (``mse`` needs raw logits and is refused).

    Returns:
        A scalar tensor; with ``return_components`` a tuple ``(total, divergence, ce)`` (``ce`` is ``None`` without
        labels). With ``k = V`` this equals ``distillation_loss(student_logits, teacher_logits, labels, ...)`` for the
        teacher whose log-softmax the cache holds, in value and gradient.
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
    sparse_weights(objective.weights)  # refuses mse
    positions = student_logits.shape[:-1]
    check_cache_shapes(positions, topk_ids, topk_logprobs, tail_logprob)
    check_labels(labels, positions, objective.alpha, "the logits without their vocab dim")

    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    vocab, k = student_logits.shape[-1], topk_ids.shape[-1]
    student = student_logits.reshape(-1, vocab)
    ids = topk_ids.reshape(-1, k).long()
    teacher_top, teacher_tail = topk_logprobs.detach().reshape(-1, k), tail_logprob.detach().reshape(-1)
    flat_labels, keep = target_rows(labels, objective.ignore_index)
    if keep is not None:  # masked rows' cache entries are fillers, never read
        student, ids, teacher_top, teacher_tail = student[keep], ids[keep], teacher_top[keep], teacher_tail[keep]
    count = student.shape[0]
    student = student.to(dtype)
    teacher = teacher_bucket_log_probs(teacher_top.to(dtype), teacher_tail.to(dtype))

    # the same divisor as distillation_loss
    denominator = normalizer(count, num_items_in_batch, device=student.device, dtype=dtype)

    if ((ids < 0) | (ids >= vocab)).any():
        raise ValueError(f"topk_ids: ids must be in [0, {vocab}), the student's vocabulary")
    log_p = torch.log_softmax(student, dim=-1)  # one [N, V] log-softmax, shared by the buckets and the CE
    with torch.set_grad_enabled(
        torch.is_grad_enabled() and objective.alpha > 0
    ):  # alpha = 0: CE only, divergence is logged
        # per_position_divergence applies log_softmax(buckets / T) to both: temperature on the k + 1 buckets
        if objective.reads_targets():  # the sampled token's own bucket (k + 2): labels are needed
            if flat_labels is None:
                raise ValueError("loss_type: reverse_kl_sampled reads the token sampled at each position: pass labels")
            check_label_ids(flat_labels, vocab, objective.ignore_index)
            student_side, teacher, buckets = sampled_buckets(log_p, ids, teacher, flat_labels)
            divergence = objective.divergence(student_side, teacher, buckets).sum() / denominator
        else:
            divergence = objective.divergence(student_bucket_log_probs(log_p, ids), teacher).sum() / denominator

    ce = None
    if objective.needs_ce(labels is not None, return_components):
        check_label_ids(flat_labels, vocab, objective.ignore_index)
        with torch.set_grad_enabled(
            torch.is_grad_enabled() and objective.alpha < 1
        ):  # monitoring-only CE keeps no graph
            ce = -log_p.gather(-1, flat_labels.unsqueeze(-1)).sum() / denominator
    total = objective.combine(divergence, ce)
    if return_components:
        return total, divergence.detach(), None if ce is None else ce.detach()
    return total

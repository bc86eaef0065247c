"""Teacher-agreement metrics for evaluation, as additive sums (exact across batches and processes).

:func:`agreement_sums` turns one batch of aligned logits into sums (counts, summed KL, summed NLL, calibration bins);
sums add across batches and processes; :func:`finalize_metrics` turns the totals into rates. All on the positions
that count (labels != ignore_index), the same positions the loss uses.
"""

from __future__ import annotations

import math

import torch

from hf_kd.objective.losses import per_position_divergence, target_rows

CALIBRATION_BINS = 15  # the usual equal-width ECE binning (Guo et al., 2017)
HEALTH_TOP_K = 8  # the student's top-8 ids per position (at T = 1; its samples are drawn at generation_temperature)


@torch.no_grad()
def agreement_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    calibration: bool = False,
) -> dict[str, torch.Tensor]:
    """Sums over the valid positions of one batch.

    Args:
        student_logits, teacher_logits: ``[..., V]`` aligned logits (already shifted for causal LMs).
        labels: ``[...]`` or ``None`` (every position counts; no NLL/accuracy then).
        calibration: also bin the max-probability confidences for the expected calibration error (classifiers).

    Returns:
        float64 tensors: ``count``, ``agreement`` (student argmax == teacher argmax), ``kl`` (KL(teacher || student)
        at T = 1); with labels ``student_nll``, ``teacher_nll``, ``student_correct``, ``teacher_correct``; with
        calibration ``{student,teacher}_bin_{count,confidence,correct}`` of shape ``[CALIBRATION_BINS]``.
    """
    vocab = student_logits.shape[-1]
    student = student_logits.detach().reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    flat, keep = target_rows(labels, ignore_index)
    if keep is not None:
        student, teacher = student[keep], teacher[keep]
    dtype = torch.promote_types(student.dtype, torch.float32)
    student, teacher = student.to(dtype), teacher.to(dtype)
    f64 = dict(dtype=torch.float64, device=student.device)

    s_pred, t_pred = student.argmax(-1), teacher.argmax(-1)
    sums = {
        "count": torch.tensor(student.shape[0], **f64),
        "agreement": (s_pred == t_pred).sum().to(torch.float64),
        "kl": per_position_divergence(student, teacher, {"forward_kl": 1.0}).sum().to(torch.float64),
    }
    log_probs = {"student": torch.log_softmax(student, -1), "teacher": torch.log_softmax(teacher, -1)}
    preds = {"student": s_pred, "teacher": t_pred}
    for role, log_p in log_probs.items():
        if labels is not None:
            sums[f"{role}_nll"] = -log_p.gather(-1, flat[:, None]).sum().to(torch.float64)
            correct = (preds[role] == flat).to(torch.float64)
            sums[f"{role}_correct"] = correct.sum()
            if calibration:
                confidence = log_p.max(-1).values.exp().to(torch.float64)
                # bin b holds confidences in (b/B, (b+1)/B]; a confidence of exactly 0 cannot occur (softmax > 0)
                bins = (confidence * CALIBRATION_BINS).ceil().long().clamp(1, CALIBRATION_BINS) - 1
                zeros = torch.zeros(CALIBRATION_BINS, **f64)
                sums[f"{role}_bin_count"] = zeros.index_add(0, bins, torch.ones_like(confidence))
                sums[f"{role}_bin_confidence"] = zeros.index_add(0, bins, confidence)
                sums[f"{role}_bin_correct"] = zeros.index_add(0, bins, correct)
    return sums


@torch.no_grad()
def health_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """On-policy health of ``[n, V]`` rows at the student's own samples: ``count``, ``entropy`` (the student's, nats)
    and, with a teacher, ``teacher_mass`` (the teacher's probability on the student's :data:`HEALTH_TOP_K` most likely
    ids); float64 sums. A collapsing student shows low entropy; a student whose samples the teacher would not write
    shows little teacher mass on them."""
    student = student_logits.detach().float()
    log_p = torch.log_softmax(student, -1)
    sums = {
        "count": torch.tensor(student.shape[0], dtype=torch.float64, device=student.device),
        "entropy": -(log_p.exp() * log_p).nansum(-1).sum().to(torch.float64),
    }
    if teacher_logits is not None:
        top = student.topk(min(HEALTH_TOP_K, student.shape[-1]), dim=-1).indices
        p_t = torch.softmax(teacher_logits.detach().float(), -1)
        sums["teacher_mass"] = p_t.gather(-1, top).sum().to(torch.float64)
    return sums


def add_sums(total: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for key, value in new.items():
        total[key] = total[key] + value if key in total else value
    return total


def finalize_metrics(sums: dict[str, float | list[float]], *, language_model: bool) -> dict[str, float]:
    """Rates from summed totals: ``top1_agreement``, ``teacher_kl``, then perplexities (language models) or
    accuracies and expected calibration errors (classifiers), for the student and the teacher."""
    count = max(float(sums["count"]), 1.0)
    metrics = {"top1_agreement": sums["agreement"] / count, "teacher_kl": sums["kl"] / count}
    for role in ("student", "teacher"):
        if f"{role}_nll" not in sums:
            continue
        if language_model:
            metrics[f"{role}_perplexity"] = math.exp(min(sums[f"{role}_nll"] / count, 700.0))  # no overflow to inf
        else:
            metrics[f"{role}_accuracy"] = sums[f"{role}_correct"] / count
        if f"{role}_bin_count" in sums:
            gaps = (
                abs(correct - confidence)
                for correct, confidence in zip(sums[f"{role}_bin_correct"], sums[f"{role}_bin_confidence"])
            )
            metrics[f"{role}_ece"] = sum(gaps) / count  # sum_b n_b/N * |acc_b - conf_b|
    return metrics

"""Distillation objectives as pure tensor functions.

Everything here takes logits ``[..., V]`` and labels ``[...]`` that are already aligned position by position (a causal
LM caller shifts first), and holds no trainer state. Masking and normalization live in exactly one place,
:func:`distillation_loss`; the per-position divergences below return one value per row.

Conventions (see the README's loss table):

* ``p_t = softmax(teacher / T)``, ``p_s = softmax(student / T)``; every divergence is multiplied by ``T**2`` when
  ``scale_by_temperature`` (Hinton et al.: keeps gradient magnitudes comparable across temperatures).
* ``mse`` is the *mean over the vocabulary* of the squared raw-logit difference, temperature-free. With that
  normalization ``T**2 * forward_kl -> mse / 2`` as ``T -> inf`` for zero-mean logits, so ``mse`` is exactly the
  high-temperature limit of KD (Hinton et al. 2015; Kim et al. 2021) rather than a V-times larger cousin of it.
* A teacher logit of ``-inf`` is a masked token the teacher never produces (``p_t = 0``): forward KL, JSD, the skew
  KLs and TVD are exact; ``reverse_kl`` floors the teacher's log-probability there at the log of the dtype's smallest
  normal number (-87.3 in float32), so student mass on it costs ~87 nats per unit instead of infinity; ``mse``
  averages over the teacher's unmasked logits only. NaN and ``+inf`` are faults: they make the value NaN.
* ``jsd`` is continuous in ``beta``: ``beta = 0`` and ``beta = 1`` both give 0 (TRL's ``generalized_jsd_loss``
  special-cases them as forward/reverse KL instead).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as F

LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "mse")
IGNORE_INDEX = -100  # the Trainer's and every HF loss's convention for "not a target"


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities ``[N, V]`` -> ``[N]``; entries where p is exactly 0 contribute 0, and a
    NaN anywhere stays NaN (a poisoned teacher must show in the value, not only in the gradient)."""
    p = log_p.exp()
    return torch.where(p == 0, 0.0, p * (log_p - log_q)).sum(-1)


def _floored(log_p: torch.Tensor) -> torch.Tensor:
    """Log-probabilities with -inf (a masked token, probability exactly 0) raised to the log of the dtype's smallest
    normal number (-87.3 in float32): the cost of mass on a masked token is large but finite. Finite values, however
    small (log_softmax of finite logits is finite), are kept: the loss of an unmasked teacher does not change."""
    return log_p.masked_fill(log_p == -math.inf, math.log(torch.finfo(log_p.dtype).tiny))


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed in log space so that tiny probabilities do not underflow."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def per_position_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: Mapping[str, float],
    *,
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    scale_by_temperature: bool = True,
) -> torch.Tensor:
    """Weighted sum of divergences per position.

    Args:
        student_logits: ``[N, V]``, already in the compute dtype (float32 or float64).
        teacher_logits: ``[N, V]``, same dtype. Never receives a gradient.
        weights: ``{loss_type: weight}`` with names from :data:`LOSS_TYPES`.

    Returns:
        ``[N]`` tensor: ``sum_k weights[k] * divergence_k`` for each position.
    """
    teacher_logits = teacher_logits.detach()
    t2 = temperature**2 if scale_by_temperature else 1.0
    total = student_logits.new_zeros(student_logits.shape[:-1])
    log_p_s = log_p_t = None
    if any(name != "mse" for name in weights):
        # One log-softmax each, shared by every divergence of the mixture.
        # (T = 1 skips two [N, V] divisions)
        log_p_s = torch.log_softmax(student_logits if temperature == 1 else student_logits / temperature, dim=-1)
        log_p_t = torch.log_softmax(teacher_logits if temperature == 1 else teacher_logits / temperature, dim=-1)
    for name, weight in weights.items():
        if weight == 0:
            continue
        if name == "forward_kl":
            term = t2 * _kl(log_p_t, log_p_s)
        elif name == "reverse_kl":  # KL(p_s || p_t) is infinite where p_t = 0 < p_s: the teacher's floor instead
            term = t2 * _kl(log_p_s, _floored(log_p_t))
        elif name == "jsd":
            log_m = _log_mix(log_p_t, log_p_s, jsd_beta)
            term = student_logits.new_zeros(total.shape)
            if jsd_beta > 0:  # a zero-weight term is skipped, not multiplied by 0 (0 * inf would be nan)
                term = term + jsd_beta * _kl(log_p_t, log_m)
            if jsd_beta < 1:
                term = term + (1 - jsd_beta) * _kl(log_p_s, log_m)
            term = t2 * term
        elif name == "skew_forward_kl":
            term = t2 * _kl(log_p_t, _log_mix(log_p_t, log_p_s, skew_lambda))
        elif name == "skew_reverse_kl":  # at skew_lambda = 0 the mix is p_t itself: floored like reverse_kl
            term = t2 * _kl(log_p_s, _floored(_log_mix(log_p_s, log_p_t, skew_lambda)))
        elif name == "tvd":
            term = t2 * 0.5 * (log_p_t.exp() - log_p_s.exp()).abs().sum(-1)
        elif name == "mse":
            # Raw logits, mean over the vocab: the T -> inf limit of T^2 * forward_kl is mse / 2 (module docstring).
            # A masked teacher logit (-inf) has no value to match: the mean runs over the teacher's other logits.
            unmasked = teacher_logits != -math.inf
            term = torch.where(unmasked, student_logits - teacher_logits, 0.0).pow(2).sum(-1) / unmasked.sum(-1)
        else:  # unreachable after normalize_loss_type, kept so a new name cannot be silently ignored
            raise ValueError(f"loss_type: unknown divergence {name!r}")
        total = total + weight * term
    if student_logits.requires_grad and not total.requires_grad:
        # jsd_beta = 1 or skew_lambda = 1 make the loss a constant 0: keep it in the graph so backward still works
        total = total + 0.0 * student_logits.sum(-1)
    return total


def normalize_loss_type(loss_type: str | Mapping[str, float]) -> dict[str, float]:
    """``"forward_kl"`` or ``{"forward_kl": 0.5, "mse": 0.5}`` -> a validated ``{name: weight}`` dict."""
    weights = {loss_type: 1.0} if isinstance(loss_type, str) else dict(loss_type)
    if not weights:
        raise ValueError(f"loss_type: empty mixture; give a name from {', '.join(LOSS_TYPES)} or a {{name: weight}} map")
    for name, weight in weights.items():
        if name not in LOSS_TYPES:
            raise ValueError(f"loss_type: unknown loss {name!r}; choose from {', '.join(LOSS_TYPES)}")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"loss_type: weight of {name!r} must be a finite number >= 0, got {weight!r}")
    if sum(weights.values()) == 0:
        raise ValueError("loss_type: all mixture weights are 0; at least one must be positive")
    return {name: float(weight) for name, weight in weights.items()}


def check_hyperparameters(*, temperature: float, alpha: float, jsd_beta: float, skew_lambda: float) -> None:
    """Raise a ValueError naming the first out-of-range knob (shared by the loss and DistillationConfig)."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    for name, value in (("alpha", alpha), ("jsd_beta", jsd_beta), ("skew_lambda", skew_lambda)):
        if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class Objective:
    """The whole objective, validated once: ``alpha * sum_k w_k * D_k(p_t || p_s) + (1 - alpha) * CE``.

    Built from :class:`hf_kd.DistillationConfig` (``args.objective``) or from the keyword arguments of the public
    losses (same names); every loss path (dense, sparse, fused, metrics, ``hf-kd check``) reads its knobs
    from here, so none of them re-spells them.
    """

    loss_type: str | Mapping[str, float] = "forward_kl"
    temperature: float = 1.0
    alpha: float = 1.0
    jsd_beta: float = 0.5
    skew_lambda: float = 0.1
    scale_by_temperature: bool = True
    ignore_index: int = IGNORE_INDEX
    weights: Mapping[str, float] = field(init=False, repr=False, compare=False)  # {name: weight}, read-only

    def __post_init__(self):
        weights = normalize_loss_type(self.loss_type)  # raises a ValueError naming loss_type
        check_hyperparameters(
            temperature=self.temperature, alpha=self.alpha, jsd_beta=self.jsd_beta, skew_lambda=self.skew_lambda
        )
        object.__setattr__(self, "weights", MappingProxyType(weights))
        if not isinstance(self.loss_type, str):  # a caller's dict must not change the objective afterwards
            object.__setattr__(self, "loss_type", MappingProxyType(dict(weights)))

    def loss_kwargs(self) -> dict:
        """The keyword arguments of the public loss functions that reproduce this objective."""
        return {
            "loss_type": dict(self.weights), "temperature": self.temperature, "alpha": self.alpha,
            "jsd_beta": self.jsd_beta, "skew_lambda": self.skew_lambda,
            "scale_by_temperature": self.scale_by_temperature, "ignore_index": self.ignore_index,
        }  # fmt: skip

    @property
    def temperature_scale(self) -> float:
        """The factor on every divergence: ``T**2`` when ``scale_by_temperature``, else 1."""
        return self.temperature**2 if self.scale_by_temperature else 1.0

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``[N, V]`` student and teacher logits (or bucket log-probs) -> ``[N]`` weighted divergence per row."""
        return per_position_divergence(
            student,
            teacher,
            self.weights,
            temperature=self.temperature,
            jsd_beta=self.jsd_beta,
            skew_lambda=self.skew_lambda,
            scale_by_temperature=self.scale_by_temperature,
        )

    def needs_divergence(self, return_components: bool) -> bool:
        return self.alpha > 0 or return_components  # alpha = 0: the divergence is only computed to be logged

    def needs_ce(self, has_labels: bool, return_components: bool) -> bool:
        return has_labels and (self.alpha < 1 or return_components)

    def combine(self, divergence, ce):
        """``alpha * divergence + (1 - alpha) * ce``; a term with weight 0 is not touched (it may be ``None``)."""
        if self.alpha == 1:
            return divergence
        if self.alpha == 0:
            return ce
        return self.alpha * divergence + (1 - self.alpha) * ce


def normalizer(count: int, num_items_in_batch, *, device, dtype) -> float | torch.Tensor:
    """The one divisor of every hf_kd loss: ``num_items_in_batch`` when given (the Trainer's global count of target
    positions in the optimizer step), else the ``count`` of valid positions here; at least 1, never 0 / 0."""
    if num_items_in_batch is None:
        return max(count, 1)  # all positions masked -> 0 / 1 = 0
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(device=device, dtype=dtype).clamp_min(1)
    return max(num_items_in_batch, 1)


def check_labels(labels: torch.Tensor | None, positions: torch.Size, alpha: float, against: str) -> None:
    """``labels`` must be ``[*positions]``; ``None`` needs ``alpha == 1`` (there is no CE without labels)."""
    if labels is None:
        if alpha != 1:
            raise ValueError(f"alpha={alpha} needs labels for the cross-entropy term; pass labels or set alpha=1")
    elif labels.shape != positions:
        raise ValueError(f"labels {tuple(labels.shape)} must match {against} {tuple(positions)}")


def target_rows(labels: torch.Tensor | None, ignore_index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(flat_labels, keep)``: the flattened labels of the positions that count, and the ``[N]`` mask that picks those
    rows out of any flattened per-position tensor (both ``None`` without labels: every position counts). Every loss
    drops the other rows first, so prompts and padding cost nothing past this point."""
    if labels is None:
        return None, None
    flat = labels.reshape(-1)
    keep = flat != ignore_index
    return flat[keep], keep


def check_label_ids(flat_labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """The CE's targets must be ids of the vocabulary it runs over (a bad id fails here, not inside a kernel)."""
    if ((flat_labels < 0) | (flat_labels >= vocab)).any():
        raise ValueError(f"labels: ids must be in [0, {vocab}) or equal to ignore_index={ignore_index}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
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
):
    """``alpha * divergence + (1 - alpha) * CE``, summed over valid positions and normalized once.

    Args:
        student_logits: ``[..., V]`` student logits (any float dtype; computed in float32 at least).
        teacher_logits: ``[..., V]`` teacher logits, same shape. No gradient flows to them.
        labels: ``[...]`` target ids aligned with the logits (position i of ``labels`` is the target of position i of
            the logits). Positions equal to ``ignore_index`` are excluded from both terms. ``None``: every position
            counts and ``alpha`` must be 1 (there is no CE without labels).
        loss_type: a name from :data:`LOSS_TYPES` or a ``{name: weight}`` mixture of them.
        temperature: softens both distributions; ``T**2`` rescales the divergences when ``scale_by_temperature``.
        alpha: weight of the divergence; ``1 - alpha`` weighs the cross-entropy of the student (at T = 1) on labels.
        num_items_in_batch: the divisor (the number of valid positions across gradient-accumulation micro-batches and
            processes, as the Trainer counts it). ``None``: the number of valid positions here.
        return_components: also return the normalized divergence and CE (``None`` without labels).

    Returns:
        A scalar tensor (float32, or float64 for float64 inputs); with ``return_components`` a tuple
        ``(total, divergence, ce)`` where ``total == alpha * divergence + (1 - alpha) * ce``.
    """
    objective = Objective(loss_type, temperature, alpha, jsd_beta, skew_lambda, scale_by_temperature, ignore_index)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must have "
            "the same shape; align the vocabularies first (DistillationTrainer does it for padded vocabularies)"
        )
    check_labels(labels, student_logits.shape[:-1], alpha, "the logits without their vocab dim")

    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, vocab)
    flat_labels, keep = target_rows(labels, ignore_index)
    if keep is not None and not bool(keep.all()):  # nothing is copied when every row counts
        student, teacher = student[keep], teacher[keep]
    count = student.shape[0]
    # Upcast after the row selection so that only the valid rows are ever copied to float32.
    student, teacher = student.to(dtype), teacher.to(dtype)

    denominator = normalizer(count, num_items_in_batch, device=student.device, dtype=dtype)

    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha > 0):  # alpha = 0: CE only, divergence is logged
        divergence = objective.divergence(student, teacher).sum() / denominator

    ce = None
    if objective.needs_ce(labels is not None, return_components):
        check_label_ids(flat_labels, vocab, ignore_index)
        with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1):  # monitoring-only CE keeps no graph
            ce = F.cross_entropy(student, flat_labels, reduction="sum") / denominator
    total = objective.combine(divergence, ce)
    if return_components:
        return total, divergence.detach(), None if ce is None else ce.detach()
    return total

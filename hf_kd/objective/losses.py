"""The objective and the dense loss, as pure tensor functions.

Everything here takes logits ``[..., V]`` and labels ``[...]`` that are already aligned position by position (a causal
LM caller shifts first), and holds no trainer state. The divergences are :mod:`hf_kd.objective.divergences` (one class
each, in a registry); :class:`Objective` is the whole objective, declared once and passed to every loss path;
masking and normalization live in one helper each (:func:`target_rows`, :func:`normalizer`).

``p_t = softmax(teacher / T)``, ``p_s = softmax(student / T)``; every divergence but ``mse`` and ``uld`` is
multiplied by ``T**2`` when ``scale_by_temperature`` (Hinton et al.: keeps gradient magnitudes comparable across
temperatures). See the divergences module for masked (-inf) teacher logits and each divergence's conventions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as F

from hf_kd.models.tasks import IGNORE_INDEX  # noqa: F401 (defined with the tasks; importable from here too)
from hf_kd.objective.divergences import DIVERGENCES, Divergence

# the classic token-level divergences; DIVERGENCES holds every registered one (ULD and the user's own included)
LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "mse")


def per_position_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: Mapping[str, float],
    *,
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
    scale_by_temperature: bool = True,
    divergence_params: Mapping[str, Mapping] | None = None,
) -> torch.Tensor:
    """Weighted sum of divergences per position.

    Args:
        student_logits: ``[N, V]``, already in the compute dtype (float32 or float64).
        teacher_logits: ``[N, V]``, same dtype. Never receives a gradient.
        weights: ``{loss_type: weight}`` with names from :data:`DIVERGENCES`.

    Returns:
        ``[N]`` tensor: ``sum_k weights[k] * divergence_k`` for each position.
    """
    objective = Objective(
        dict(weights),
        temperature,
        1.0,
        jsd_beta,
        skew_lambda,
        scale_by_temperature,
        divergence_params=divergence_params or {},
    )
    return objective.divergence(student_logits, teacher_logits)


def normalize_loss_type(loss_type: str | Mapping[str, float]) -> dict[str, float]:
    """``"forward_kl"`` or ``{"forward_kl": 0.5, "mse": 0.5}`` -> a validated ``{name: weight}`` dict."""
    weights = {loss_type: 1.0} if isinstance(loss_type, str) else dict(loss_type)
    names = ", ".join(DIVERGENCES)
    if not weights:
        raise ValueError(f"loss_type: empty mixture; give a name from {names} or a {{name: weight}} map")
    for name, weight in weights.items():
        if name not in DIVERGENCES:
            raise ValueError(f"loss_type: unknown loss {name!r}; choose from {names}")
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
    # {name: {parameter: value}} for divergences with parameters of their own (jsd's beta defaults to jsd_beta, ...)
    divergence_params: Mapping[str, Mapping] = field(default_factory=dict)
    weights: Mapping[str, float] = field(init=False, repr=False, compare=False)  # {name: weight}, read-only
    # {name: configured Divergence} of the weighted terms, read-only
    divergences: Mapping[str, Divergence] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        weights = normalize_loss_type(self.loss_type)  # raises a ValueError naming loss_type
        check_hyperparameters(
            temperature=self.temperature, alpha=self.alpha, jsd_beta=self.jsd_beta, skew_lambda=self.skew_lambda
        )
        params = dict(self.divergence_params or {})
        for name, values in params.items():
            if name not in weights or not isinstance(values, Mapping):
                raise ValueError(
                    f"divergence_params: {name!r} must be a {{parameter: value}} map of a divergence "
                    f"in loss_type ({', '.join(weights)})"
                )
        knobs = {"jsd_beta": self.jsd_beta, "skew_lambda": self.skew_lambda}
        divergences = {name: DIVERGENCES[name].configured(dict(params.get(name, {})), knobs) for name in weights}
        object.__setattr__(self, "weights", MappingProxyType(weights))
        object.__setattr__(self, "divergences", MappingProxyType(divergences))
        # a caller's dicts must not change the objective afterwards
        object.__setattr__(self, "divergence_params", MappingProxyType({k: dict(v) for k, v in params.items()}))
        if not isinstance(self.loss_type, str):
            object.__setattr__(self, "loss_type", MappingProxyType(dict(weights)))

    def loss_kwargs(self) -> dict:
        """The keyword arguments of the public loss functions that reproduce this objective."""
        return {
            "loss_type": dict(self.weights),
            "temperature": self.temperature,
            "alpha": self.alpha,
            "jsd_beta": self.jsd_beta,
            "skew_lambda": self.skew_lambda,
            "scale_by_temperature": self.scale_by_temperature,
            "ignore_index": self.ignore_index,
            "divergence_params": {name: dict(values) for name, values in self.divergence_params.items()},
        }

    @property
    def temperature_scale(self) -> float:
        """The factor on every divergence: ``T**2`` when ``scale_by_temperature``, else 1."""
        return self.temperature**2 if self.scale_by_temperature else 1.0

    def on_buckets(self) -> bool:
        """Whether every divergence of the objective is defined on bucket distributions (a top-k teacher cache, a
        cross-tokenizer span): ``mse`` and ``uld`` are not."""
        return all(divergence.on_buckets for divergence in self.divergences.values())

    def reads_targets(self) -> bool:
        """Whether a divergence of the objective reads each position's sampled token (``reverse_kl_sampled``)."""
        return any(divergence.reads_targets for divergence in self.divergences.values())

    def divergence(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[N, V]`` student and teacher logits (or bucket log-probs) -> ``[N]`` weighted divergence per row.
        ``targets`` ``[N]``: each row's sampled token, as a column of the rows (needed by :meth:`reads_targets`)."""
        if targets is None and self.reads_targets():
            raise ValueError(
                "loss_type: reverse_kl_sampled reads the token sampled at each position (the labels); it needs "
                "labels, on a path that has them (not another tokenizer's)"
            )
        teacher = teacher.detach()
        temperature = self.temperature
        total = student.new_zeros(student.shape[:-1])
        log_p_s = log_p_t = None
        if any(d.uses_log_probs for d in self.divergences.values()):
            # one log-softmax each, shared by every divergence of the mixture (T = 1 skips two [N, V] divisions)
            log_p_s = torch.log_softmax(student if temperature == 1 else student / temperature, dim=-1)
            log_p_t = torch.log_softmax(teacher if temperature == 1 else teacher / temperature, dim=-1)
        for name, divergence in self.divergences.items():
            weight = self.weights[name]
            if weight == 0:
                continue
            if divergence.reads_targets:
                value = divergence.per_row(log_p_s, log_p_t, student, teacher, targets=targets)
            else:
                value = divergence.per_row(log_p_s, log_p_t, student, teacher)
            if divergence.temperature_scaled and self.temperature_scale != 1:
                value = self.temperature_scale * value
            total = total + weight * value
        if student.requires_grad and not total.requires_grad:
            # jsd beta = 1 or a skew lambda = 1 make the loss a constant 0: keep it in the graph so backward works
            total = total + 0.0 * student.sum(-1)
        return total

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
    objective: Objective | None = None,
    divergence_params: Mapping[str, Mapping] | None = None,
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
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must have "
            "the same shape; align the vocabularies first (DistillationTrainer does it for padded vocabularies)"
        )
    check_labels(labels, student_logits.shape[:-1], objective.alpha, "the logits without their vocab dim")

    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, vocab)
    flat_labels, keep = target_rows(labels, objective.ignore_index)
    if keep is not None and not bool(keep.all()):  # nothing is copied when every row counts
        student, teacher = student[keep], teacher[keep]
    count = student.shape[0]
    # Upcast after the row selection so that only the valid rows are ever copied to float32.
    student, teacher = student.to(dtype), teacher.to(dtype)

    denominator = normalizer(count, num_items_in_batch, device=student.device, dtype=dtype)
    if objective.reads_targets() and flat_labels is not None:  # the sampled estimator gathers at the label ids
        check_label_ids(flat_labels, vocab, objective.ignore_index)

    with torch.set_grad_enabled(
        torch.is_grad_enabled() and objective.alpha > 0
    ):  # alpha = 0: CE only, divergence is logged
        divergence = objective.divergence(student, teacher, flat_labels).sum() / denominator

    ce = None
    if objective.needs_ce(labels is not None, return_components):
        check_label_ids(flat_labels, vocab, objective.ignore_index)
        with torch.set_grad_enabled(
            torch.is_grad_enabled() and objective.alpha < 1
        ):  # monitoring-only CE keeps no graph
            ce = F.cross_entropy(student, flat_labels, reduction="sum") / denominator
    total = objective.combine(divergence, ce)
    if return_components:
        return total, divergence.detach(), None if ce is None else ce.detach()
    return total

"""The divergences, one small class each, in a registry keyed by the name a recipe's ``loss_type`` uses.

A divergence class is the dataclass of its own parameters (``JSD(beta=0.5)``); an instance is a configured divergence.
It says:

* :meth:`Divergence.per_row` -- its value per row ``[N]`` from both sides' log-probabilities at temperature T
  (``log_softmax(logits / T)``, ``[N, V]``; the teacher's never receive a gradient), and the raw logits for those
  that compare logits (``mse``);
* ``on_buckets`` -- whether it is defined on a distribution collapsed onto buckets (a top-k teacher cache's ``k + 1``
  buckets, a cross-tokenizer span's two): ``mse`` compares raw logits, which buckets do not have;
* ``temperature_scaled`` -- whether the objective multiplies it by ``T**2`` (``scale_by_temperature``);
* ``knobs`` -- which :class:`~hf_kd.objective.losses.Objective` field sets a parameter that ``divergence_params``
  does not (``jsd_beta`` -> ``JSD.beta``): the classic knobs keep working.

Conventions (``p_t = softmax(teacher / T)``, ``p_s = softmax(student / T)``):

* A teacher log-probability of ``-inf`` is a token the teacher never produces (``p_t = 0``): forward KL, JSD, the skew
  KLs and TVD are exact; ``reverse_kl`` floors the teacher's log-probability there at the log of the dtype's smallest
  normal number (-87.3 in float32), so student mass on it costs ~87 nats per unit instead of infinity; ``mse``
  averages over the teacher's unmasked logits only. NaN and ``+inf`` are faults: they make the value NaN.
* ``mse`` is the *mean over the vocabulary* of the squared raw-logit difference, temperature-free. With that
  normalization ``T**2 * forward_kl -> mse / 2`` as ``T -> inf`` for zero-mean logits (Hinton et al. 2015; Kim et al.
  2021), rather than a V-times larger cousin of it.
* ``jsd`` is continuous in ``beta``: ``beta = 0`` and ``beta = 1`` both give 0 (TRL's ``generalized_jsd_loss``
  special-cases them as forward/reverse KL instead).

A new divergence is a class in the user's own module, registered with :func:`register_divergence`; every loss path
(dense, cached top-k, fused, cross-tokenizer) then takes it by name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities ``[N, V]`` -> ``[N]``; entries where p is exactly 0 contribute 0, and a
    NaN anywhere stays NaN (a poisoned teacher must show in the value, not only in the gradient)."""
    p = log_p.exp()
    return torch.where(p == 0, 0.0, p * (log_p - log_q)).sum(-1)


def floored(log_p: torch.Tensor) -> torch.Tensor:
    """Log-probabilities with -inf (a masked token, probability exactly 0) raised to the log of the dtype's smallest
    normal number (-87.3 in float32): the cost of mass on a masked token is large but finite. Finite values, however
    small (log_softmax of finite logits is finite), are kept: the loss of an unmasked teacher does not change."""
    return log_p.masked_fill(log_p == -math.inf, math.log(torch.finfo(log_p.dtype).tiny))


def log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed in log space so that tiny probabilities do not underflow."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _unit_interval(owner: str, name: str, value) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0):
        raise ValueError(f"{owner}: {name} must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class Divergence:
    """The interface (see the module docstring). Subclasses are frozen dataclasses of their parameters."""

    name: ClassVar[str] = ""
    on_buckets: ClassVar[bool] = True
    temperature_scaled: ClassVar[bool] = True
    uses_log_probs: ClassVar[bool] = True  # False: per_row reads only the raw logits (no log_softmax is made for it)
    # True: per_row also takes targets= [N], each row's sampled token (its column in the rows), and needs labels
    reads_targets: ClassVar[bool] = False
    knobs: ClassVar[dict[str, str]] = {}  # parameter -> the Objective field that sets it by default

    def per_row(
        self, log_p_s: torch.Tensor, log_p_t: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor
    ) -> torch.Tensor:
        """``[N]`` from ``[N, V]`` log-probabilities at T (``log_p_t`` detached) and the raw logits they came from."""
        raise NotImplementedError

    @classmethod
    def configured(cls, params: dict, objective_fields: dict) -> Divergence:
        """An instance from ``divergence_params[name]`` (``params``), each knob defaulting to its Objective field."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - fields)
        if unknown:
            known = ", ".join(sorted(fields)) or "none"
            raise ValueError(f"divergence_params: {cls.name} has no parameter {unknown[0]!r} (its parameters: {known})")
        defaults = {param: objective_fields[knob] for param, knob in cls.knobs.items() if param not in params}
        return cls(**defaults, **params)


DIVERGENCES: dict[str, type[Divergence]] = {}  # loss_type name -> class


def register_divergence(cls: type[Divergence]) -> type[Divergence]:
    """Add a divergence class under ``cls.name`` (a class decorator); a name already taken is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Divergence) and cls.name):
        raise TypeError("register_divergence takes a Divergence subclass with a name")
    if DIVERGENCES.get(cls.name, cls) is not cls:
        raise ValueError(
            f"a divergence named {cls.name!r} is registered already ({DIVERGENCES[cls.name].__qualname__})"
        )
    DIVERGENCES[cls.name] = cls
    return cls


@register_divergence
@dataclass(frozen=True)
class ForwardKL(Divergence):
    """KL(p_t || p_s): mass-covering; the classic KD objective."""

    name: ClassVar[str] = "forward_kl"

    def per_row(self, log_p_s, log_p_t, student, teacher):
        return kl(log_p_t, log_p_s)


@register_divergence
@dataclass(frozen=True)
class ReverseKL(Divergence):
    """KL(p_s || p_t): mode-seeking. Infinite where p_t = 0 < p_s: the teacher's floor instead (module docstring)."""

    name: ClassVar[str] = "reverse_kl"

    def per_row(self, log_p_s, log_p_t, student, teacher):
        return kl(log_p_s, floored(log_p_t))


@register_divergence
@dataclass(frozen=True)
class ReverseKLSampled(Divergence):
    """KL(p_s || p_t) estimated at the token the student sampled: for teachers known only at a few tokens (a vLLM
    server's or a cache's top-k, with a tail bucket), on-policy (each completion token y is a sample of p_s).

    Value per position: ``r(y) = log p_s(y) - log p_t(y)``; its expectation over ``y ~ p_s`` is
    ``sum_y p_s(y) r(y) = KL(p_s || p_t)``, exactly. Gradient (w.r.t. the student's logits z):

        grad KL = sum_y grad p_s(y) r(y) + sum_y p_s(y) grad log p_s(y)
                = E_{y ~ p_s}[r(y) grad log p_s(y)] + grad sum_y p_s(y)      (grad p = p grad log p)
                = E_{y ~ p_s}[r(y) grad log p_s(y)]                          (sum_y p_s(y) = 1: its gradient is 0)

    so each position backpropagates ``r(y).detach() * grad log p_s(y)`` (REINFORCE, the score function), whose
    expectation is the exact gradient; the term ``grad log p_s(y)`` that differentiating ``r`` itself would add has
    expectation 0 and only adds variance, so it is left out. The value is ``r(y)``: the loss logs the estimate.
    A teacher log-probability of -inf is floored as in ``reverse_kl``. On a top-k teacher's buckets (:mod:`sparse`)
    ``y`` outside the top-k gets the tail mass spread uniformly: ``log p_t(y) = tail - log(V - k)``.
    """

    name: ClassVar[str] = "reverse_kl_sampled"
    reads_targets: ClassVar[bool] = True

    def per_row(self, log_p_s, log_p_t, student, teacher, targets=None):
        index = targets.unsqueeze(-1)
        log_s = log_p_s.gather(-1, index).squeeze(-1)
        ratio = (log_s - floored(log_p_t).gather(-1, index).squeeze(-1)).detach()
        return ratio + ratio * (log_s - log_s.detach())  # the value r(y), the gradient r(y) * grad log p_s(y)


@register_divergence
@dataclass(frozen=True)
class JSD(Divergence):
    """Generalized Jensen-Shannon: beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta * p_t + (1 - beta) * p_s."""

    name: ClassVar[str] = "jsd"
    knobs: ClassVar[dict[str, str]] = {"beta": "jsd_beta"}
    beta: float = 0.5

    def __post_init__(self):
        _unit_interval("jsd", "beta", self.beta)

    def per_row(self, log_p_s, log_p_t, student, teacher):
        log_m = log_mix(log_p_t, log_p_s, self.beta)
        term = log_p_s.new_zeros(log_p_s.shape[:-1])
        if self.beta > 0:  # a zero-weight term is skipped, not multiplied by 0 (0 * inf would be nan)
            term = term + self.beta * kl(log_p_t, log_m)
        if self.beta < 1:
            term = term + (1 - self.beta) * kl(log_p_s, log_m)
        return term


@register_divergence
@dataclass(frozen=True)
class SkewForwardKL(Divergence):
    """KL(p_t || lam * p_t + (1 - lam) * p_s) (Ko et al. 2024, DistiLLM)."""

    name: ClassVar[str] = "skew_forward_kl"
    knobs: ClassVar[dict[str, str]] = {"lam": "skew_lambda"}
    lam: float = 0.1

    def __post_init__(self):
        _unit_interval("skew_forward_kl", "lam", self.lam)

    def per_row(self, log_p_s, log_p_t, student, teacher):
        return kl(log_p_t, log_mix(log_p_t, log_p_s, self.lam))


@register_divergence
@dataclass(frozen=True)
class SkewReverseKL(Divergence):
    """KL(p_s || lam * p_s + (1 - lam) * p_t); at lam = 0 the mix is p_t itself: floored like reverse_kl."""

    name: ClassVar[str] = "skew_reverse_kl"
    knobs: ClassVar[dict[str, str]] = {"lam": "skew_lambda"}
    lam: float = 0.1

    def __post_init__(self):
        _unit_interval("skew_reverse_kl", "lam", self.lam)

    def per_row(self, log_p_s, log_p_t, student, teacher):
        return kl(log_p_s, floored(log_mix(log_p_s, log_p_t, self.lam)))


@register_divergence
@dataclass(frozen=True)
class TVD(Divergence):
    """Total variation: half the L1 distance between the distributions."""

    name: ClassVar[str] = "tvd"

    def per_row(self, log_p_s, log_p_t, student, teacher):
        return 0.5 * (log_p_t.exp() - log_p_s.exp()).abs().sum(-1)


@register_divergence
@dataclass(frozen=True)
class MSE(Divergence):
    """Mean over the vocabulary of the squared raw-logit difference (temperature-free; the T -> inf limit of
    ``2 * T**2 * forward_kl``). A masked teacher logit (-inf) has no value to match: the mean runs over the others."""

    name: ClassVar[str] = "mse"
    on_buckets: ClassVar[bool] = False
    temperature_scaled: ClassVar[bool] = False
    uses_log_probs: ClassVar[bool] = False

    def per_row(self, log_p_s, log_p_t, student, teacher):
        unmasked = teacher != -math.inf
        return torch.where(unmasked, student - teacher, 0.0).pow(2).sum(-1) / unmasked.sum(-1)


def uld_distance(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """``[N, V_s]`` and ``[N, V_t]`` probabilities -> ``[N]`` L1 distance between them sorted in decreasing order, the
    shorter padded with zeros (the closed-form Wasserstein distance of ULD, which needs no vocabulary mapping)."""
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    pad = torch.nn.functional.pad
    sorted_s = pad(student_probs.sort(-1, descending=True).values, (0, width - student_probs.shape[-1]))
    sorted_t = pad(teacher_probs.sort(-1, descending=True).values, (0, width - teacher_probs.shape[-1]))
    return (sorted_s - sorted_t.detach()).abs().sum(-1)


@register_divergence
@dataclass(frozen=True)
class ULD(Divergence):
    """Universal Logit Distillation (Boizard et al. 2024): the L1 distance between the two distributions' sorted
    probabilities at T, not ``T**2``-scaled. Needs no shared vocabulary (the widths may differ): the cross-tokenizer
    loss's ULD term; on buckets it would sort buckets, which means nothing, so it refuses them."""

    name: ClassVar[str] = "uld"
    on_buckets: ClassVar[bool] = False
    temperature_scaled: ClassVar[bool] = False

    def per_row(self, log_p_s, log_p_t, student, teacher):
        return uld_distance(log_p_s.exp(), log_p_t.exp())

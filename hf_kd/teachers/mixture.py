"""The ``mixture`` teacher: several teachers at once, their distributions mixed per token with fixed weights.

The target is ``m = sum_i w_i p_i`` with ``p_i = softmax(z_i / T)`` (exact: the log of the weighted sum of
probabilities, never a mix of logits). The loss's divergences read a teacher through ``log_softmax(x / T)``, so the
mixture hands them ``x = T log m``, whose ``log_softmax(x / T)`` is ``log m`` itself: every divergence on
log-probabilities, on every path (dense, and the fused driver chunk by chunk, never ``[tokens, vocab]`` at once).
``mse`` compares raw logits, which a mixture does not have: refused.

Each member is a teacher of a kind whose signal is a full distribution over the student's vocabulary: ``model``,
``self`` or ``served`` (a top-k cache's buckets and another tokenizer's positions are not rows of one vocabulary).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from hf_kd.errors import SetupError
from hf_kd.objective.chunking import SOURCES, ChunkTeacher
from hf_kd.objective.losses import Objective, distillation_loss
from hf_kd.objective.signals import StudentHidden, TeacherLogits
from hf_kd.objective.terms import full_logits, signal_of
from hf_kd.teachers.registry import Teacher, make_teacher, register_teacher

# a member's recipe keys -> the DistillationConfig fields a single teacher reads them from
MEMBER_FIELDS = {
    "name_or_path": "teacher_model_name_or_path",
    "init_kwargs": "teacher_model_init_kwargs",
    "tokenizer": "teacher_tokenizer_name_or_path",
    "cache": "teacher_cache",
    "kind": "teacher_kind",
    "options": "teacher_options",
}


def mixed_log_probs(logits: Sequence[torch.Tensor], weights: Sequence[float], temperature: float) -> torch.Tensor:
    """``[N, V]`` logits of each member -> ``log sum_i w_i softmax(z_i / T)`` ``[N, V]`` (weights summing to 1)."""
    parts = [
        torch.log_softmax(z / temperature if temperature != 1 else z, -1) + math.log(w)
        for z, w in zip(logits, weights)
        if w > 0
    ]
    return torch.logsumexp(torch.stack(parts), dim=0)


@dataclass(frozen=True)
class TeacherMixture:
    """The members' signals for one batch (each ``[..., V]`` aligned with the targets) and their weights."""

    signals: tuple
    weights: tuple[float, ...]

    def terms(
        self,
        student,
        labels,
        objective: Objective,
        *,
        num_items_in_batch=None,
        chunk_size: int = 256,
        vocab_size: int | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """:func:`hf_kd.objective.terms.objective_terms` for the mixture: the fused driver with this signal as its
        source (hidden-state students), or the dense loss on the mixture's full ``T log m``."""
        raw = [d.name for d in objective.divergences.values() if not d.uses_log_probs]
        if raw:  # also for a MixtureTeacher made in Python (an object is not set up by make_teacher)
            raise ValueError(
                f"loss_type: {', '.join(raw)} compares raw logits, which a mixture of teachers does not have"
            )
        names = ("loss", "distill_loss", "ce_loss")
        if isinstance(student, StudentHidden):
            from hf_kd.objective.fused import fused_objective

            values = fused_objective(
                student,
                self,
                labels,
                objective,
                num_items_in_batch=num_items_in_batch,
                chunk_size=chunk_size,
                vocab_size=vocab_size,
                return_components=True,
            )
            return dict(zip(names, values))
        members = [s.logits if isinstance(s, TeacherLogits) else full_logits(s.hidden, s.head) for s in self.signals]
        members = [z[..., :vocab_size].float() for z in members]
        teacher = objective.temperature * mixed_log_probs(members, self.weights, objective.temperature)
        values = distillation_loss(
            student[..., :vocab_size],
            teacher,
            labels,
            objective=objective,
            num_items_in_batch=num_items_in_batch,
            return_components=True,
        )
        return dict(zip(names, values))

    def check_against(self, student_hidden: torch.Tensor, objective: Objective) -> tuple[str, int]:
        """What :func:`hf_kd.objective.fused.check_teacher` checks of each member; the mixture's vocabulary is the
        members' smallest."""
        from hf_kd.objective.fused import check_teacher

        rows = [check_teacher(signal, student_hidden, objective)[1] for signal in self.signals]
        return "teacher_weight", min(rows)

    @staticmethod
    def chunk_source(mixture: TeacherMixture, keep, plan):
        """The driver's source: each chunk's members' logits (their own sources, one at a time in the same buffer),
        mixed into ``T log m`` in the buffer the divergence may overwrite."""
        members = [SOURCES[type(signal)](signal, keep, plan) for signal in mixture.signals]
        temperature = plan.objective.temperature

        def chunk(rows: slice, scratch) -> ChunkTeacher:
            mixed = None
            for member, weight in zip(members, mixture.weights):
                if weight <= 0:
                    continue
                values = member(rows, scratch).values  # [chunk, V] in the "teacher" buffer, overwritten next member
                part = torch.log_softmax(values / temperature if temperature != 1 else values, -1).add_(
                    math.log(weight)
                )
                mixed = part if mixed is None else torch.logaddexp(mixed, part, out=mixed)
            out = scratch("teacher", mixed.shape[0]).copy_(mixed)
            return ChunkTeacher(out.mul_(temperature) if temperature != 1 else out)

        return chunk


@register_teacher
class MixtureTeacher(Teacher):
    """``teacher_options``: ``teachers`` (a list of member sections: ``name_or_path``, ``kind``, ``url``, ...) and
    ``weights`` (one per member, >= 0; normalized to sum to 1; default equal). Python: ``MixtureTeacher(members,
    weights)`` with built teachers, or ``teacher_model=[model_a, model_b]`` with ``teacher_kind="mixture"``."""

    kind = "mixture"

    def __init__(self, members: Sequence[Teacher], weights: Sequence[float] | None = None, task=None):
        weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        if len(members) < 2 or len(weights) != len(members):
            raise SetupError("teacher_options", "a mixture needs two teachers or more and one weight for each")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) == 0:
            raise SetupError("teacher_options", f"mixture weights must be >= 0, not all 0; got {weights}")
        vocabularies = {member.vocab_size for member in members}
        if len(vocabularies) > 1:
            raise SetupError(
                "teacher_options",
                f"the mixture's teachers distill over different vocabularies "
                f"({sorted(map(str, vocabularies))}); mix teachers of one vocabulary",
            )
        self.members, self.weights = list(members), tuple(w / sum(weights) for w in weights)
        self.vocab_size, self.task = vocabularies.pop(), task
        self.name = " + ".join(f"{m.name} ({w:g})" for m, w in zip(members, self.weights))

    @classmethod
    def check_setup(cls, trainer, source) -> None:
        raw = [d.name for d in trainer.objective.divergences.values() if not d.uses_log_probs]
        if raw:
            raise SetupError(
                "loss_type",
                f"{', '.join(raw)} compares raw logits, which a mixture of teachers does "
                "not have; use a divergence on probabilities (forward_kl, reverse_kl, jsd, ...)",
            )
        if trainer.args.generates and trainer.args.seq_kd:
            raise SetupError("seq_kd", "a mixture of teachers cannot write one completion; use on-policy (lmbda)")

    @classmethod
    def build(cls, trainer, source) -> Teacher:
        options = trainer.args.teacher_options or {}
        specs = options.get("teachers")
        if isinstance(source, (list, tuple)):  # Python: teacher_model=[model_a, "path/b", ...]
            specs = [{"model": member} for member in source]
        if not isinstance(specs, list) or not all(isinstance(spec, Mapping) for spec in specs):
            raise SetupError("teacher_options", "a mixture needs teachers: a list of teacher sections")
        members = [_member(trainer, spec, index) for index, spec in enumerate(specs)]
        return cls(members, options.get("weights"), trainer.task_spec)

    def attach(self, trainer) -> None:
        """A mixture made in Python: the trainer's task aligns its members' outputs; its refusals apply."""
        self.task = self.task or trainer.task_spec
        type(self).check_setup(trainer, None)

    def prefetch(self, batch) -> None:
        for member in self.members:
            member.prefetch(batch)

    def run(self, inputs, forward, targets):
        signals = tuple(signal_of(m.run(inputs, forward, targets), m.model, self.task) for m in self.members)
        return TeacherMixture(signals, self.weights)

    def describe(self) -> dict[str, str]:
        return {"teachers (per-token mixture)": self.name}


def _member(trainer, spec: Mapping, index: int) -> Teacher:
    """Member ``index`` built as a single teacher: the trainer as it is, with the member's teacher settings."""
    unknown = set(spec) - set(MEMBER_FIELDS) - {"model", "url", "token_file"}
    if unknown:
        raise SetupError(
            "teacher_options",
            f"teachers[{index}]: unknown key {sorted(unknown)[0]!r} (keys: "
            f"{', '.join(MEMBER_FIELDS)}, url, token_file)",
        )
    args = copy.copy(trainer.args)  # a shallow copy: only the teacher fields differ
    for field in MEMBER_FIELDS.values():
        setattr(args, field, None)
    for key, field in MEMBER_FIELDS.items():
        if spec.get(key) is not None:
            setattr(args, field, spec[key])
    if spec.get("url"):
        args.teacher_kind, args.teacher_options = (
            "served",
            {**(spec.get("options") or {}), "url": spec["url"], "token_file": spec.get("token_file")},
        )
    view = SimpleNamespace(
        **{
            name: getattr(trainer, name)
            for name in (
                "task",
                "task_spec",
                "model",
                "accelerator",
                "processing_class",
                "train_dataset",
                "eval_dataset",
                "objective",
            )
        },
        args=args,
    )
    source = spec.get("model", args.teacher_model_name_or_path)
    member = make_teacher(view, source)
    if member.kind not in ("model", "self", "served"):
        raise SetupError(
            "teacher_options",
            f"teachers[{index}] is a {member.kind} teacher; a mixture mixes full "
            "distributions over the student's vocabulary (model, self or served teachers)",
        )
    return member

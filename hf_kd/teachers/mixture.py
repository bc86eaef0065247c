"""The ``mixture`` teacher: several teachers at once, their distributions mixed per token with fixed weights, or
routed one teacher per example by the batch column ``teacher_id`` (``routed: true``). How a batch's signals become
the target, and the per-teacher logs: :mod:`hf_kd.teachers.mixing`.

A ``teacher_id`` is a member's index (an int, from 0) or its ``name`` (a str; a member without one is named by its
index); one kind per dataset. An id that names no member, or a routed run whose data has no ``teacher_id`` column, is
refused with one line at setup (a dataset that can be scanned) or at the first batch that shows it.

Each member is a teacher of a kind whose signal is a full distribution over the student's vocabulary: ``model``,
``self`` or ``served`` (a top-k cache's buckets and another tokenizer's positions are not rows of one vocabulary).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import torch

from hf_kd.errors import SetupError
from hf_kd.models.tasks import TEACHER_ID
from hf_kd.objective.terms import signal_of
from hf_kd.teachers.mixing import TeacherMixture, mixed_log_probs  # noqa: F401 (mixed_log_probs: importable here)
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


@register_teacher
class MixtureTeacher(Teacher):
    """``teacher_options``: ``teachers`` (a list of member sections: ``name_or_path``, ``kind``, ``url``, ``name``,
    ...) and either ``weights`` (one per member, >= 0; normalized to sum to 1; default equal) or ``routed: true``
    (each example's ``teacher_id`` column picks its teacher). Python: ``MixtureTeacher(members, weights)`` with built
    teachers, or ``teacher_model=[model_a, model_b]`` with ``teacher_kind="mixture"``."""

    kind = "mixture"

    def __init__(
        self,
        members: Sequence[Teacher],
        weights: Sequence[float] | None = None,
        task=None,
        *,
        names: Sequence[str] | None = None,
        routed: bool = False,
    ):
        if routed and weights is not None:
            raise SetupError("teacher_options", "give weights or routed: true, not both (routing picks one teacher)")
        weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        if len(members) < 2 or len(weights) != len(members):
            raise SetupError("teacher_options", "a mixture needs two teachers or more and one weight for each")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) == 0:
            raise SetupError("teacher_options", f"mixture weights must be >= 0, not all 0; got {weights}")
        names = [str(i) for i in range(len(members))] if names is None else [str(n) for n in names]
        if len(names) != len(members) or len(set(names)) != len(names):
            raise SetupError("teacher_options", f"the teachers' names must be distinct, one per teacher; got {names}")
        vocabularies = {member.vocab_size for member in members}
        if len(vocabularies) > 1:
            raise SetupError(
                "teacher_options",
                f"the mixture's teachers distill over different vocabularies "
                f"({sorted(map(str, vocabularies))}); mix teachers of one vocabulary",
            )
        self.members, self.weights = list(members), tuple(w / sum(weights) for w in weights)
        self.names, self.routed = tuple(names), bool(routed)
        self.columns = (TEACHER_ID,) if routed else ()
        self.vocab_size, self.task = vocabularies.pop(), task
        if routed:
            self.name = " | ".join(f"{m.name} [{n}]" for m, n in zip(members, names))
        else:
            self.name = " + ".join(f"{m.name} ({w:g})" for m, w in zip(members, self.weights))

    @classmethod
    def check_setup(cls, trainer, source) -> None:
        raw = [d.name for d in trainer.objective.divergences.values() if not d.uses_log_probs]
        if raw and not (trainer.args.teacher_options or {}).get("routed"):
            raise SetupError(
                "loss_type",
                f"{', '.join(raw)} compares raw logits, which a mixture of teachers does "
                "not have; use a divergence on probabilities (forward_kl, reverse_kl, jsd, ...)",
            )
        if trainer.args.generates and trainer.args.seq_kd:
            raise SetupError("seq_kd", "a mixture of teachers cannot write one completion; use on-policy (lmbda)")

    @classmethod
    def build(cls, trainer, source) -> Teacher:
        options = dict(trainer.args.teacher_options or {})
        unknown = sorted(set(options) - {"teachers", "weights", "routed"})
        if unknown:
            raise SetupError("teacher_options", f"a mixture has no option {unknown[0]!r} (teachers, weights, routed)")
        specs = options.get("teachers")
        if isinstance(source, (list, tuple)):  # Python: teacher_model=[model_a, "path/b", ...]
            specs = [{"model": member} for member in source]
        if not isinstance(specs, list) or not all(isinstance(spec, Mapping) for spec in specs):
            raise SetupError("teacher_options", "a mixture needs teachers: a list of teacher sections")
        members = [_member(trainer, spec, index) for index, spec in enumerate(specs)]
        names = [spec.get("name", str(index)) for index, spec in enumerate(specs)]
        teacher = cls(
            members, options.get("weights"), trainer.task_spec, names=names, routed=bool(options.get("routed"))
        )
        teacher.check_data(trainer.train_dataset)
        teacher.check_data(trainer.eval_dataset)
        return teacher

    def attach(self, trainer) -> None:
        """A mixture made in Python: the trainer's task aligns its members' outputs; its refusals apply."""
        self.task = self.task or trainer.task_spec
        type(self).check_setup(trainer, None)
        self.check_data(trainer.train_dataset)

    def check_data(self, dataset) -> None:
        """A routed mixture refuses, before training, a dataset (map-style, or a dict of them) without the
        ``teacher_id`` column or with an id that names no teacher; streamed data is checked batch by batch."""
        if not self.routed or dataset is None:
            return
        for data in dataset.values() if isinstance(dataset, Mapping) else [dataset]:
            columns = getattr(data, "column_names", None)
            if columns is None or not hasattr(data, "unique"):
                continue
            if TEACHER_ID not in columns:
                raise SetupError(TEACHER_ID, self._missing())
            self.route(list(data.unique(TEACHER_ID)))

    def _missing(self) -> str:
        return (
            f"routing between teachers reads each example's {TEACHER_ID} column, which the data lacks; add it "
            f"(a member index or name: {', '.join(self.names)}), or mix the teachers by weights instead"
        )

    def route(self, ids) -> torch.Tensor:
        """A batch's ``teacher_id`` values (a long tensor of indices, or a list of names) -> ``[B]`` member indices;
        an id that names no member is a :class:`SetupError` naming the column."""
        if isinstance(ids, torch.Tensor):
            bad = ids[(ids < 0) | (ids >= len(self.members))]
            if bad.numel():
                raise SetupError(TEACHER_ID, self._unknown(bad[0].item()))
            return ids.long()
        indices = []
        for value in ids:
            if isinstance(value, str) and value in self.names:
                indices.append(self.names.index(value))
            elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.members):
                indices.append(value)
            else:
                raise SetupError(TEACHER_ID, self._unknown(value))
        return torch.tensor(indices, dtype=torch.long)

    def _unknown(self, value) -> str:
        return (
            f"{value!r} names no teacher; use an index 0..{len(self.members) - 1} or a member name "
            f"({', '.join(self.names)}) in every example's {TEACHER_ID}"
        )

    def modules(self) -> list:
        return [module for member in self.members for module in member.modules()]

    def prefetch(self, batch) -> None:
        for member in self.members:
            member.prefetch(batch)

    def run(self, inputs, forward, targets):
        route = None
        if self.routed:
            if TEACHER_ID not in inputs:
                raise SetupError(TEACHER_ID, self._missing())
            route = self.route(inputs[TEACHER_ID]).to(inputs["input_ids"].device)
        signals = tuple(signal_of(m.run(inputs, forward, targets), m.model, self.task) for m in self.members)
        return TeacherMixture(signals, self.weights, self.names, route)

    def describe(self) -> dict[str, str]:
        if self.routed:
            return {f"teachers (one per example, routed by {TEACHER_ID})": self.name}
        return {"teachers (per-token mixture)": self.name}


def _member(trainer, spec: Mapping, index: int) -> Teacher:
    """Member ``index`` built as a single teacher: the trainer as it is, with the member's teacher settings."""
    unknown = set(spec) - set(MEMBER_FIELDS) - {"model", "url", "token_file", "name"}
    if unknown:
        raise SetupError(
            "teacher_options",
            f"teachers[{index}]: unknown key {sorted(unknown)[0]!r} (keys: "
            f"{', '.join(MEMBER_FIELDS)}, url, token_file, name)",
        )
    if spec.get("url") and spec.get("kind") not in (None, "served"):
        raise SetupError(
            "teacher_options",
            f"teachers[{index}] has url and kind {spec['kind']!r}: a url makes a served teacher; remove one of them",
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
            f"teachers[{index}] is a {member.kind} teacher; several teachers (mixed or routed) need full "
            "distributions over the student's vocabulary (model, self or served teachers)",
        )
    return member

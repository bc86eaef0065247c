"""The teacher interface, the registry of teacher kinds, and the one function that gives a trainer its teacher.

A kind of teacher is one class in one module, registered under the name a recipe's ``teacher.kind`` uses
(``TEACHERS["cache"]``). Built from what the trainer was given (:meth:`Teacher.build`), it refuses what it cannot do
(:meth:`Teacher.check_setup`, before anything is loaded), hands the loss its view of each batch (:meth:`Teacher.run`:
model outputs, or a signal of :mod:`hf_kd.objective.signals` aligned with the student's targets), and describes itself
for the logs, ``hf-kd check`` and the model card (:meth:`Teacher.describe`). The trainer, the CLI and the card ask the
object, never the kind.

Built-in kinds: ``model`` (a frozen model; another tokenizer makes it ``cross_tokenizer``), ``self`` (the student's
base model, adapters off), ``cache`` (top-k log-probabilities on disk), ``cross_tokenizer``, ``served`` (a teacher
in another process, ``hf-kd serve-teacher``, answering with hidden states), ``mixture`` (several teachers, their
distributions mixed per token).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from hf_kd.errors import SetupError

Forward = Callable[[nn.Module, Mapping[str, Any]], Any]  # the trainer's forward: (model, inputs) -> outputs


class Teacher:
    """The interface. ``name``: an id, a path or ``"self"``; ``model``: the module to run (``None`` without one);
    ``vocab_size``: ``None`` when teacher and student logits have the same width, else the shared prefix;
    ``columns``: dataset columns it reads beside the model inputs (a routed mixture's ``teacher_id``)."""

    kind: ClassVar[str] = ""
    name: str | None = None
    model: nn.Module | None = None
    vocab_size: int | None = None
    columns: tuple[str, ...] = ()  # batch columns it reads that no model does (kept by the Trainer, never forwarded)

    @classmethod
    def check_setup(cls, trainer, source) -> None:
        """Raise a :class:`SetupError` for what this kind cannot do with the trainer's task, objective and generation
        settings (``trainer.task``, ``trainer.args``), before anything is loaded. ``source``: what the trainer was
        given as ``teacher_model`` (a module, a path, ``"self"`` or ``None``)."""

    @classmethod
    def build(cls, trainer, source) -> Teacher:
        """The teacher for ``trainer`` (its args, its student, its accelerator) from ``source``."""
        raise NotImplementedError

    def attach(self, trainer) -> None:
        """Called when a teacher object made outside :func:`make_teacher` (``teacher_model=<a Teacher>``) joins a
        trainer: take what it needs of it, refuse what cannot work (nothing, by default)."""

    def prefetch(self, batch) -> None:
        """Called when a training micro-batch exists, before the student's forward: a teacher in another process may
        send its request now and leave the answer in ``batch.teacher_answers[id(self)]`` for :meth:`run`."""

    def run(self, inputs: Mapping[str, Any], forward: Forward, targets: torch.Tensor | None):
        """The teacher's view of a batch, without a graph: model outputs (``logits``, and ``final_hidden_state`` on
        the fused path) or a signal. ``targets``: the aligned labels ``[B, S - 1]`` (a cache looks them up)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def generating(self) -> Iterator[nn.Module]:
        """The module that writes sequence-level KD completions (``seq_kd``)."""
        if self.model is None:
            raise SetupError("seq_kd", f"a {self.kind} teacher cannot generate completions; distill from a model")
        yield self.model

    def modules(self) -> list[nn.Module]:
        """Every model this teacher runs (whether the fused loss applies reads their heads): its model, if any."""
        return [] if self.model is None else [self.model]

    def describe(self) -> dict[str, str]:
        """What the model card (and the logs) add about this teacher beyond its name: ``{label: text}``."""
        return {"teacher kind": self.kind}

    def cached_outputs(self) -> dict[str, Any] | None:
        """``{"k", "path", "vocab_size"}`` when the student learns from stored top-k outputs, not the model."""
        return None


TEACHERS: dict[str, type[Teacher]] = {}  # teacher.kind -> class


def register_teacher(cls: type[Teacher]) -> type[Teacher]:
    """Add a teacher kind under ``cls.kind`` (a class decorator); a name already taken is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Teacher) and cls.kind):
        raise TypeError("register_teacher takes a Teacher subclass with a kind")
    if TEACHERS.get(cls.kind, cls) is not cls:
        raise ValueError(f"a teacher kind named {cls.kind!r} is registered already ({TEACHERS[cls.kind].__qualname__})")
    TEACHERS[cls.kind] = cls
    return cls


def teacher_kind(name: str) -> type[Teacher]:
    """The class of kind ``name``; ``"package.module:kind"`` imports the module first (where the kind registers)."""
    module, sep, kind = name.rpartition(":")
    if sep:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise SetupError("teacher_kind", f"cannot import {module!r} for teacher kind {kind!r}: {err}") from None
    if kind not in TEACHERS:
        raise SetupError(
            "teacher_kind",
            f"unknown teacher kind {kind!r}; registered: {', '.join(TEACHERS)} (a kind of "
            "your own: 'your.module:kind', a module that calls hf_kd.register_teacher)",
        )
    return TEACHERS[kind]


def make_teacher(trainer, source) -> Teacher:
    """The trainer's teacher: ``source`` itself when it is a :class:`Teacher`; else the kind ``args.teacher_kind``
    names; else ``cache`` with ``args.teacher_cache``, ``self`` for ``"self"``, ``model`` otherwise."""
    if isinstance(source, Teacher):
        source.attach(trainer)
        return source
    args = trainer.args
    if args.teacher_kind is not None:
        cls = teacher_kind(args.teacher_kind)
    elif args.teacher_cache is not None:
        cls = TEACHERS["cache"]
    elif isinstance(source, str) and source == "self":
        cls = TEACHERS["self"]
    else:
        cls = TEACHERS["model"]
    cls.check_setup(trainer, source)
    return cls.build(trainer, source)

"""The kinds of teacher behind one small interface.

Every teacher knows its name (for the model card), the module whose head the fused loss may read (``model``), the
vocabulary it shares with the student, and how to run on a batch (:meth:`Teacher.run`). What ``run`` returns is either
a model's outputs (``logits``, and ``final_hidden_state`` on the fused path) or a :mod:`hf_kd.targets` signal; the
trainer turns model outputs into a signal itself, so an override of ``teacher_forward`` can return plain model outputs.

* :class:`ModelTeacher` -- a frozen model (loaded by :func:`hf_kd.models.load_model` from a path, or given).
* :class:`SelfTeacher` -- the student's own base model: its PEFT adapters disabled (one copy of the weights).
* :class:`CachedTeacher` -- top-k log-probabilities read from a :class:`hf_kd.cache.TeacherCache` (no model at all).
* :class:`CrossTokenizerTeacher` -- a frozen model with its own tokenizer: each batch is decoded, re-tokenized for it
  and aligned (:mod:`hf_kd.alignment`); it hands the loss a :class:`hf_kd.targets.TeacherAligned`.

:func:`make_teacher` picks and checks the kind from what the trainer was given.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .adapters import SELF_TEACHER, adapters_disabled, require_adapters
from .alignment import align_batch
from .cache_store import TeacherCache
from .config import SetupError
from .cross_tokenizer import CrossTokenizerWeights
from .distributed import prepare_teacher
from .models import freeze, lm_head_spec, load_model, num_outputs
from .targets import TeacherAligned, TeacherHidden, TeacherLogits, TeacherTopK
from .vocabulary import same_ids, shared_vocabulary

logger = logging.getLogger(__name__)

Forward = Callable[[nn.Module, Mapping[str, Any]], Any]  # the trainer's forward: (model, inputs) -> outputs


class Teacher:
    """The interface. ``name``: an id, a path or ``"self"``; ``model``: the module to run (``None`` for a cache);
    ``vocab_size``: ``None`` when teacher and student logits have the same width, else the shared prefix."""

    name: str | None = None
    model: nn.Module | None = None
    vocab_size: int | None = None

    def run(self, inputs: Mapping[str, Any], forward: Forward, targets: torch.Tensor | None):
        """The teacher's view of a batch, without a graph. ``targets``: the aligned labels (a cache looks them up)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def generating(self) -> Iterator[nn.Module]:
        """The module that writes sequence-level KD completions (``seq_kd``)."""
        yield self.model


class ModelTeacher(Teacher):
    def __init__(self, model: nn.Module, name: str | None, vocab_size: int | None):
        self.model, self.name, self.vocab_size = model, name, vocab_size

    def run(self, inputs, forward, targets):
        self.model.eval()  # every step: nothing may switch dropout back on
        with torch.no_grad():
            return forward(self.model, inputs)


class SelfTeacher(Teacher):
    """The student's PeftModel run with its adapters disabled and dropout off, not through DDP (no gradient, nothing
    to synchronize)."""

    name = SELF_TEACHER

    def __init__(self, peft_model: nn.Module):
        self.model = peft_model

    def run(self, inputs, forward, targets):
        with torch.no_grad(), adapters_disabled(self.model) as base_model:
            return forward(base_model, inputs)

    @contextlib.contextmanager
    def generating(self):
        with adapters_disabled(self.model) as base_model:
            yield base_model


class CachedTeacher(Teacher):
    """This batch's cached top-k rows, found by the hash of each example's token ids (:meth:`TeacherCache.lookup`)."""

    def __init__(self, cache: TeacherCache, vocab_size: int | None):
        self.cache, self.name, self.vocab_size = cache, cache.name_or_path, vocab_size

    @contextlib.contextmanager
    def generating(self):
        raise SetupError("seq_kd", "a teacher cache cannot generate completions; distill from the live teacher")
        yield  # unreachable: a generator, so that this is a context manager like the others

    def run(self, inputs, forward, targets):
        rows = self.cache.lookup(inputs["input_ids"], inputs.get("attention_mask"), targets)
        return TeacherTopK(rows["topk_ids"], rows["topk_logprobs"], rows["tail_logprob"])


class CrossTokenizerTeacher(Teacher):
    """A frozen model whose tokenizer differs from the student's. ``run`` aligns the batch, runs the model on the
    teacher's tokens and returns a :class:`TeacherAligned` (its outputs shifted like the student's: position i predicts
    token i + 1)."""

    def __init__(self, model: nn.Module, name: str | None, student_tokenizer, teacher_tokenizer, weights):
        self.model, self.name = model, name
        self.student_tokenizer, self.tokenizer, self.weights = student_tokenizer, teacher_tokenizer, weights
        self.shared = shared_vocabulary(student_tokenizer, teacher_tokenizer)
        self._shared_on: dict[str, object] = {}  # the shared vocabulary's tensors per device, moved once

    def run(self, inputs, forward, targets):
        alignment = align_batch(inputs["input_ids"], inputs.get("attention_mask"), targets, self.student_tokenizer,
                                self.tokenizer, self.shared)  # fmt: skip
        device = inputs["input_ids"].device
        if str(device) not in self._shared_on:
            self._shared_on[str(device)] = self.shared.to(device)
        self.model.eval()
        with torch.no_grad():
            outputs = forward(self.model, alignment.teacher_inputs)
        if "final_hidden_state" in outputs:  # the fused path: logits are made chunk by chunk from these
            signal = TeacherHidden(outputs["final_hidden_state"][:, :-1], lm_head_spec(self.model)[0])
        else:
            signal = TeacherLogits(outputs["logits"][:, :-1])
        return TeacherAligned(signal, alignment, self._shared_on[str(device)], self.weights)

    @contextlib.contextmanager
    def generating(self):
        raise SetupError("seq_kd", "a teacher with another tokenizer cannot write the student's completions; use "
                         "on-policy distillation (lmbda) or the dataset's completions")  # fmt: skip
        yield  # unreachable: a generator, so that this is a context manager like the others


def make_teacher(trainer, teacher_model: nn.Module | str | None) -> Teacher:
    """The trainer's teacher from ``teacher_model`` (a module, a path, ``"self"``) or ``args.teacher_cache``."""
    args, task = trainer.args, trainer.task
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)  # processors wrap one
    if args.teacher_cache is not None:
        return _cached_teacher(trainer, teacher_model, tokenizer)
    if isinstance(teacher_model, str) and teacher_model == SELF_TEACHER:
        require_adapters(trainer.model)
        if args.teacher_model_init_kwargs:
            raise SetupError("teacher_model_init_kwargs",
                             "does not apply to teacher 'self' (the student's own weights)")  # fmt: skip
        if args.alpha == 1:
            logger.warning(
                "teacher 'self' with alpha=1: freshly initialized LoRA adapters (B = 0) make the student equal to its "
                "teacher, so loss and gradients start at 0; use alpha < 1 to learn from the labels while the "
                "divergence keeps the student close to its base model"
            )
        return SelfTeacher(trainer.accelerator.unwrap_model(trainer.model))
    name = teacher_model if isinstance(teacher_model, str) else getattr(teacher_model, "name_or_path", None)
    if isinstance(teacher_model, str):
        teacher_model = load_model(teacher_model, task, args.teacher_model_init_kwargs)
    freeze(teacher_model)
    teacher_tokenizer = _teacher_tokenizer(args, name)
    if teacher_tokenizer is not None and tokenizer is not None and not same_ids(tokenizer, teacher_tokenizer):
        return _cross_tokenizer_teacher(trainer, teacher_model, name, tokenizer, teacher_tokenizer)
    vocab_size = shared_vocab_size(num_outputs(trainer.model, task), num_outputs(teacher_model, task), task, tokenizer)
    # DDP: a plain replica; FSDP / ZeRO-3: sharded like the student
    return ModelTeacher(prepare_teacher(trainer.accelerator, teacher_model), name, vocab_size)


def _teacher_tokenizer(args, teacher_name: str | None):
    """``teacher_tokenizer_name_or_path`` loaded, else the teacher directory's tokenizer when it has one, else None."""
    import os

    from transformers import AutoTokenizer

    name = args.teacher_tokenizer_name_or_path
    if name is None:
        files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not (teacher_name and os.path.isdir(teacher_name) and any(
                os.path.exists(os.path.join(teacher_name, f)) for f in files)):  # fmt: skip
            return None
        name = teacher_name
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise SetupError("teacher_tokenizer_name_or_path", f"cannot load the teacher's tokenizer {name!r}: "
                         f"{str(err).splitlines()[0]}") from None  # fmt: skip


def _cross_tokenizer_teacher(trainer, teacher_model, name, tokenizer, teacher_tokenizer) -> CrossTokenizerTeacher:
    """Distill across tokenizers: what the pair must allow, and the one log line that says it is happening."""
    from .sparse import SPARSE_LOSS_TYPES

    args = trainer.args
    if trainer.task != "causal_lm":
        raise SetupError("teacher_tokenizer_name_or_path", f"cross-tokenizer distillation is for causal LMs, not "
                         f"task {trainer.task!r}")  # fmt: skip
    if args.seq_kd:
        raise SetupError("seq_kd", "a teacher with another tokenizer cannot write the student's completions; use "
                         "on-policy distillation (lmbda) or the dataset's completions")  # fmt: skip
    if not getattr(tokenizer, "is_fast", False) or not getattr(teacher_tokenizer, "is_fast", False):
        raise SetupError("teacher_tokenizer_name_or_path", "cross-tokenizer alignment needs fast tokenizers (character "
                         "offsets) on both sides; load them with use_fast=True")  # fmt: skip
    unavailable = sorted(set(args.objective.weights) - set(SPARSE_LOSS_TYPES))
    if unavailable:
        raise SetupError("loss_type", f"{', '.join(unavailable)} compares logits over one vocabulary, which a teacher "
                         f"with another tokenizer does not have; use {', '.join(SPARSE_LOSS_TYPES)}")  # fmt: skip
    weights = CrossTokenizerWeights(args.cross_tokenizer_exact_weight, args.cross_tokenizer_uld_weight)
    teacher = CrossTokenizerTeacher(prepare_teacher(trainer.accelerator, teacher_model), name, tokenizer,
                                    teacher_tokenizer, weights)  # fmt: skip
    logger.info("cross-tokenizer distillation: student tokenizer %d tokens, teacher %d, %d shared (%.1f%% of the "
                "student's)", teacher.shared.student_size, teacher.shared.teacher_size,
                len(teacher.shared.student_ids), 100 * teacher.shared.overlap)  # fmt: skip
    return teacher


def _cached_teacher(trainer, teacher_model, tokenizer) -> CachedTeacher:
    """Distill from ``args.teacher_cache`` (no teacher model); the cache must fit this student, tokenizer, data."""
    if trainer.task != "causal_lm":
        raise SetupError("teacher_cache", f"cached teachers are for causal LMs, not task {trainer.task!r}")
    if teacher_model is not None and not isinstance(teacher_model, str):
        raise SetupError("teacher_cache", "replaces the teacher model: pass no teacher_model (a name is checked)")
    try:
        cache = TeacherCache(trainer.args.teacher_cache)
        vocab_size = cache.check_compatible(student_vocab=num_outputs(trainer.model, trainer.task),
                                            tokenizer=tokenizer, teacher=teacher_model)  # fmt: skip
    except ValueError as err:  # missing, incomplete or another setup's cache
        raise SetupError("teacher_cache", str(err)) from None
    evaluation = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else {"eval": trainer.eval_dataset}
    for name, dataset in {"training": trainer.train_dataset, **evaluation}.items():
        if dataset is None or not hasattr(dataset, "__len__"):  # iterable data: checked batch by batch
            continue
        missing = cache.missing(dataset)
        if missing:
            raise SetupError("teacher_cache", f"{cache.path} has no row for {len(missing)} of the {len(dataset)} "
                             f"{name} examples (first: example {missing[0]}); build it from this data (train and "
                             "eval: hf-kd cache-teacher does both)")  # fmt: skip
    logger.info("teacher cache %s: %d examples of %s, top-%d; evaluation logs no teacher-agreement metrics",
                cache.path, len(cache), cache.name_or_path, cache.k)  # fmt: skip
    return CachedTeacher(cache, vocab_size)


def shared_vocab_size(student_vocab: int, teacher_vocab: int, task: str, tokenizer) -> int | None:
    """``None`` when the logits have the same width; else the shared prefix both are cut to (checked here)."""
    if student_vocab == teacher_vocab:
        return None
    if task != "causal_lm":
        raise SetupError(
            "teacher_model_name_or_path",
            f"the teacher has {teacher_vocab} labels and the student {student_vocab}; classifiers must share their "
            "label set (set num_labels, id2label and label2id alike on both)",
        )
    shared = min(student_vocab, teacher_vocab)
    if tokenizer is None or not hasattr(tokenizer, "__len__"):
        raise SetupError(
            "teacher_model_name_or_path",
            f"teacher vocab ({teacher_vocab}) and student vocab ({student_vocab}) differ and no tokenizer was given to "
            "prove the extra rows are padding; pass processing_class=tokenizer",
        )
    if len(tokenizer) > shared:
        raise SetupError(
            "teacher_model_name_or_path",
            f"teacher vocab ({teacher_vocab}) and student vocab ({student_vocab}) differ and the tokenizer has "
            f"{len(tokenizer)} tokens, more than the smaller model has rows ({shared}); these models do not share a "
            "vocabulary -- pick a teacher/student pair from the same tokenizer family",
        )
    logger.warning(
        "teacher vocab %d != student vocab %d: distilling over the shared first %d rows (the tokenizer has %d "
        "tokens); dropped padding rows: teacher %d..%d, student %d..%d",
        teacher_vocab, student_vocab, shared, len(tokenizer),
        shared, teacher_vocab - 1, shared, student_vocab - 1,
    )  # fmt: skip
    return shared

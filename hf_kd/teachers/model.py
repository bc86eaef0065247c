"""The ``model`` teacher: a frozen model (loaded from a path, or given), run without a graph on each batch."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from hf_kd.errors import SetupError
from hf_kd.models.hub import require_fetchable
from hf_kd.models.loading import TASKS, freeze, load_model, num_outputs
from hf_kd.models.sharding import prepare_teacher
from hf_kd.teachers.cross_tokenizer.vocabulary import same_ids
from hf_kd.teachers.registry import TEACHERS, Teacher, register_teacher

logger = logging.getLogger(__name__)


def student_tokenizer(trainer):
    """The trainer's tokenizer (a processor wraps one), or ``None``."""
    return getattr(trainer.processing_class, "tokenizer", trainer.processing_class)


@register_teacher
class ModelTeacher(Teacher):
    """A frozen model. A teacher whose tokenizer has other ids than the student's is distilled across tokenizers: the
    ``model`` kind then builds a ``cross_tokenizer`` teacher."""

    kind = "model"

    def __init__(self, model: nn.Module, name: str | None, vocab_size: int | None):
        self.model, self.name, self.vocab_size = model, name, vocab_size

    @classmethod
    def check_setup(cls, trainer, source) -> None:
        if source is None:
            raise SetupError(
                "teacher_model_name_or_path",
                "no teacher: pass teacher_model= (a model or a path), set "
                "teacher_model_name_or_path, or set teacher_cache",
            )

    @classmethod
    def build(cls, trainer, source) -> Teacher:
        args, task = trainer.args, trainer.task
        name = source if isinstance(source, str) else getattr(source, "name_or_path", None)
        if isinstance(source, str):
            require_fetchable(source, "teacher_model_name_or_path")  # offline: one line now, not a minute of retries
        model = load_model(source, task, args.teacher_model_init_kwargs) if isinstance(source, str) else source
        freeze(model)
        tokenizer = student_tokenizer(trainer)
        teacher_tokenizer = load_teacher_tokenizer(args, name)
        if teacher_tokenizer is not None and tokenizer is not None and not same_ids(tokenizer, teacher_tokenizer):
            cross = TEACHERS["cross_tokenizer"]
            cross.check_setup(trainer, source)
            return cross.from_model(trainer, model, name, teacher_tokenizer)
        vocab_size = shared_vocab_size(num_outputs(trainer.model, task), num_outputs(model, task), task, tokenizer)
        # DDP: a plain replica; FSDP / ZeRO-3: sharded like the student
        return cls(prepare_teacher(trainer.accelerator, model), name, vocab_size)

    def run(self, inputs, forward, targets):
        self.model.eval()  # every step: nothing may switch dropout back on
        with torch.no_grad():
            return forward(self.model, inputs)

    def describe(self) -> dict[str, str]:
        return {}  # the card's teacher line says it all


def load_teacher_tokenizer(args, teacher_name: str | None):
    """``teacher_tokenizer_name_or_path`` loaded, else the teacher directory's tokenizer when it has one, else None."""
    from transformers import AutoTokenizer

    name = args.teacher_tokenizer_name_or_path
    if name is None:
        files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not (teacher_name and os.path.isdir(teacher_name)):
            return None
        if not any(os.path.exists(os.path.join(teacher_name, f)) for f in files):
            return None
        name = teacher_name
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise SetupError(
            "teacher_tokenizer_name_or_path",
            f"cannot load the teacher's tokenizer {name!r}: {str(err).splitlines()[0]}",
        ) from None


def shared_vocab_size(student_vocab: int, teacher_vocab: int, task: str, tokenizer) -> int | None:
    """``None`` when the logits have the same width; else the shared prefix both are cut to (checked here)."""
    if student_vocab == teacher_vocab:
        return None
    if not TASKS[task].language_model:
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
        teacher_vocab,
        student_vocab,
        shared,
        len(tokenizer),
        shared,
        teacher_vocab - 1,
        shared,
        student_vocab - 1,
    )
    return shared

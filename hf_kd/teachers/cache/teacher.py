"""The ``cache`` teacher: each batch's top-k log-probabilities read from a :class:`TeacherCache` (no model at all)."""

from __future__ import annotations

import logging

from hf_kd.errors import SetupError
from hf_kd.models.loading import num_outputs
from hf_kd.objective.signals import TeacherTopK
from hf_kd.objective.sparse import sparse_weights
from hf_kd.teachers.cache.store import TeacherCache
from hf_kd.teachers.model import student_tokenizer
from hf_kd.teachers.registry import Teacher, register_teacher

logger = logging.getLogger(__name__)


@register_teacher
class CachedTeacher(Teacher):
    """This batch's cached top-k rows, found by the hash of each example's token ids (:meth:`TeacherCache.lookup`)."""

    kind = "cache"

    def __init__(self, cache: TeacherCache, vocab_size: int | None):
        self.cache, self.name, self.vocab_size = cache, cache.name_or_path, vocab_size

    @classmethod
    def check_setup(cls, trainer, source) -> None:
        if not trainer.task_spec.language_model:
            raise SetupError("teacher_cache", f"cached teachers are for causal LMs, not task {trainer.task!r}")
        if source is not None and not isinstance(source, str):
            raise SetupError("teacher_cache", "replaces the teacher model: pass no teacher_model (a name is checked)")
        if trainer.args.teacher_cache is None:
            raise SetupError("teacher_cache", "the cache teacher needs teacher_cache: the cache's directory")
        try:
            sparse_weights(trainer.args.objective.weights)
        except ValueError as err:
            raise SetupError("loss_type", str(err).removeprefix("loss_type: ")) from None

    @classmethod
    def build(cls, trainer, source) -> Teacher:
        """The cache must fit this student, tokenizer and data (every example has its rows)."""
        try:
            cache = TeacherCache(trainer.args.teacher_cache)
            vocab_size = cache.check_compatible(
                student_vocab=num_outputs(trainer.model, trainer.task),
                tokenizer=student_tokenizer(trainer),
                teacher=source,
            )
        except ValueError as err:  # missing, incomplete or another setup's cache
            raise SetupError("teacher_cache", str(err)) from None
        evaluation = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else {"eval": trainer.eval_dataset}
        for name, dataset in {"training": trainer.train_dataset, **evaluation}.items():
            if dataset is None or not hasattr(dataset, "__len__"):  # iterable data: checked batch by batch
                continue
            missing = cache.missing(dataset)
            if missing:
                raise SetupError(
                    "teacher_cache",
                    f"{cache.path} has no row for {len(missing)} of the {len(dataset)} "
                    f"{name} examples (first: example {missing[0]}); build it from this data (train and "
                    "eval: hf-kd cache-teacher does both)",
                )
        logger.info(
            "teacher cache %s: %d examples of %s, top-%d; evaluation logs no teacher-agreement metrics",
            cache.path,
            len(cache),
            cache.name_or_path,
            cache.k,
        )
        return cls(cache, vocab_size)

    def run(self, inputs, forward, targets):
        rows = self.cache.lookup(inputs["input_ids"], inputs.get("attention_mask"), targets)
        return TeacherTopK(rows["topk_ids"], rows["topk_logprobs"], rows["tail_logprob"])

    def describe(self) -> dict[str, str]:
        return {}  # the card's teacher line and its teacher-outputs row say it all

    def cached_outputs(self) -> dict | None:
        return {"k": self.cache.k, "path": self.cache.path, "vocab_size": self.cache.vocab_size}

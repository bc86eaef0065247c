"""The ``cross_tokenizer`` teacher: a frozen model whose tokenizer differs from the student's. Each batch is decoded,
re-tokenized for the teacher and aligned (:mod:`.alignment`); the loss gets a :class:`.loss.TeacherAligned`."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from hf_kd.errors import SetupError
from hf_kd.models.heads import lm_head_spec
from hf_kd.models.loading import freeze, load_model
from hf_kd.models.sharding import prepare_teacher
from hf_kd.objective.divergences import DIVERGENCES
from hf_kd.objective.signals import TeacherHidden, TeacherLogits
from hf_kd.teachers.cross_tokenizer.alignment import align_batch, alignment_summary
from hf_kd.teachers.cross_tokenizer.loss import CrossTokenizerWeights, TeacherAligned
from hf_kd.teachers.cross_tokenizer.vocabulary import shared_vocabulary
from hf_kd.teachers.model import load_teacher_tokenizer, student_tokenizer
from hf_kd.teachers.registry import Teacher, register_teacher

logger = logging.getLogger(__name__)
SETUP_SAMPLE = 16  # training examples aligned at setup for the one line that announces the pair (check aligns 64)
NO_COMPLETIONS = (
    "a teacher with another tokenizer cannot write the student's completions; use on-policy "
    "distillation (lmbda) or the dataset's completions"
)


@register_teacher
class CrossTokenizerTeacher(Teacher):
    """``run`` aligns the batch, runs the model on the teacher's tokens and returns a :class:`TeacherAligned` (its
    outputs shifted like the student's: position i predicts token i + 1)."""

    kind = "cross_tokenizer"

    def __init__(
        self, model: nn.Module | None, name: str | None, student_tokenizer, teacher_tokenizer, weights, remote=None
    ):
        self.model, self.name = model, name
        self.remote = remote  # a served teacher that answers for the teacher's ids instead of a model here
        self.student_tokenizer, self.tokenizer, self.weights = student_tokenizer, teacher_tokenizer, weights
        self.shared = shared_vocabulary(student_tokenizer, teacher_tokenizer)
        self._shared_on: dict[str, object] = {}  # the shared vocabulary's tensors per device, moved once
        self.aligned_at_setup: dict[str, float] | None = None  # alignment_summary of the first training examples

    @classmethod
    def check_setup(cls, trainer, source) -> None:
        args = trainer.args
        if source is None:
            raise SetupError("teacher_model_name_or_path", "no teacher: a cross-tokenizer teacher is a model")
        if trainer.task != "causal_lm":
            raise SetupError(
                "teacher_tokenizer_name_or_path",
                f"cross-tokenizer distillation is for causal LMs, not task {trainer.task!r}",
            )
        if args.seq_kd:
            raise SetupError("seq_kd", NO_COMPLETIONS)
        unavailable = sorted(
            name for name, d in args.objective.divergences.items() if not d.on_buckets or d.reads_targets
        )
        if unavailable:
            usable = ", ".join(name for name, d in DIVERGENCES.items() if d.on_buckets and not d.reads_targets)
            raise SetupError(
                "loss_type",
                f"{', '.join(unavailable)} compares logits over one vocabulary, which a "
                f"teacher with another tokenizer does not have; use {usable}",
            )

    @classmethod
    def build(cls, trainer, source) -> Teacher:
        name = source if isinstance(source, str) else getattr(source, "name_or_path", None)
        teacher_tokenizer = load_teacher_tokenizer(trainer.args, name)
        if teacher_tokenizer is None:
            raise SetupError("teacher_tokenizer_name_or_path", "a cross-tokenizer teacher needs its tokenizer: set it")
        model = load_model(source, trainer.task, trainer.args.teacher_model_init_kwargs) if name == source else source
        return cls.from_model(trainer, freeze(model), name, teacher_tokenizer)

    @classmethod
    def from_model(
        cls, trainer, model: nn.Module | None, name: str | None, teacher_tokenizer, remote=None
    ) -> CrossTokenizerTeacher:
        """A loaded, frozen model (or a ``remote`` served teacher, :meth:`ServedTeacher.aligned_hidden`) and its
        tokenizer: what the pair must allow, and the one log line that says it."""
        tokenizer = student_tokenizer(trainer)
        if not getattr(tokenizer, "is_fast", False) or not getattr(teacher_tokenizer, "is_fast", False):
            raise SetupError(
                "teacher_tokenizer_name_or_path",
                "cross-tokenizer alignment needs fast tokenizers "
                "(character offsets) on both sides; load them with use_fast=True",
            )
        args = trainer.args
        weights = CrossTokenizerWeights(args.cross_tokenizer_exact_weight, args.cross_tokenizer_uld_weight)
        model = None if model is None else prepare_teacher(trainer.accelerator, model)
        teacher = cls(model, name, tokenizer, teacher_tokenizer, weights, remote)
        if trainer.is_world_process_zero():  # a WARNING: the switch to another way of distilling is never silent
            teacher.aligned_at_setup = teacher._align_sample(trainer.train_dataset)
            logger.warning(teacher.setup_line())
        return teacher

    def _align_sample(self, dataset) -> dict[str, float] | None:
        """:func:`alignment_summary` of the first training examples (what `hf-kd check` estimates on its sample), or
        ``None`` where the dataset cannot be indexed, has no ``input_ids`` and ``labels`` or no target (prompts only)."""
        try:
            rows = [dataset[i] for i in range(min(len(dataset), SETUP_SAMPLE))]
        except TypeError:  # no dataset, or one without a length (an IterableDataset): nothing to sample
            return None
        examples = [
            {key: [int(t) for t in row[key]] for key in ("input_ids", "labels")}
            for row in rows
            if isinstance(row, dict) and "input_ids" in row and "labels" in row
        ]
        found = alignment_summary(self.student_tokenizer, self.tokenizer, examples) if examples else None
        return {**found, "examples": float(len(examples))} if found and found["targets"] else None

    def setup_line(self) -> str:
        """One line: both tokenizers, the shared vocabulary, and how the first training examples align."""
        shared, found = self.shared, self.aligned_at_setup
        line = (
            f"cross-tokenizer distillation: the teacher's tokenizer ({_name(self.tokenizer)}, "
            f"{shared.teacher_size} tokens) is not the student's ({_name(self.student_tokenizer)}, "
            f"{shared.student_size} tokens); {len(shared.student_ids)} tokens are shared ({100 * shared.overlap:.1f}% "
            "of the student's)"
        )
        return line + (f"; {_aligned(found)}" if found is not None else "")

    def run(self, inputs, forward, targets):
        alignment = align_batch(
            inputs["input_ids"],
            inputs.get("attention_mask"),
            targets,
            self.student_tokenizer,
            self.tokenizer,
            self.shared,
        )
        device = inputs["input_ids"].device
        if str(device) not in self._shared_on:
            self._shared_on[str(device)] = self.shared.to(device)
        if self.remote is not None:  # the teacher's ids go to its server; its hidden states come back
            signal = self.remote.aligned_hidden(alignment.teacher_inputs)
            return TeacherAligned(signal, alignment, self._shared_on[str(device)], self.weights)
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
        raise SetupError("seq_kd", NO_COMPLETIONS)
        yield  # unreachable: a generator, so that this is a context manager like the others

    def describe(self) -> dict[str, str]:
        shared, weights = self.shared, self.weights
        return {
            "teacher tokenizer (cross-tokenizer)": getattr(self.tokenizer, "name_or_path", ""),
            "shared vocabulary": f"{len(shared.student_ids)} tokens ({100 * shared.overlap:.1f}% of the student's)",
            "cross-tokenizer weights (exact, ULD)": f"{weights.exact}, {weights.uld}",
            **({"alignment at setup": _aligned(self.aligned_at_setup)} if self.aligned_at_setup else {}),
        }


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def _aligned(found: dict[str, float]) -> str:
    return (
        f"of the target positions of the first {found['examples']:.0f} training examples, "
        f"{100 * found['one_to_one']:.1f}% align one to one, {100 * found['in_spans']:.1f}% in merged spans, the "
        "rest with nothing (CE only)"
    )

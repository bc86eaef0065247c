"""The tasks hf_kd distills, one object each: how a task's logits align with its labels, what it supports, and how
its models are loaded, adapted and published. Nothing outside this table compares task names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100  # the Trainer's and every HF loss's convention for "not a target"
# the batch column that names each example's teacher (several teachers, routed): read by the teacher, never a model
# input (the forward drops it, the Trainer's column filter keeps it)
TEACHER_ID = "teacher_id"


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str  # transformers Auto class that loads a checkpoint for this task
    shift_labels: bool  # causal LMs: logits at position i predict the token at i + 1
    peft_task_type: str  # peft.TaskType: SEQ_CLS / TOKEN_CLS also train the new classifier head
    pipeline_tag: str  # the Hub's pipeline tag for the model card
    mapping_names: tuple[str, ...]  # transformers' class-name mappings whose classes belong to this task
    # a causal LM: a vocabulary over tokens, so the fused loss, a teacher cache, a teacher with another tokenizer and
    # generated completions apply, and evaluation reports perplexities (classifiers: accuracies and calibration)
    language_model: bool = False
    per_example: bool = False  # one label per example (sequence / image classification): unlabeled batches count rows
    labels_required: bool = False  # token classification: -100 on padding and sub-word continuations has no default

    @property
    def peft_auto_class(self) -> str:
        return self.auto_class.replace("AutoModel", "AutoPeftModel")

    def load_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def targets(self, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """Labels aligned with the logits, -100 where a position is not a target.

        Causal LMs: ``labels[:, 1:]`` (missing labels are the input ids with padding masked). Classifiers: the labels
        as given (one per example, or one per token), never shifted; ``None`` when a per-example batch has no labels
        (every example counts, and ``alpha`` must be 1).
        """
        labels = inputs.get("labels")
        if labels is None and self.labels_required:
            raise ValueError(f"{self.name} needs labels (-100 on padding and sub-word continuations)")
        if labels is None and self.per_example:
            return None
        mask = inputs.get("attention_mask")
        if labels is None:
            labels = inputs["input_ids"]
            if mask is not None:
                labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        if not self.shift_labels:
            return labels
        labels = labels[..., 1:]  # the first label has no position before it to predict it
        if mask is not None:  # a target predicted from a padding position is no target (left padding: the first token)
            labels = labels.masked_fill(self.aligned(mask) == 0, IGNORE_INDEX)
        return labels

    def aligned(self, outputs: torch.Tensor) -> torch.Tensor:
        """``[B, S, ...]`` per-position outputs cut to the positions that predict a target: a causal LM's last position
        predicts nothing (logits at position i predict the token at i + 1)."""
        return outputs[:, :-1] if self.shift_labels else outputs

    def count(self, inputs: Mapping[str, Any], targets: torch.Tensor | None) -> torch.Tensor:
        """The number of targets: positions whose target is not -100 (an unlabeled per-example batch: its rows)."""
        if targets is None:
            first = next(v for v in inputs.values() if torch.is_tensor(v))
            return torch.tensor(first.shape[0])
        return (targets != IGNORE_INDEX).sum()


TASKS = {
    task.name: task
    for task in (
        Task(
            "causal_lm",
            "AutoModelForCausalLM",
            True,
            "CAUSAL_LM",
            "text-generation",
            ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",),
            language_model=True,
        ),
        Task(
            "classification",
            "AutoModelForSequenceClassification",
            False,
            "SEQ_CLS",
            "text-classification",
            (
                "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
                "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
            ),
            per_example=True,
        ),
        Task(
            "token_classification",
            "AutoModelForTokenClassification",
            False,
            "TOKEN_CLS",
            "token-classification",
            ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",),
            labels_required=True,
        ),
    )
}
DEFAULT_TASK = "causal_lm"  # what a recipe or a card assumes when no task is named

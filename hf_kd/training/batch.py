"""One micro-batch, prepared once and carried from the step to the loss."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from hf_kd.models.tasks import TEACHER_ID, Task


class Batch(Mapping):
    """A micro-batch as the loss sees it, built once after any generation (``get_batch_samples``): the collated
    tensors (the batch is a Mapping over them, so code that reads ``inputs["input_ids"]`` keeps working), the targets
    aligned with the logits (``-100`` where a position is not a target), and their count. The targets are made once
    here, never rebuilt by the teacher, the loss or the token count."""

    def __init__(self, tensors: Mapping[str, Any], targets: torch.Tensor | None, count: torch.Tensor):
        self.tensors, self.targets, self.count = dict(tensors), targets, count
        self.teacher_answers: dict = {}  # what teachers asked for this batch ahead of the loss (Teacher.prefetch)
        self.written_by: str | None = None  # whose completions these are: "student", "teacher", None (the dataset's)

    @classmethod
    def of(cls, inputs: Mapping[str, Any], task: Task) -> Batch:
        """``inputs`` itself when it is a batch already, else the collated ``inputs`` with the task's targets."""
        if isinstance(inputs, Batch):
            return inputs
        targets = task.targets(inputs)
        return cls(inputs, targets, task.count(inputs, targets))

    @property
    def model_inputs(self) -> dict[str, Any]:
        """What the models read: everything but the labels (a student's own CE over full logits would be a wasted
        second pass) and the teacher routing column."""
        return {key: value for key, value in self.tensors.items() if key not in ("labels", TEACHER_ID)}

    def moved(self, tensors: Mapping[str, Any], device) -> Batch:
        """This batch with ``tensors`` (its own, moved by the Trainer) and its targets on ``device``."""
        targets = None if self.targets is None else self.targets.to(device)
        moved = Batch(tensors, targets, self.count.to(device))
        moved.teacher_answers, moved.written_by = self.teacher_answers, self.written_by
        return moved

    def __getitem__(self, key: str) -> Any:
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

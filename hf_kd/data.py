"""Batching for distillation: pad tokenized examples, labels -100 on padding (and on prompts, if given so)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class DistillationCollator:
    """Pad ``input_ids`` / ``attention_mask`` / ``labels`` to the longest example (right padding).

    Works on pre-tokenized data with no tokenizer. Missing ``labels`` become the input ids; missing
    ``attention_mask`` becomes all ones. Padding is masked by *position* (labels -100 where padded), never by token
    id, so an EOS token that doubles as the pad token is still a target where it really occurs.
    """

    pad_token_id: int = 0  # any id works: padded positions are masked in attention and labels
    pad_to_multiple_of: int | None = None  # e.g. 8 for tensor cores

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("DistillationCollator got an empty list of examples")
        if any("input_ids" not in ex for ex in examples):
            raise ValueError("every example needs 'input_ids' (tokenize the dataset first)")
        length = max(len(ex["input_ids"]) for ex in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(examples), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
            "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
        }
        for row, ex in enumerate(examples):
            ids = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            n = ids.numel()
            labels = ex.get("labels")
            labels = ids if labels is None else torch.as_tensor(labels, dtype=torch.long)
            if labels.numel() != n:
                raise ValueError(f"example {row}: labels has {labels.numel()} entries but input_ids has {n}")
            mask = ex.get("attention_mask")
            mask = torch.ones(n, dtype=torch.long) if mask is None else torch.as_tensor(mask, dtype=torch.long)
            batch["input_ids"][row, :n] = ids
            batch["attention_mask"][row, :n] = mask
            # a position masked out of attention is padding inside the example: never a target
            batch["labels"][row, :n] = labels.masked_fill(mask == 0, IGNORE_INDEX)
        return batch

"""What evaluation and prediction need beyond the loss: the last batch's repeats left out, and full logits for a
prediction loop that returns them (the fused path keeps only the last position's)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.modeling_outputs import ModelOutput

from hf_kd.models.gathering import gathered_head
from hf_kd.models.tasks import IGNORE_INDEX
from hf_kd.objective.terms import full_logits


def without_eval_repeats(accelerator, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The last evaluation batch of a multi-process run is padded with repeated examples so that every process has
    one (the plain Trainer drops them in gather_for_metrics): their labels become -100, so they count nowhere."""
    state = accelerator.gradient_state
    labels = inputs.get("labels")
    if accelerator.num_processes == 1 or labels is None or not state.end_of_dataloader or state.remainder <= 0:
        return inputs
    rows = labels.shape[0]
    first = accelerator.process_index * rows  # the gathered order: process 0's rows, then process 1's, ...
    repeat = torch.arange(first, first + rows, device=labels.device) >= state.remainder
    if not bool(repeat.any()):
        return inputs
    shape = (rows,) + (1,) * (labels.dim() - 1)
    return {**inputs, "labels": labels.masked_fill(repeat.view(shape), IGNORE_INDEX)}


def prediction_outputs(student_outputs, model, wants_full_logits: bool, chunk_size: int | None):
    """What a plain Trainer's prediction step gets: the model's own outputs. The fused path kept only the last
    position's logits, so the full ``[B, S, V]`` logits are made here, chunk by chunk, when a loop returns them."""
    if "final_hidden_state" not in student_outputs:
        return student_outputs
    if not wants_full_logits:
        return ModelOutput(logits=student_outputs["logits"])  # never read: the loop only wants the loss
    hidden = student_outputs["final_hidden_state"]
    with gathered_head(model) as head:  # FSDP2 / ZeRO-3: the whole head, for this block only
        return ModelOutput(logits=full_logits(hidden, head, chunk_size))

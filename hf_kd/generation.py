"""Generated completions for on-policy (``lmbda``) and sequence-level (``seq_kd``) distillation.

A micro-batch is cut at each example's prompt (every position before its first target label; an example without a
target is all prompt), the prompts are left-padded and completed by ``model.generate`` (KV cache on, dropout off, no
graph), and the batch the loss sees is rebuilt right-padded: the prompt, then the completion up to and including the
EOS that ended it (nothing after it), with labels -100 on the prompt and the padding. The loss then scores the
completion tokens as targets, exactly as it would a dataset's completions.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .losses import IGNORE_INDEX


def prompts_of(inputs: Mapping[str, torch.Tensor]) -> list[list[int]]:
    """Each example's prompt token ids: its attended tokens before the first target label.

    A label at position 0 is never a target (logits at position i predict the token at i + 1), so every prompt keeps
    at least its first token; an example with no target at all is a prompt-only example, all of it the prompt.
    """
    ids, labels = inputs["input_ids"].cpu(), inputs.get("labels")
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.cpu()
    labels = ids if labels is None else labels.cpu()
    prompts = []
    for row in range(ids.shape[0]):
        attended = mask[row].bool()
        tokens, targets = ids[row][attended], labels[row][attended] != IGNORE_INDEX
        targets[:1] = False
        first = int(targets.nonzero()[0]) if targets.any() else len(tokens)
        prompts.append(tokens[:first].tolist())
    return prompts


def generation_config(model: nn.Module, settings: Mapping[str, Any], pad_token_id: int | None):
    """The model's own generation config (its EOS ids, ...) updated with ``settings``; a pad id is always set."""
    config = copy.deepcopy(model.generation_config)
    # generate() refills a None setting from the model's own config: "no EOS stop" has to be an empty list
    config.update(**{k: ([] if k == "eos_token_id" and v is None else v) for k, v in settings.items()})
    if config.pad_token_id is None:  # generate pads finished rows; a completion never keeps them
        config.pad_token_id = pad_token_id if pad_token_id is not None else (eos_ids(config) or [0])[0]
    return config


def eos_ids(config) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


class _VocabularyLimit:
    """A logits processor: ids at or past ``limit`` (padding rows of a larger lm_head) are never generated."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, input_ids, scores):
        scores[:, self.limit :] = -float("inf")
        return scores


@torch.no_grad()
def complete(model: nn.Module, prompts: Sequence[Sequence[int]], config, device,
             vocab_limit: int | None = None) -> list[list[int]]:  # fmt: skip
    """Each prompt's completion by ``model.generate``: up to and including its first EOS, nothing after it.
    ``vocab_limit``: only ids below it (the vocabulary both models share) are generated."""
    width = max(len(p) for p in prompts)
    pad = config.pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    was_training = model.training
    model.eval()  # no dropout; and gradient checkpointing (active in training mode only) leaves the KV cache on
    try:
        from transformers import LogitsProcessorList

        limit = LogitsProcessorList([_VocabularyLimit(vocab_limit)] if vocab_limit is not None else [])
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             logits_processor=limit, use_cache=True)  # fmt: skip
    finally:
        model.train(was_training)
    stops = set(eos_ids(config))
    completions = []
    for row in out[:, width:].cpu().tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        completions.append(row[:end])
    return completions


def completion_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_token_id: int,
                     device) -> dict[str, torch.Tensor]:  # fmt: skip
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on the prompt and the padding)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    batch = {
        "input_ids": torch.full((len(prompts), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(prompts), width), dtype=torch.long),
        "labels": torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long),
    }
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        n, m = len(prompt), len(completion)
        batch["input_ids"][row, : n + m] = torch.tensor([*prompt, *completion], dtype=torch.long)
        batch["attention_mask"][row, : n + m] = 1
        batch["labels"][row, n : n + m] = torch.tensor(completion, dtype=torch.long)
    return {key: value.to(device) for key, value in batch.items()}


def on_policy(seed: int, step: int, micro_batch: int, lmbda: float) -> bool:
    """Whether micro-batch ``micro_batch`` of optimizer step ``step`` is generated by the student: a draw that every
    process and a resumed run make alike (it depends on nothing but its arguments)."""
    if lmbda <= 0:
        return False
    return bool(np.random.default_rng([seed, step, micro_batch]).random() < lmbda)


def completion_stats(batch: Mapping[str, torch.Tensor], eos: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the completion's length (its target count) and whether its last target is an EOS."""
    labels = batch["labels"][:, 1:]  # labels[:, 0] is never a target
    targets = labels != IGNORE_INDEX
    lengths = targets.sum(-1)
    last = torch.where(targets, torch.arange(labels.shape[1], device=labels.device), -1).max(-1).values
    last_token = labels.gather(-1, last.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ended = (lengths > 0) & torch.isin(last_token, torch.tensor(list(eos), device=labels.device, dtype=torch.long))
    return lengths, ended

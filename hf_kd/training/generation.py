"""Generated completions for on-policy (``lmbda``) and sequence-level (``seq_kd``) distillation.

A micro-batch is cut at each example's prompt (every position before its first target label; an example without a
target is all prompt), the prompts are left-padded and completed by ``model.generate`` (KV cache on, dropout off, no
graph), and the batch the loss sees is rebuilt right-padded: the prompt, then the completion up to and including the
EOS that ended it (nothing after it), with labels -100 on the prompt and the padding. The loss then scores the
completion tokens as targets, exactly as it would a dataset's completions.

:class:`GeneratingTrainerMixin` holds the trainer's side: ``prepare_batch`` (which micro-batches are generated, and by
whom), ``generate_completions`` (the override point for another engine) and the RNG of a resumed run that samples.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_kd.objective.losses import IGNORE_INDEX
from hf_kd.models.loading import unwrap


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


class GeneratingTrainerMixin:
    """The trainer's generation steps (mixed into :class:`hf_kd.DistillationTrainer` before ``Trainer``): which
    micro-batches are generated, by whom, and the RNG of a resumed run that samples."""

    def prepare_batch(self, inputs: Mapping[str, Any], index: int) -> Mapping[str, Any]:
        """Micro-batch ``index`` of this optimizer step as the loss will see it: the dataset's completions, the
        student's own (with probability ``lmbda``), or the teacher's (``seq_kd``). Runs before the step's targets are
        counted, so the normalization follows the batch that is trained on."""
        if not self.args.generates:
            return inputs
        if self._rng_checkpoint is not None:  # the first step after a mid-epoch resume: see _load_rng_state
            super()._load_rng_state(self._rng_checkpoint)
            self._rng_checkpoint, self._rng_loaded_early = None, True
        student_turn = on_policy(self.args.seed, self.state.global_step, index, self.args.lmbda)
        if not (student_turn or self.args.seq_kd):
            self.accounting.record_generation(None)
            return inputs
        started = time.perf_counter()
        inputs = self._prepare_inputs(inputs)
        with self.autocast_smart_context_manager():  # bf16 / fp16 training: generate in the same precision
            if student_turn:  # the student as it is now: PEFT adapters on
                generated = self.generate_completions(self.accelerator.unwrap_model(self.model), inputs)
            else:
                with self.teacher.generating() as teacher:
                    generated = self.generate_completions(teacher, inputs)
        self.accounting.record_generation(completion_stats(generated, self._completion_eos), time.perf_counter() - started)
        return generated

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        from transformers.trainer_utils import get_last_checkpoint

        self._rng_checkpoint = None
        if self.args.generates and resume_from_checkpoint:  # sampled completions must see the checkpoint's RNG
            last = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else None
            self._rng_checkpoint = last if resume_from_checkpoint is True else resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_rng_state(self, checkpoint) -> None:
        """A mid-epoch resume restores the checkpoint's RNG only after fetching the first step's batches, which is
        where completions are generated: :meth:`prepare_batch` restores it first, and the Trainer's later call is
        skipped (it would rewind what generation drew). At an epoch boundary the Trainer restores it before fetching."""
        if self._rng_loaded_early:
            self._rng_loaded_early = False
            return
        self._rng_checkpoint = None  # restored here, before any batch of the resumed run is fetched
        super()._load_rng_state(checkpoint)

    def generate_completions(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Cut each example at its prompt, complete it with ``model.generate``, and return the batch the loss sees:
        right-padded ``input_ids`` / ``attention_mask``, and ``labels`` that are -100 on the prompt and the padding,
        the generated tokens up to and including the EOS that ended each completion as targets.

        The override point for another generation engine (vLLM, an inference server): return the same three tensors.
        """
        prompts = prompts_of(inputs)
        config = generation_config(model, self.args.generation_settings(), self._pad_token_id())
        device = inputs["input_ids"].device
        # padded vocabularies: only the rows both models share (a teacher's padding row is no token of the student)
        completions = complete(model, prompts, config, device, vocab_limit=self.vocab_size)
        return completion_batch(prompts, completions, config.pad_token_id, device)

    def _pad_token_id(self) -> int | None:
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        pad = getattr(tokenizer, "pad_token_id", None)
        return pad if pad is not None else getattr(unwrap(self.model).config, "pad_token_id", None)

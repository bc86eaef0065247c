"""Generated completions for on-policy (``lmbda``) and sequence-level (``seq_kd``) distillation.

A micro-batch is cut at each example's prompt (every position before its first target label; an example without a
target is all prompt), the prompts are left-padded and completed by ``model.generate`` (KV cache on, dropout off, no
graph), and the batch the loss sees is rebuilt right-padded: the prompt, then the completion up to and including the
EOS that ended it (nothing after it), with labels -100 on the prompt and the padding. The loss then scores the
completion tokens as targets, exactly as it would a dataset's completions.

:class:`Generation` is the component the trainer holds: which micro-batches are generated and by whom, the engine
(``model.generate``, or with ``generation_backend: vllm`` a vLLM engine for the student's turns,
:mod:`hf_kd.training.vllm_engine`; the trainer's ``generate_completions`` is the override point for another one) and
the RNG of a resumed run that samples.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_kd.models.loading import unwrap
from hf_kd.models.sharding import teacher_is_sharded
from hf_kd.models.tasks import IGNORE_INDEX
from hf_kd.training.vllm_engine import ColocatedEngine, check_backend, sampling_of


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
def complete(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    config,
    device,
    vocab_limit: int | None = None,
    synced: bool = False,
) -> list[list[int]]:
    """Each prompt's completion by ``model.generate``: up to and including its first EOS, nothing after it.
    ``vocab_limit``: only ids below it (the vocabulary both models share) are generated. ``synced``: the weights are
    sharded (FSDP2 / ZeRO-3) and each forward gathers them layer by layer, a collective: every process runs forwards
    until the last one's completions end (``synced_gpus``), whatever its own prompts."""
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
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            logits_processor=limit,
            use_cache=True,
            synced_gpus=synced,
        )
    finally:
        model.train(was_training)
    stops = set(eos_ids(config))
    completions = []
    for row in out[:, width:].cpu().tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        completions.append(row[:end])
    return completions


def completion_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_token_id: int, device
) -> dict[str, torch.Tensor]:
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


REPEAT_NGRAM = 4  # a completion that loops repeats its 4-grams; natural text rarely does within 128 tokens


def completion_stats(batch: Mapping[str, torch.Tensor], eos: Sequence[int], max_new_tokens: int) -> dict[str, float]:
    """Sums over a generated batch's completions (its targets): ``completions``, ``tokens``, ``ended`` (the last target
    is an EOS), ``truncated`` (stopped by ``max_new_tokens``, not by an EOS), and ``ngrams`` / ``repeated_ngrams``
    (the :data:`REPEAT_NGRAM`-grams of each completion, and those that already occurred earlier in the same one)."""
    labels = batch["labels"][:, 1:]  # labels[:, 0] is never a target
    targets = labels != IGNORE_INDEX
    lengths = targets.sum(-1)
    last = torch.where(targets, torch.arange(labels.shape[1], device=labels.device), -1).max(-1).values
    last_token = labels.gather(-1, last.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ended = (lengths > 0) & torch.isin(last_token, torch.tensor(list(eos), device=labels.device, dtype=torch.long))
    ngrams = repeated = 0
    for row, keep in zip(labels.tolist(), targets.tolist()):
        tokens = [token for token, kept in zip(row, keep) if kept]
        seen = set()
        for start in range(len(tokens) - REPEAT_NGRAM + 1):
            gram = tuple(tokens[start : start + REPEAT_NGRAM])
            repeated += gram in seen
            seen.add(gram)
            ngrams += 1
    return {
        "completions": float(lengths.numel()),
        "tokens": float(lengths.sum()),
        "ended": float(ended.sum()),
        "truncated": float(((lengths >= max_new_tokens) & ~ended).sum()),
        "ngrams": float(ngrams),
        "repeated_ngrams": float(repeated),
    }


class Generation:
    """The trainer's generation, a component it holds when ``lmbda > 0`` or ``seq_kd``: which micro-batch of a step
    is generated and by whom (:meth:`turn`), how (:meth:`complete`), and the RNG of a resumed run that samples."""

    def __init__(
        self,
        args,
        eos: list[int],
        pad_token_id: int | None,
        vocab_limit: int | None,
        engine: ColocatedEngine | None = None,
        synced: bool = False,
    ):
        self.args = args
        self.synced = synced  # FSDP2 / ZeRO-3: generate's forwards gather the weights, on every process together
        self.eos = eos  # the ids that end a completion (for the logs)
        self.pad_token_id = pad_token_id  # the student's (its tokenizer's, else its config's): completions are its ids
        self.vocab_limit = vocab_limit  # padded vocabularies: only ids both models share are generated
        self.engine = engine  # generation_backend vllm: writes the student's turns (None: model.generate writes all)
        self.writer = None  # who writes the micro-batch being completed (the last turn drawn)
        self._rng_checkpoint = None  # a resumed run's checkpoint whose RNG the first generation must see
        self._rng_loaded_early = False

    @classmethod
    def for_trainer(cls, trainer) -> Generation:
        """The trainer's generation: its student's pad id (its tokenizer's, else its config's) and EOS ids."""
        student = unwrap(trainer.model)
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else getattr(student.config, "pad_token_id", None)
        config = generation_config(student, trainer.args.generation_settings(), None)
        engine = None
        if trainer.args.generation_backend == "vllm":
            check_backend(trainer, config)
            # the precision generate runs in under bf16 / fp16 training; else the student's own dtype
            dtype = "bfloat16" if trainer.args.bf16 else "float16" if trainer.args.fp16 else None
            engine = ColocatedEngine(dtype, trainer.args.vllm_gpu_memory_utilization)
        synced = teacher_is_sharded(trainer.accelerator) and trainer.accelerator.num_processes > 1
        return cls(trainer.args, eos_ids(config), pad, vocab_limit=trainer.vocab_size, engine=engine, synced=synced)

    def turn(self, step: int, index: int) -> str | None:
        """Who writes micro-batch ``index`` of optimizer step ``step``: ``"student"`` (with probability
        ``lmbda_at(step)``: lmbda after any warm-up and ramp), ``"teacher"`` (seq_kd), or ``None`` (the dataset's
        completions)."""
        writer = "student" if on_policy(self.args.seed, step, index, self.args.lmbda_at(step)) else None
        self.writer = writer or ("teacher" if self.args.seq_kd else None)
        return self.writer

    def complete(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Cut each example at its prompt, complete it (``model.generate``, or the vLLM engine on the student's turn),
        and return the batch the loss sees: right-padded ``input_ids`` / ``attention_mask``, and ``labels`` that are
        -100 on the prompt and the padding, the generated tokens up to and including the EOS that ended each
        completion as targets."""
        prompts = prompts_of(inputs)
        config = generation_config(model, self.args.generation_settings(), self.pad_token_id)
        device = inputs["input_ids"].device
        if self.engine is not None and self.writer == "student":
            completions = self.engine.generate(model, prompts, sampling_of(config, eos_ids(config), self.vocab_limit))
        else:  # seq_kd's teacher too: a second engine, for frozen weights, is not built
            completions = complete(model, prompts, config, device, self.vocab_limit, self.synced)
        return completion_batch(prompts, completions, config.pad_token_id, device)

    # ---- the RNG of a resumed run: completions sampled after a resume must see the checkpoint's RNG state ---------

    def resuming(self, resume_from_checkpoint, output_dir: str) -> None:
        """Called as training starts: remember the checkpoint a sampling run resumes from."""
        from transformers.trainer_utils import get_last_checkpoint

        self._rng_checkpoint = None
        if resume_from_checkpoint:
            last = get_last_checkpoint(output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
            self._rng_checkpoint = last

    def restore_rng_first(self, load: Callable[[str], None]) -> None:
        """Before the first generation of a resumed run: ``load`` the checkpoint's RNG state. A mid-epoch resume
        restores it only after fetching the first step's batches, which is where completions are generated."""
        if self._rng_checkpoint is not None:
            load(self._rng_checkpoint)
            self._rng_checkpoint, self._rng_loaded_early = None, True

    def trainer_may_restore_rng(self) -> bool:
        """Whether the Trainer's own (later) RNG restore may run: not after :meth:`restore_rng_first` (it would rewind
        what generation drew); at an epoch boundary the Trainer restores it before fetching, and that is the one."""
        if self._rng_loaded_early:
            self._rng_loaded_early = False
            return False
        self._rng_checkpoint = None  # restored by the Trainer, before any batch of the resumed run is fetched
        return True

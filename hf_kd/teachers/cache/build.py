"""Build a teacher cache: run the teacher once over the training data and store its top-k log-probabilities.

The format and the reader (:class:`TeacherCache`) are in :mod:`hf_kd.teachers.cache.store`; both are importable from here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil

import numpy as np
import torch
from torch import nn

from hf_kd.models.loading import freeze, load_model, num_outputs
from hf_kd.objective.losses import IGNORE_INDEX
from hf_kd.teachers.cache.store import (  # noqa: F401 (TeacherCache and example_key are part of this module's API)
    BUILD_SETTINGS,
    FORMAT_VERSION,
    METADATA_FILE,
    TOPK_ROWS,
    TeacherCache,
    _name,
    _rows,
    _shard_path,
    _spans,
    dataset_content_hash,
    example_key,
    target_positions,
    tokenizer_hash,
)

logger = logging.getLogger(__name__)


# ---- building -----------------------------------------------------------------------------------------------------


def _top_k(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[n, V]`` logits -> top-k log-probs ``[n, k]`` (most likely first), their ids, the tail log-mass ``[n]``."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    top, ids = log_p.topk(k, dim=-1)
    tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)  # no 1 - sum(top) cancellation; -inf when k = V
    return top.cpu().numpy(), ids.to(torch.int32).cpu().numpy(), tail.cpu().numpy()


@torch.no_grad()
def _teacher_rows(teacher, rows, collator, k: int, vocab_size: int, batch_size: int, device, bar) -> dict[str, list]:
    """Top-k rows of one shard, in the shard's order (batched longest first, so padding stays small)."""
    out: list[tuple | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    for start in range(0, len(rows), batch_size):
        chunk = order[start : start + batch_size]
        batch = collator([rows[i] for i in chunk])
        logits = teacher(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
        ).logits
        # logits at position i predict the token at i + 1: they pair with labels[:, 1:]; never from a padding position
        targets = (batch["labels"][:, 1:] != IGNORE_INDEX) & (batch["attention_mask"][:, :-1] == 1)
        selected = logits[:, :-1, :vocab_size][targets.to(device)]  # [N, V]: the target positions only
        parts = [_top_k(selected[r : r + TOPK_ROWS], k) for r in range(0, selected.shape[0], TOPK_ROWS)]
        top, ids, tail = (np.concatenate(column) for column in zip(*parts)) if parts else _top_k(selected, k)
        counts = targets.sum(1).tolist()
        offsets = np.r_[0, np.cumsum(counts)]
        for j, i in enumerate(chunk):
            mask = batch["attention_mask"][j]
            positions = target_positions(targets[j], mask)
            rows_ = slice(offsets[j], offsets[j + 1])
            out[i] = (
                example_key(batch["input_ids"][j], mask, positions),
                _spans(positions),
                ids[rows_].reshape(-1),
                top[rows_].reshape(-1),
                tail[rows_],
            )
        bar.update(len(chunk))
    return {
        "key": [r[0] for r in out],
        "target_spans": [r[1] for r in out],
        "topk_ids": [r[2] for r in out],
        "topk_logprobs": [r[3] for r in out],
        "tail_logprob": [r[4] for r in out],
    }


def _table(columns: dict[str, list]):
    import pyarrow as pa

    def list_array(arrays, dtype):
        offsets = np.r_[0, np.cumsum([len(a) for a in arrays])]
        if offsets[-1] >= 2**31:
            raise ValueError("a shard holds over 2**31 values per column; use a smaller shard_size")
        values = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))

    return pa.table(
        {
            "key": pa.array(columns["key"], pa.string()),
            "target_spans": list_array(columns["target_spans"], np.int32),
            "topk_ids": list_array(columns["topk_ids"], np.int32),
            "topk_logprobs": list_array(columns["topk_logprobs"], np.float32),
            "tail_logprob": list_array(columns["tail_logprob"], np.float32),
        }
    )


def _save_shard(table, path: str) -> None:
    """Write a shard to ``path.tmp`` and rename it: a shard directory exists only once complete."""
    import datasets
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a half-written shard from an interrupted run
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # one bar for the whole build, not one per shard
    try:
        datasets.Dataset(table).save_to_disk(tmp)
    finally:
        if not quiet:
            enable_progress_bars()
    os.replace(tmp, path)


def _write_json(path: str, payload: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    os.replace(path + ".tmp", path)  # atomic: never a half-written metadata file


def build_teacher_cache(
    teacher: nn.Module | str,
    dataset,
    path: str,
    *,
    k: int = 64,
    tokenizer=None,
    batch_size: int = 8,
    shard_size: int = 1000,
    vocab_size: int | None = None,
    teacher_init_kwargs: dict | None = None,
    collator=None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> TeacherCache:
    """Run ``teacher`` over ``dataset`` and write (or finish) the cache at ``path``; returns it opened.

    Args:
        teacher: a causal LM or a path/Hub id (loaded with ``teacher_init_kwargs``; dtype default bfloat16 on GPU).
        dataset: a tokenized ``datasets.Dataset`` (``input_ids``, optional ``labels`` with -100 on non-targets,
            optional ``attention_mask``), the same examples the student will train on (build one cache over train and
            eval data to evaluate from it too).
        k: ids kept per position; the loss is exact for ``k = vocab_size`` (see :mod:`hf_kd.objective.sparse`).
        tokenizer: the tokenizer that produced the ids; its vocabulary hash is recorded and checked at training time.
        vocab_size: distill over the first ``vocab_size`` logits only (teacher and student with differently padded
            vocabularies: the shared prefix, as the live trainer does). Default: all of the teacher's logits.
        collator: pads a list of rows; default :class:`hf_kd.DistillationCollator` (right padding, -100 labels).
        device: where the teacher runs; default this process's accelerate device (a model dispatched with
            ``device_map`` stays where it is).

    Run it under ``accelerate launch`` to split the shards over processes. An interrupted build resumes from its last
    finished shard when called again with the same arguments; a finished one is returned as is.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from hf_kd import __version__
    from hf_kd.data import DistillationCollator

    state = PartialState()
    if isinstance(teacher, str):
        teacher = load_model(teacher, "causal_lm", teacher_init_kwargs)
    freeze(teacher)
    if not hasattr(teacher, "hf_device_map"):  # a model dispatched with device_map stays where it is
        teacher.to(device or state.device)
    device = next(teacher.parameters()).device
    teacher_vocab = num_outputs(teacher, "causal_lm")
    vocab_size = vocab_size or teacher_vocab
    if not 1 <= k <= vocab_size <= teacher_vocab:
        raise ValueError(f"need 1 <= k ({k}) <= vocab_size ({vocab_size}) <= the teacher's {teacher_vocab} logits")
    if collator is None:
        pad = getattr(tokenizer, "pad_token_id", None)
        collator = DistillationCollator(pad_token_id=pad if pad is not None else 0)

    num_shards = max(math.ceil(len(dataset) / shard_size), 1)
    metadata = {
        "format_version": FORMAT_VERSION,
        "hf_kd_version": __version__,
        "teacher": _name(teacher),
        "tokenizer": _name(tokenizer),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "k": k,
        "vocab_size": vocab_size,
        "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
        "content_hash": dataset_content_hash(dataset),
        "num_examples": len(dataset),
        "shard_size": shard_size,
        "num_shards": num_shards,
        "complete": False,
    }
    meta_path = os.path.join(path, METADATA_FILE)
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            previous = json.load(f)
        differ = [
            f"{key}: {previous.get(key)!r} there, {metadata[key]!r} now"
            for key in BUILD_SETTINGS
            if previous.get(key) != metadata[key]
        ]
        if differ:
            raise ValueError(
                f"{path} holds a teacher cache built with other settings ({'; '.join(differ)}); choose "
                "another directory or delete it"
            )
        if previous.get("complete"):
            logger.info("teacher cache %s is already complete", path)
            return TeacherCache(path)
    if state.is_main_process:
        os.makedirs(os.path.join(path, "shards"), exist_ok=True)
        _write_json(meta_path, metadata)
    state.wait_for_everyone()

    mine = range(state.process_index, num_shards, state.num_processes)  # strided: process p does p, p + n, ...
    mine = [shard for shard in mine if not os.path.isdir(_shard_path(path, shard))]  # finished shards are skipped
    todo = sum(min(shard_size, len(dataset) - s * shard_size) for s in mine)
    quiet = not progress or not state.is_main_process
    with tqdm(total=todo, desc=f"Caching teacher top-{k}", unit="ex", disable=quiet) as bar:
        for shard in mine:
            rows = _rows(dataset, shard * shard_size, min((shard + 1) * shard_size, len(dataset)))
            columns = _teacher_rows(teacher, rows, collator, k, vocab_size, batch_size, device, bar)
            _save_shard(_table(columns), _shard_path(path, shard))
    state.wait_for_everyone()

    if state.is_main_process:
        cache = TeacherCache(path, require_complete=False)
        spans = np.concatenate([chunk.flatten().to_numpy() for chunk in cache.data.data.column("target_spans").chunks])
        positions = int((spans[1::2] - spans[0::2]).sum())  # [start, end) pairs
        size = sum(os.path.getsize(f["filename"]) for f in cache.data.cache_files)
        metadata.update(
            complete=True,
            num_positions=positions,
            bytes_on_disk=size,
            bytes_per_position=round(size / max(positions, 1), 2),
        )
        _write_json(meta_path, metadata)
        logger.info(
            "teacher cache %s: %d examples, %d positions, %.1f bytes per position (k=%d)",
            path,
            len(dataset),
            positions,
            metadata["bytes_per_position"],
            k,
        )
    state.wait_for_everyone()
    return TeacherCache(path)


# ---- hf-kd cache-teacher RECIPE ------------------------------------------------------------------------------------


def build_from_recipe(recipe, path: str, *, k: int = 64, batch_size: int = 8, shard_size: int = 1000) -> TeacherCache:
    """The cache of a recipe's teacher over its tokenized train (and eval) data, tokenized exactly as `train` does."""
    import datasets
    from transformers import AutoTokenizer

    from hf_kd.data import prepare_datasets
    from hf_kd.errors import SetupError
    from hf_kd.teachers.cross_tokenizer.vocabulary import same_ids

    args = recipe.training_args(check_hardware=False)
    tokenizer = AutoTokenizer.from_pretrained(recipe.student.tokenizer or recipe.student.name_or_path)
    teacher_tokenizer = AutoTokenizer.from_pretrained(recipe.teacher.tokenizer or recipe.teacher.name_or_path)
    if not same_ids(tokenizer, teacher_tokenizer):  # the cache stores teacher ids as the student's: one tokenizer
        raise SetupError(
            "teacher_tokenizer_name_or_path",
            "a teacher cache needs teacher and student to share one "
            "tokenizer; with different tokenizers distill from the live teacher (no teacher.cache)",
        )
    with args.main_process_first(desc="dataset preparation"):  # as `train` does: rank 0 tokenizes, the others reuse
        train, evaluation = prepare_datasets(recipe.data, tokenizer, teacher_tokenizer, seed=args.seed)
    dataset = train if evaluation is None else datasets.concatenate_datasets([train, evaluation])
    vocab_size = _shared_rows(recipe, tokenizer)
    return build_teacher_cache(
        recipe.teacher.name_or_path,
        dataset,
        path,
        k=k,
        tokenizer=tokenizer,
        batch_size=batch_size,
        shard_size=shard_size,
        vocab_size=vocab_size,
        teacher_init_kwargs=args.teacher_model_init_kwargs,
    )


def _shared_rows(recipe, tokenizer) -> int | None:
    """The vocabulary the student will distill over: the shared prefix of a padded-vocabulary pair (Qwen2.5 7B has
    152064 rows, 0.5B 151936), read off both configs and checked as training checks it; ``None`` when they agree."""
    from transformers import AutoConfig

    from hf_kd.teachers.model import shared_vocab_size

    rows = [
        AutoConfig.from_pretrained(section.name_or_path).get_text_config().vocab_size
        for section in (recipe.student, recipe.teacher)
    ]
    return shared_vocab_size(*rows, "causal_lm", tokenizer)

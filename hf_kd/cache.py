"""Offline teacher: run the teacher once, store its top-k log-probabilities, distill from them many times.

:func:`build_teacher_cache` runs a frozen teacher over a tokenized dataset and writes::

    PATH/hf_kd_cache.json      metadata: format version, teacher, tokenizer (name and vocabulary hash), k, vocab_size,
                               dataset fingerprint and content hash, counts and bytes per position once complete
    PATH/shards/shard-00000/   a `datasets` Dataset (save_to_disk: Arrow, memory-mapped), ``shard_size`` examples each
    PATH/shards/shard-00001/   ...

One row per example, in dataset order. A "position" is a target of the shifted sequence: logits at position i
predict the token at i + 1, so position i is stored when ``labels[i + 1] != -100``. Columns:

* ``key`` (string): :func:`example_key`, the sha256 of the example's attended token ids as int32 bytes.
* ``target_spans`` (int32): the stored positions as flat ``[start, end)`` pairs (one pair per contiguous run).
* ``topk_ids`` (int32, ``P * k``): per position, the teacher's k most likely ids, most likely first.
* ``topk_logprobs`` (float32, ``P * k``): their log-probabilities at T = 1 (before any temperature).
* ``tail_logprob`` (float32, ``P``): ``log(1 - sum(top-k probs))``, the log-mass of every other id (``-inf`` if k = V).

That is ``8 * k + 4`` bytes per position plus ~100 bytes per example (key, list offsets, spans).

Training (:class:`hf_kd.DistillationTrainer` with ``teacher_cache=PATH``) opens it with :class:`TeacherCache`: the
metadata is checked against the training setup, every training example must hash to a cached row, and every batch is
matched to its rows by key (never by step index), its target positions checked against the cached ones.

Resumable and ``accelerate``-parallel: process p of n computes shards p, p + n, ...; a shard appears (atomic rename)
only once written, so a rerun after an interruption skips the finished shards and yields the same cache.

    hf-kd cache-teacher RECIPE --output PATH [--k 64] [--batch_size 8] [--shard_size 1000]   (or build_from_recipe)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_FILE = "hf_kd_cache.json"
IGNORE_INDEX = -100
TOPK_ROWS = 4096  # positions per float32 log-softmax in a build: 4096 x 128k vocab x 4 B = 2 GB at most
# a resumed build must agree with the interrupted one on these (training checks teacher, tokenizer_hash and vocab_size
# against its own setup in TeacherCache.check_compatible)
BUILD_SETTINGS = ("format_version", "teacher", "tokenizer_hash", "k", "vocab_size", "content_hash", "shard_size")


def example_key(input_ids, attention_mask=None) -> str:
    """sha256 hex of the attended token ids (``attention_mask == 1``) as little-endian int32: padding never counts."""
    ids = torch.as_tensor(input_ids).reshape(-1)
    if attention_mask is not None:
        ids = ids[torch.as_tensor(attention_mask).reshape(-1).bool()]
    return hashlib.sha256(ids.to(torch.int32).numpy().astype("<i4").tobytes()).hexdigest()


def tokenizer_hash(tokenizer) -> str | None:
    """sha256 of the tokenizer's ``{token: id}`` vocabulary: what the cached ids mean, whatever the path was called."""
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def _name(model_or_path) -> str | None:
    name = model_or_path if isinstance(model_or_path, str) else getattr(model_or_path, "name_or_path", None)
    return os.path.abspath(name) if name and os.path.isdir(name) else name  # a local dir: compared by absolute path


def _first_attended(mask: torch.Tensor) -> int:
    """Stored positions count from the first attended token, so left or right padding finds the same rows."""
    return int(mask.to(torch.int64).argmax()) if mask.any() else 0


def _spans(positions: np.ndarray) -> np.ndarray:
    """Sorted positions -> flat ``[start, end)`` pairs of their contiguous runs."""
    if positions.size == 0:
        return np.zeros(0, np.int32)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = positions[np.r_[0, breaks]]
    ends = positions[np.r_[breaks - 1, positions.size - 1]] + 1
    return np.stack([starts, ends], 1).reshape(-1).astype(np.int32)


def _expand(spans: np.ndarray) -> np.ndarray:
    pairs = np.asarray(spans, np.int64).reshape(-1, 2)
    return np.concatenate([np.arange(s, e) for s, e in pairs]) if len(pairs) else np.zeros(0, np.int64)


def _rows(dataset, start: int, end: int) -> list[dict[str, Any]]:
    columns = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
    part = dataset.select_columns(columns)[start:end]
    return [{c: part[c][i] for c in columns} for i in range(end - start)]


def dataset_content_hash(dataset) -> str:
    """sha256 over every example's ids, attention mask and labels: a resumed build must see the same data."""
    h = hashlib.sha256()
    for start in range(0, len(dataset), 1000):
        for row in _rows(dataset, start, min(start + 1000, len(dataset))):
            for column in ("input_ids", "attention_mask", "labels"):
                h.update(np.asarray(row.get(column, []), np.int32).tobytes() + b"|")
    return h.hexdigest()


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
        logits = teacher(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         use_cache=False).logits  # fmt: skip
        # logits at position i predict the token at i + 1: they pair with labels[:, 1:]
        targets = batch["labels"][:, 1:] != IGNORE_INDEX
        selected = logits[:, :-1, :vocab_size][targets.to(device)]  # [N, V]: the target positions only
        parts = [_top_k(selected[r : r + TOPK_ROWS], k) for r in range(0, selected.shape[0], TOPK_ROWS)]
        top, ids, tail = (np.concatenate(column) for column in zip(*parts)) if parts else _top_k(selected, k)
        counts = targets.sum(1).tolist()
        offsets = np.r_[0, np.cumsum(counts)]
        for j, i in enumerate(chunk):
            mask = batch["attention_mask"][j]
            positions = targets[j].nonzero().squeeze(-1).numpy() - _first_attended(mask)
            rows_ = slice(offsets[j], offsets[j + 1])
            out[i] = (example_key(batch["input_ids"][j], mask), _spans(positions), ids[rows_].reshape(-1),
                      top[rows_].reshape(-1), tail[rows_])  # fmt: skip
        bar.update(len(chunk))
    return {"key": [r[0] for r in out], "target_spans": [r[1] for r in out], "topk_ids": [r[2] for r in out],
            "topk_logprobs": [r[3] for r in out], "tail_logprob": [r[4] for r in out]}  # fmt: skip


def _table(columns: dict[str, list]):
    import pyarrow as pa

    def list_array(arrays, dtype):
        offsets = np.r_[0, np.cumsum([len(a) for a in arrays])]
        if offsets[-1] >= 2**31:
            raise ValueError("a shard holds over 2**31 values per column; use a smaller shard_size")
        values = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))

    return pa.table({
        "key": pa.array(columns["key"], pa.string()),
        "target_spans": list_array(columns["target_spans"], np.int32),
        "topk_ids": list_array(columns["topk_ids"], np.int32),
        "topk_logprobs": list_array(columns["topk_logprobs"], np.float32),
        "tail_logprob": list_array(columns["tail_logprob"], np.float32),
    })  # fmt: skip


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


def _shard_path(path: str, index: int) -> str:
    return os.path.join(path, "shards", f"shard-{index:05d}")


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
        k: ids kept per position; the loss is exact for ``k = vocab_size`` (see :mod:`hf_kd.sparse`).
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

    from . import __version__
    from .data import DistillationCollator

    state = PartialState()
    if isinstance(teacher, str):
        from transformers import AutoModelForCausalLM

        kwargs = dict(teacher_init_kwargs or {})
        kwargs.setdefault("dtype", torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        teacher = AutoModelForCausalLM.from_pretrained(teacher, **kwargs)
    teacher.requires_grad_(False).eval()
    if not hasattr(teacher, "hf_device_map"):  # a model dispatched with device_map stays where it is
        teacher.to(device or state.device)
    device = next(teacher.parameters()).device
    head = teacher.get_output_embeddings()
    teacher_vocab = head.weight.shape[0] if head is not None else teacher.config.vocab_size
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
        differ = [f"{key}: {previous.get(key)!r} there, {metadata[key]!r} now" for key in BUILD_SETTINGS
                  if previous.get(key) != metadata[key]]  # fmt: skip
        if differ:
            raise ValueError(f"{path} holds a teacher cache built with other settings ({'; '.join(differ)}); choose "
                             "another directory or delete it")  # fmt: skip
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
        metadata.update(complete=True, num_positions=positions, bytes_on_disk=size,
                        bytes_per_position=round(size / max(positions, 1), 2))  # fmt: skip
        _write_json(meta_path, metadata)
        logger.info("teacher cache %s: %d examples, %d positions, %.1f bytes per position (k=%d)",
                    path, len(dataset), positions, metadata["bytes_per_position"], k)  # fmt: skip
    state.wait_for_everyone()
    return TeacherCache(path)


# ---- reading ------------------------------------------------------------------------------------------------------


class TeacherCache:
    """A finished cache, memory-mapped; rows are found by :func:`example_key` through a dict built once."""

    def __init__(self, path: str, require_complete: bool = True):
        import datasets

        self.path = path
        meta_path = os.path.join(path, METADATA_FILE)
        if not os.path.isfile(meta_path):
            raise ValueError(f"{path} is not a teacher cache (no {METADATA_FILE}); build one with hf-kd cache-teacher")
        with open(meta_path, encoding="utf-8") as f:
            self.metadata = json.load(f)
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"teacher cache {path} has format version {self.metadata.get('format_version')!r}; this "
                             f"hf_kd reads version {FORMAT_VERSION}: rebuild the cache")  # fmt: skip
        if require_complete and not self.metadata.get("complete"):
            raise ValueError(f"teacher cache {path} is incomplete (an interrupted build); run the same cache-teacher "
                             "command again to finish it")  # fmt: skip
        shards = []
        for index in range(self.metadata["num_shards"]):
            shard = _shard_path(path, index)
            if not os.path.isdir(shard):
                raise ValueError(f"teacher cache {path} lacks {os.path.relpath(shard, path)}; rebuild or resume it")
            shards.append(datasets.load_from_disk(shard))  # memory-mapped Arrow, nothing read yet
        self.data = datasets.concatenate_datasets(shards)
        if len(self.data) != self.metadata["num_examples"]:
            raise ValueError(f"teacher cache {path} has {len(self.data)} rows, its metadata says "
                             f"{self.metadata['num_examples']}; rebuild it")  # fmt: skip
        self.k, self.vocab_size = self.metadata["k"], self.metadata["vocab_size"]
        self.name_or_path = self.metadata["teacher"]  # read by the model card like a teacher model's name
        keys = self.data.data.column("key").to_pylist()
        self._index = {key: row for row, key in reversed(list(enumerate(keys)))}  # duplicates: the first row
        self._arrow = self.data.with_format("arrow")

    def __len__(self) -> int:
        return len(self.data)

    def check_compatible(self, *, student_vocab: int, tokenizer=None, teacher=None) -> int | None:
        """Refuse a cache made for another setup; returns the vocab the student logits are cut to (None: no cut).

        ``teacher``: the teacher the training setup names (if any) must be the cache's. ``tokenizer``: its vocabulary
        must hash like the one that produced the cached ids. The cache's vocab must be the student's, or a prefix
        that holds the whole tokenizer (a student with more padding rows than the cached teacher).
        """
        meta = self.metadata
        if teacher is not None and _name(teacher) != meta["teacher"]:
            raise ValueError(f"teacher cache {self.path} holds {meta['teacher']!r}'s outputs, but the training setup "
                             f"names the teacher {_name(teacher)!r}")  # fmt: skip
        theirs, ours = meta.get("tokenizer_hash"), tokenizer_hash(tokenizer)
        if theirs and ours and theirs != ours:
            raise ValueError(f"teacher cache {self.path} was built from ids of tokenizer {meta['tokenizer']!r}, whose "
                             "vocabulary differs from this run's tokenizer; rebuild the cache with it")  # fmt: skip
        if self.vocab_size == student_vocab:
            return None
        size = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
        if self.vocab_size > student_vocab or size is None or size > self.vocab_size:
            raise ValueError(
                f"teacher cache {self.path} covers {self.vocab_size} vocab rows, the student has {student_vocab}"
                + ("" if size is None else f" and the tokenizer {size} tokens")
                + f"; rebuild it with vocab_size={min(self.vocab_size, student_vocab)} (and pass the tokenizer)"
            )
        logger.warning("teacher cache vocab %d < student vocab %d: distilling over the shared first %d rows",
                       self.vocab_size, student_vocab, self.vocab_size)  # fmt: skip
        return self.vocab_size

    def missing(self, dataset) -> list[int]:
        """Indices of the ``dataset`` examples that have no cached row (an empty list when the cache covers it)."""
        missing = []
        for start in range(0, len(dataset), 1000):
            for offset, row in enumerate(_rows(dataset, start, min(start + 1000, len(dataset)))):
                if example_key(row["input_ids"], row.get("attention_mask")) not in self._index:
                    missing.append(start + offset)
        return missing

    def lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, targets: torch.Tensor,
               ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:  # fmt: skip
        """The cached teacher entries of a batch, aligned with the shifted student logits.

        Args:
            input_ids, attention_mask: ``[B, S]`` the batch as the student sees it (any padding side).
            targets: ``[B, S - 1]`` shifted labels (position i is the target of the logits at i); every position that
                is not ``ignore_index`` must be cached for its example.

        Returns:
            ``{"topk_ids": [B, S - 1, k] int64, "topk_logprobs": [B, S - 1, k] float32, "tail_logprob": [B, S - 1]
            float32}`` on ``input_ids.device``; non-target positions hold a uniform filler the loss never reads.
        """
        ids_cpu, targets_cpu = input_ids.cpu(), targets.cpu()
        mask_cpu = attention_mask.cpu() if attention_mask is not None else torch.ones_like(ids_cpu)
        batch, length, k = targets_cpu.shape[0], targets_cpu.shape[1], self.k
        out_ids = torch.arange(k).expand(batch, length, k).clone()
        out_top = torch.full((batch, length, k), -math.log(k + 1))
        out_tail = torch.full((batch, length), -math.log(k + 1))
        rows = []
        for b in range(batch):
            key = example_key(ids_cpu[b], mask_cpu[b])
            if key not in self._index:
                raise ValueError(
                    f"batch example {b} ({int(mask_cpu[b].sum())} tokens, key {key[:12]}...) is not in the teacher "
                    f"cache {self.path}: its token ids differ from every cached example (other data, tokenizer, "
                    "truncation or packing); rebuild the cache from this dataset"
                )
            rows.append(self._index[key])
        table = self._arrow[rows]
        for b, row in enumerate(rows):
            cached = _expand(table.column("target_spans")[b].values.to_numpy())
            ids = table.column("topk_ids")[b].values.to_numpy()
            top = table.column("topk_logprobs")[b].values.to_numpy()
            tail = table.column("tail_logprob")[b].values.to_numpy()
            if ids.size != cached.size * k or top.size != ids.size or tail.size != cached.size:
                raise ValueError(f"teacher cache {self.path} row {row} is corrupt: {cached.size} positions but "
                                 f"{ids.size} ids, {top.size} log-probs, {tail.size} tails for k={k}")  # fmt: skip
            wanted = (targets_cpu[b] != ignore_index).nonzero().squeeze(-1).numpy()
            relative = wanted - _first_attended(mask_cpu[b])
            where = np.searchsorted(cached, relative)  # cached positions are sorted
            found = np.zeros(relative.size, bool)
            inside = where < cached.size
            found[inside] = cached[where[inside]] == relative[inside]
            if not found.all():
                raise ValueError(
                    f"batch example {b} (cache row {row}) has targets at positions {relative[~found][:8].tolist()} "
                    f"that the cache does not hold (it has {cached.size} positions for this example): the labels "
                    "differ from those the cache was built with; rebuild it"
                )
            at = torch.from_numpy(wanted)
            out_ids[b, at] = torch.from_numpy(ids.reshape(-1, k)[where].astype(np.int64))
            out_top[b, at] = torch.from_numpy(top.reshape(-1, k)[where])
            out_tail[b, at] = torch.from_numpy(tail[where])
        device = input_ids.device
        return {"topk_ids": out_ids.to(device), "topk_logprobs": out_top.to(device),
                "tail_logprob": out_tail.to(device)}  # fmt: skip


# ---- hf-kd cache-teacher RECIPE ------------------------------------------------------------------------------------


def build_from_recipe(recipe, path: str, *, k: int = 64, batch_size: int = 8, shard_size: int = 1000) -> TeacherCache:
    """The cache of a recipe's teacher over its tokenized train (and eval) data, tokenized exactly as `train` does."""
    import datasets
    from transformers import AutoTokenizer

    from .data import prepare_datasets

    args = recipe.training_args(check_hardware=False)
    tokenizer = AutoTokenizer.from_pretrained(recipe.student.tokenizer or recipe.student.name_or_path)
    teacher_tokenizer = AutoTokenizer.from_pretrained(recipe.teacher.tokenizer or recipe.teacher.name_or_path)
    with args.main_process_first(desc="dataset preparation"):  # as `train` does: rank 0 tokenizes, the others reuse
        train, evaluation = prepare_datasets(recipe.data, tokenizer, teacher_tokenizer, seed=args.seed)
    dataset = train if evaluation is None else datasets.concatenate_datasets([train, evaluation])
    return build_teacher_cache(recipe.teacher.name_or_path, dataset, path, k=k, tokenizer=tokenizer,
                               batch_size=batch_size, shard_size=shard_size,
                               teacher_init_kwargs=args.teacher_model_init_kwargs)  # fmt: skip

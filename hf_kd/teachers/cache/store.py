"""Offline teacher: run the teacher once, store its top-k log-probabilities, distill from them many times.

:func:`build_teacher_cache` runs a frozen teacher over a tokenized dataset and writes::

    PATH/hf_kd_cache.json      metadata: format version, teacher, tokenizer (name and vocabulary hash), k, vocab_size,
                               dataset fingerprint and content hash, counts and bytes per position once complete
    PATH/shards/shard-00000/   a `datasets` Dataset (save_to_disk: Arrow, memory-mapped), ``shard_size`` examples each
    PATH/shards/shard-00001/   ...

One row per example, in dataset order. A "position" is a target of the shifted sequence: logits at position i
predict the token at i + 1, so position i is stored when ``labels[i + 1] != -100``. Columns:

* ``key`` (string): :func:`example_key`, the sha256 of the example's attended token ids and target positions.
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
from typing import Any

import numpy as np
import torch

from hf_kd.objective.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: rows keyed by token ids and target positions
METADATA_FILE = "hf_kd_cache.json"
TOPK_ROWS = 4096  # positions per float32 log-softmax in a build: 4096 x 128k vocab x 4 B = 2 GB at most
# a resumed build must agree with the interrupted one on these (training checks teacher, tokenizer_hash and vocab_size
# against its own setup in TeacherCache.check_compatible)
BUILD_SETTINGS = ("format_version", "teacher", "tokenizer_hash", "k", "vocab_size", "content_hash", "shard_size")


def example_key(input_ids, attention_mask=None, positions=None) -> str:
    """sha256 hex of the attended token ids (``attention_mask == 1``) as little-endian int32 -- padding never counts --
    and of the target ``positions`` (counted from the first attended token): two examples with the same ids and
    different label masks are two rows."""
    ids = torch.as_tensor(input_ids).reshape(-1)
    if attention_mask is not None:
        ids = ids[torch.as_tensor(attention_mask).reshape(-1).bool()]
    h = hashlib.sha256(ids.to(torch.int32).numpy().astype("<i4").tobytes())
    if positions is not None:
        h.update(b"|" + np.asarray(positions, dtype="<i4").tobytes())
    return h.hexdigest()


def target_positions(targets: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    """One example's ``[S - 1]`` target flags (shifted: position i predicts token i + 1) -> the target positions counted
    from the first attended token, so that left and right padding give the same positions."""
    return targets.nonzero().squeeze(-1).numpy() - _first_attended(attention_mask)


def row_positions(row: dict[str, Any]) -> np.ndarray:
    """:func:`target_positions` of an unpadded dataset row (``input_ids``, ``labels``, optional ``attention_mask``)."""
    ids = torch.as_tensor(row["input_ids"])
    mask = torch.as_tensor(row["attention_mask"]) if row.get("attention_mask") is not None else torch.ones_like(ids)
    labels = torch.as_tensor(row["labels"]) if row.get("labels") is not None else ids.masked_fill(mask == 0, -100)
    # a target predicted from a padding position is none (as in DistillationTrainer.target_labels)
    return target_positions((labels[1:] != IGNORE_INDEX) & (mask[:-1] == 1), mask)


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


def _shard_path(path: str, index: int) -> str:
    return os.path.join(path, "shards", f"shard-{index:05d}")


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
            raise ValueError(
                f"teacher cache {path} has format version {self.metadata.get('format_version')!r}; this "
                f"hf_kd reads version {FORMAT_VERSION}: rebuild the cache"
            )
        if require_complete and not self.metadata.get("complete"):
            raise ValueError(
                f"teacher cache {path} is incomplete (an interrupted build); run the same cache-teacher "
                "command again to finish it"
            )
        shards = []
        for index in range(self.metadata["num_shards"]):
            shard = _shard_path(path, index)
            if not os.path.isdir(shard):
                raise ValueError(f"teacher cache {path} lacks {os.path.relpath(shard, path)}; rebuild or resume it")
            shards.append(datasets.load_from_disk(shard))  # memory-mapped Arrow, nothing read yet
        self.data = datasets.concatenate_datasets(shards)
        if len(self.data) != self.metadata["num_examples"]:
            raise ValueError(
                f"teacher cache {path} has {len(self.data)} rows, its metadata says "
                f"{self.metadata['num_examples']}; rebuild it"
            )
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
            raise ValueError(
                f"teacher cache {self.path} holds {meta['teacher']!r}'s outputs, but the training setup "
                f"names the teacher {_name(teacher)!r}"
            )
        theirs, ours = meta.get("tokenizer_hash"), tokenizer_hash(tokenizer)
        if theirs and ours and theirs != ours:
            raise ValueError(
                f"teacher cache {self.path} was built from ids of tokenizer {meta['tokenizer']!r}, whose "
                "vocabulary differs from this run's tokenizer; rebuild the cache with it"
            )
        if self.vocab_size == student_vocab:
            return None
        size = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
        if self.vocab_size > student_vocab or size is None or size > self.vocab_size:
            raise ValueError(
                f"teacher cache {self.path} covers {self.vocab_size} vocab rows, the student has {student_vocab}"
                + ("" if size is None else f" and the tokenizer {size} tokens")
                + f"; rebuild it with vocab_size={min(self.vocab_size, student_vocab)} (and pass the tokenizer)"
            )
        logger.warning(
            "teacher cache vocab %d < student vocab %d: distilling over the shared first %d rows",
            self.vocab_size,
            student_vocab,
            self.vocab_size,
        )
        return self.vocab_size

    def missing(self, dataset) -> list[int]:
        """Indices of the ``dataset`` examples that have no cached row (an empty list when the cache covers it)."""
        missing = []
        for start in range(0, len(dataset), 1000):
            for offset, row in enumerate(_rows(dataset, start, min(start + 1000, len(dataset)))):
                if example_key(row["input_ids"], row.get("attention_mask"), row_positions(row)) not in self._index:
                    missing.append(start + offset)
        return missing

    def lookup(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        targets: torch.Tensor,
        ignore_index: int = IGNORE_INDEX,
    ) -> dict[str, torch.Tensor]:
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
            key = example_key(ids_cpu[b], mask_cpu[b], target_positions(targets_cpu[b] != ignore_index, mask_cpu[b]))
            if key not in self._index:
                raise ValueError(
                    f"batch example {b} ({int(mask_cpu[b].sum())} tokens, key {key[:12]}...) is not in the teacher "
                    f"cache {self.path}: its token ids or target positions differ from every cached example (other "
                    "data, tokenizer, truncation, packing or label masks); rebuild the cache from this dataset"
                )
            rows.append(self._index[key])
        table = self._arrow[rows]
        for b, row in enumerate(rows):
            cached = _expand(table.column("target_spans")[b].values.to_numpy())
            ids = table.column("topk_ids")[b].values.to_numpy()
            top = table.column("topk_logprobs")[b].values.to_numpy()
            tail = table.column("tail_logprob")[b].values.to_numpy()
            if ids.size != cached.size * k or top.size != ids.size or tail.size != cached.size:
                raise ValueError(
                    f"teacher cache {self.path} row {row} is corrupt: {cached.size} positions but "
                    f"{ids.size} ids, {top.size} log-probs, {tail.size} tails for k={k}"
                )
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
        return {
            "topk_ids": out_ids.to(device),
            "topk_logprobs": out_top.to(device),
            "tail_logprob": out_tail.to(device),
        }

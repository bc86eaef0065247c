"""Data for distillation: load and tokenize a recipe's dataset (labels -100 on prompts), pad batches (-100 on padding)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from hf_kd.models.tasks import IGNORE_INDEX, TEACHER_ID, Task
from hf_kd.recipe.schema import DATA_EXTENSIONS  # noqa: F401 (one table; recipe validation must not import torch)

logger = logging.getLogger(__name__)


@dataclass
class DistillationCollator:
    """Pad ``input_ids`` / ``attention_mask`` / ``labels`` to the longest example (right padding).

    Works on pre-tokenized data with no tokenizer. Missing ``labels`` become the input ids; missing
    ``attention_mask`` becomes all ones. A ``teacher_id`` per example (routing between several teachers) is passed
    on: a ``[B]`` long tensor of indices, or the list of member names. Padding is masked by *position* (labels -100 where padded), never by token
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
        if any(TEACHER_ID in ex for ex in examples):
            batch[TEACHER_ID] = teacher_ids([ex.get(TEACHER_ID) for ex in examples])
        return batch


def teacher_ids(values: list) -> torch.Tensor | list[str]:
    """The examples' ``teacher_id`` values -> a ``[B]`` long tensor (indices) or a list of names (strings); the
    teacher checks each against its members."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.long)
    if all(isinstance(v, str) for v in values):
        return list(values)
    raise ValueError(
        f"{TEACHER_ID}: every example needs a member index (int) or a member name (str), one kind per dataset; "
        f"got {sorted({type(v).__name__ for v in values})}"
    )


def default_collator(task: Task, processing_class):
    """The collator a trainer uses when given none: a classifier's one label per example is padded by the tokenizer
    (or stacked, for pixels and audio features); token-level tasks pad with :class:`DistillationCollator`."""
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, default_data_collator

    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if task.per_example:
        text = isinstance(tokenizer, PreTrainedTokenizerBase)  # an image processor has a pad() too, for pixels
        return DataCollatorWithPadding(tokenizer) if text else default_data_collator
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return DistillationCollator(pad_token_id=pad_id if pad_id is not None else 0)


# ---- loading and tokenization: a recipe's `data:` section -> tokenized datasets ---------------------------------------
# `data` below is a hf_kd.recipe.recipe.DataSection (or anything with the same attributes).


class DataError(ValueError):
    """Data that cannot be distilled on as configured; the message starts with the recipe key to change."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}")


def load_raw_dataset(source: str, split: str = "train", subset: str | None = None, streaming: bool = False):
    """A Hub dataset id, a local data file (always split "train"), or a local directory -> one ``datasets`` split."""
    import datasets

    path = os.path.expanduser(source)
    extension = os.path.splitext(path)[1].lower()
    if extension in DATA_EXTENSIONS:
        return datasets.load_dataset(DATA_EXTENSIONS[extension], data_files=path, split="train", streaming=streaming)
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):  # save_to_disk
            loaded = datasets.load_from_disk(path)
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(path, split=split, streaming=streaming)
    return datasets.load_dataset(source, subset, split=split, streaming=streaming)


def is_empty_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` has special tokens only: what transformers builds from a directory with a config and no
    tokenizer files (every word then becomes the unknown token)."""
    return len(tokenizer) <= len(set(tokenizer.all_special_ids))


def _with_eos(ids: list[int], tokenizer, add_eos: bool) -> list[int]:
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids


def encode_example(example: dict[str, Any], tokenizer, data, chat_template: str | None = None) -> dict[str, list[int]]:
    """One raw example -> ``{"input_ids", "labels"}`` (not truncated); labels are -100 where nothing is learned.

    ``classification``: the tokenizer's output (truncated to ``data.max_length``) and one integer ``labels``.

    ``chat_template`` overrides the tokenizer's own (the tokenizer check renders the teacher's view with the student's
    template: the teacher is fed the student's token ids, whatever its own template would have produced).
    """
    if data.format == "text":
        ids = _with_eos(
            tokenizer(example[data.text_field], add_special_tokens=True)["input_ids"], tokenizer, data.add_eos
        )
        return {"input_ids": ids, "labels": list(ids)}
    if data.format == "prompt_completion":
        # tokenized apart and concatenated: the prompt/completion boundary is exact, whatever the merges
        prompt = tokenizer(example[data.prompt_field], add_special_tokens=True)["input_ids"]
        completion = tokenizer(example[data.completion_field], add_special_tokens=False)["input_ids"]
        # an empty completion stays empty: EOS alone would teach the student to stop at once (prompt-only data is
        # then refused as having no trainable tokens instead of training on nothing but EOS)
        completion = _with_eos(completion, tokenizer, data.add_eos) if completion else completion
        masked = [IGNORE_INDEX] * len(prompt) if data.completion_only else prompt
        return {"input_ids": prompt + completion, "labels": masked + completion}
    if data.format == "prompt":  # prompt-only: every target is generated (lmbda 1 or seq_kd)
        prompt = example[data.prompt_field]
        template = chat_template or getattr(tokenizer, "chat_template", None)
        if isinstance(prompt, str) and not template:  # a base model: the text as it is
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:  # a user turn, or a conversation so far: rendered up to the assistant's turn, which generation writes
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, chat_template=template
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes BOS itself
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)}
    if data.format == "messages":
        return _encode_messages(example[data.messages_field], tokenizer, data.completion_only, chat_template)
    if data.format == "tokenized":
        ids = list(example["input_ids"])
        labels = example.get("labels")
        return {"input_ids": ids, "labels": list(ids) if labels is None else list(labels)}
    if data.format == "classification":  # one label per example; truncated here, so a BERT [SEP] survives it
        texts = [example[data.text_field]] + ([example[data.text_pair_field]] if data.text_pair_field else [])
        encoded = dict(tokenizer(*texts, truncation=True, max_length=data.max_length))
        label = example[data.label_field]
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise DataError(
                "data.label_field",
                f"labels must be class ids 0, 1, ... in the teacher's label order, got "
                f"{label!r} (an unlabeled split, such as GLUE's test splits, has -1)",
            )
        return {**encoded, "labels": label}
    raise DataError("data.format", f"unknown format {data.format!r}")


def _encode_messages(messages, tokenizer, completion_only: bool, chat_template: str | None) -> dict[str, list[int]]:
    """Render a conversation with the chat template; with ``completion_only`` only assistant turns are targets.

    An assistant turn spans from the end of ``messages[:i]`` rendered with the generation prompt to the end of
    ``messages[:i + 1]`` rendered -- when both are prefixes of the whole conversation's rendering. Templates that
    render earlier turns differently (Qwen3 drops their reasoning) keep only the turns where this holds, and always
    the last one.
    """

    def render(msgs, generation_prompt=False):
        return tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation_prompt, chat_template=chat_template
        )

    text = render(messages)
    # the template writes BOS itself: add_special_tokens=False avoids a second one
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=completion_only)
    ids = encoded["input_ids"]
    if not completion_only:
        return {"input_ids": ids, "labels": list(ids)}
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], generation_prompt=True) if i > 0 else ""
        turn = text if i == len(messages) - 1 else render(messages[: i + 1])
        if text.startswith(prompt) and text.startswith(turn):  # else this turn renders differently in context
            spans.append((len(prompt), len(turn)))
    labels = [
        token if any(s <= begin < e for s, e in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, encoded["offset_mapping"])
    ]
    return {"input_ids": ids, "labels": labels}


def _required_columns(data) -> list[tuple[str, str]]:
    return {
        "text": [("data.text_field", data.text_field)],
        "prompt_completion": [
            ("data.prompt_field", data.prompt_field),
            ("data.completion_field", data.completion_field),
        ],
        "prompt": [("data.prompt_field", data.prompt_field)],
        "messages": [("data.messages_field", data.messages_field)],
        "tokenized": [("data.format", "input_ids")],
        "classification": [("data.text_field", data.text_field), ("data.label_field", data.label_field)]
        + ([("data.text_pair_field", data.text_pair_field)] if data.text_pair_field else []),
    }[data.format] + ([("data.teacher_field", data.teacher_field)] if getattr(data, "teacher_field", None) else [])


def check_columns(dataset, data, tokenizer=None) -> None:
    """The columns the format reads exist (and a chat template, for messages)."""
    columns = list(dataset.column_names or [])
    for key, column in _required_columns(data):
        if column not in columns:
            raise DataError(key, f"the dataset has no column {column!r} (columns: {', '.join(columns)})")
    if data.format == "messages" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise DataError("data.format", "messages are rendered with the student tokenizer's chat template; it has none")


def count_targets(labels: list[int]) -> int:
    """Target positions of one example: labels[0] is never one (logits at i predict the token at i + 1)."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def tokenize_dataset(dataset, tokenizer, data, desc: str = "Tokenizing", keep_prompt_only: bool = False):
    """Encode, truncate to ``data.max_length`` (or pack into blocks of it), drop examples left with no target (unless
    ``keep_prompt_only``: every batch is generated, so a prompt is all an example needs)."""
    check_columns(dataset, data, tokenizer)
    max_length, packing = data.max_length, data.packing
    routed = getattr(data, "teacher_field", None)  # each example's teacher travels with it, as teacher_id
    if routed and packing:
        raise DataError("data.packing", "a packed block mixes examples, and each example names its own teacher")

    def with_teacher(example, encoded):
        return {**encoded, TEACHER_ID: example[routed]} if routed else encoded

    if data.format == "classification":  # every example is one target: nothing to mask, truncate or drop
        return dataset.map(
            lambda example: with_teacher(example, encode_example(example, tokenizer, data)),
            remove_columns=dataset.column_names,
            num_proc=data.num_proc,
            desc=desc,
        )

    def encode(example):
        encoded = encode_example(example, tokenizer, data)
        if data.format == "prompt":  # a prompt keeps its end: the assistant header that generation continues from
            encoded = {k: v[-max_length:] for k, v in encoded.items()}
        elif not packing:  # packing cuts the concatenated stream into blocks instead
            encoded = {k: v[:max_length] for k, v in encoded.items()}
        if len(encoded["labels"]) != len(encoded["input_ids"]):
            raise DataError(
                "data", f"an example has {len(encoded['labels'])} labels for {len(encoded['input_ids'])} ids"
            )
        return with_teacher(example, encoded)

    tokenized = dataset.map(encode, remove_columns=dataset.column_names, num_proc=data.num_proc, desc=desc)
    if packing:
        tokenized = pack_dataset(tokenized, max_length)
    if keep_prompt_only:
        return tokenized
    keep = tokenized.filter(
        lambda batch: [count_targets(x) > 0 for x in batch["labels"]],
        batched=True,
        desc="Dropping examples without targets",
    )
    if len(keep) == 0:
        raise DataError(
            "data",
            f"no trainable tokens: all {len(tokenized)} examples have every target masked or truncated away "
            f"(prompt-only data? completion_only with empty completions? max_length={max_length} too short?)",
        )
    if len(keep) < len(tokenized):
        logger.warning(
            "%s: dropped %d of %d examples with no target tokens", desc, len(tokenized) - len(keep), len(tokenized)
        )
    return keep


def pack_dataset(dataset, max_length: int):
    """Concatenate tokenized examples and cut the stream into ``max_length`` blocks (the last block may be shorter).

    Labels travel with their tokens, so prompts stay masked. Attention is not reset at example boundaries (GPT-style
    packing): use it for pretraining-like text, not when examples must not see each other.
    """

    def pack(batch):
        ids = [t for row in batch["input_ids"] for t in row]
        labels = [t for row in batch["labels"] for t in row]
        starts = range(0, len(ids), max_length)
        return {
            "input_ids": [ids[i : i + max_length] for i in starts],
            "labels": [labels[i : i + max_length] for i in starts],
        }

    return dataset.map(pack, batched=True, batch_size=1000, remove_columns=dataset.column_names, desc="Packing")


def check_tokenizers_agree(student_tokenizer, teacher_tokenizer, examples: list[dict[str, Any]], data) -> str:
    """Refuse (DataError) unless the teacher tokenizer yields the student's ids on every sample example.

    The trainer feeds the student's token ids to the teacher: an id that means another string to the teacher makes
    its soft targets garbage. Returns a one-line summary of what was checked.
    """
    template = getattr(student_tokenizer, "chat_template", None)
    tokens = 0
    for index, example in enumerate(examples):
        if data.format == "tokenized":  # no text: compare what each id means to both
            ids = list(example["input_ids"])
            student_ids = teacher_ids = ids
            student_pieces = student_tokenizer.convert_ids_to_tokens(ids)
            teacher_pieces = teacher_tokenizer.convert_ids_to_tokens(ids)
        else:
            student_ids = encode_example(example, student_tokenizer, data)["input_ids"]
            teacher_ids = encode_example(example, teacher_tokenizer, data, chat_template=template)["input_ids"]
            student_pieces = student_tokenizer.convert_ids_to_tokens(student_ids)
            teacher_pieces = teacher_tokenizer.convert_ids_to_tokens(teacher_ids)
        if student_ids != teacher_ids or student_pieces != teacher_pieces:
            pos = next(
                (
                    i
                    for i, pair in enumerate(zip(student_ids, teacher_ids, student_pieces, teacher_pieces))
                    if pair[0] != pair[1] or pair[2] != pair[3]
                ),
                min(len(student_ids), len(teacher_ids)),
            )
            show = lambda ids, pieces: f"id {ids[pos]} ({pieces[pos]!r})" if pos < len(ids) else "the end"  # noqa: E731
            raise DataError(
                "tokenizers",
                f"the teacher and student tokenizers disagree on sample example {index} at token {pos}: the student has "
                f"{show(student_ids, student_pieces)}, the teacher {show(teacher_ids, teacher_pieces)}. Distillation "
                "feeds the student's ids to the teacher; pick a pair that shares one tokenizer (teacher.tokenizer / "
                "student.tokenizer)",
            )
        tokens += len(student_ids)
    return f"{len(examples)} sample examples ({tokens} tokens) tokenize identically with both tokenizers"


def _load_or_explain(key: str, *args):
    """:func:`load_raw_dataset`, its failure (unreachable Hub id, malformed file, missing split) as a DataError."""
    import datasets

    try:
        raw = load_raw_dataset(*args)
    except StopIteration:  # `datasets` reading an empty file
        raise DataError(key, f"{args[0]!r} has no examples") from None
    except (OSError, ValueError, KeyError, datasets.exceptions.DatasetsError) as err:
        cause = err.__cause__ if isinstance(err, datasets.exceptions.DatasetGenerationError) and err.__cause__ else err
        why = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DataError(key, f"cannot load {args[0]!r}: {why}") from None
    if len(raw) == 0:
        raise DataError(key, f"{args[0]!r} has no examples")
    return raw


def prepare_datasets(
    data, tokenizer, teacher_tokenizer=None, seed: int = 0, every_batch_generated: bool = False, generates: bool = False
):
    """Load, check and tokenize the train (and eval) data of a recipe -> ``(train, eval or None)``.

    ``generates`` (``lmbda > 0`` or ``seq_kd``): some completions are generated, from one prompt per example.
    ``every_batch_generated`` (``lmbda: 1`` or ``seq_kd``): training examples need only a prompt.
    """
    if data.packing and (generates or every_batch_generated):
        raise DataError(
            "data.packing",
            "a packed block mixes examples, and a generated completion needs one prompt per "
            "example: set packing: false with lmbda > 0 or seq_kd",
        )
    if data.format == "prompt" and not every_batch_generated:
        raise DataError(
            "data.format",
            "prompt-only data has no completions to distill on: set training.lmbda: 1 "
            "(on-policy) or training.seq_kd: true (teacher completions)",
        )
    if data.format == "prompt" and (data.eval_split is not None or data.eval_size > 0):
        raise DataError(
            "data.eval_size" if data.eval_size > 0 else "data.eval_split",
            "prompt-only data has no "
            "targets to evaluate on: drop the eval set, or evaluate with prompt_completion data",
        )
    raw = _load_or_explain("data.dataset", data.dataset, data.split, data.subset)
    check_columns(raw, data, tokenizer)
    if data.max_samples is not None:
        raw = raw.select(range(min(data.max_samples, len(raw))))
    raw_eval = None
    if data.eval_split is not None:
        is_file = os.path.splitext(data.eval_split)[1].lower() in DATA_EXTENSIONS or os.path.isdir(data.eval_split)
        source = (data.eval_split,) if is_file else (data.dataset, data.eval_split, data.subset)
        raw_eval = _load_or_explain("data.eval_split", *source)
    elif data.eval_size > 0:
        size = data.eval_size if data.eval_size < 1 else int(data.eval_size)
        if len(raw) < 2 or (size >= 1 and size >= len(raw)):
            raise DataError("data.eval_size", f"cannot hold out {data.eval_size} of {len(raw)} training examples")
        parts = raw.train_test_split(test_size=size, seed=seed)
        raw, raw_eval = parts["train"], parts["test"]
    if raw_eval is not None and data.max_eval_samples is not None:
        raw_eval = raw_eval.select(range(min(data.max_eval_samples, len(raw_eval))))
    if teacher_tokenizer is not None and data.tokenizer_check_samples > 0:
        sample = raw.select(range(min(data.tokenizer_check_samples, len(raw))))
        logger.info(check_tokenizers_agree(tokenizer, teacher_tokenizer, list(sample), data))
    train = tokenize_dataset(raw, tokenizer, data, desc="Tokenizing train", keep_prompt_only=every_batch_generated)
    evaluation = tokenize_dataset(raw_eval, tokenizer, data, desc="Tokenizing eval") if raw_eval is not None else None
    return train, evaluation

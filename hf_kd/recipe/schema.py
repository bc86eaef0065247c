"""A recipe's sections as dataclasses, and how their values are read and checked (no torch, no transformers).

Every problem is a :class:`RecipeError` whose message is ``<file>: <key>: <problem>``. YAML's ``2e-5`` is the
*string* '2e-5' (YAML 1.1 wants a dot), so every value is coerced through the type of the field it sets
(:func:`coerce`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

# the data files hf_kd.data reads: declared here, where validating a recipe needs it without importing torch
DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
DATA_FORMATS = ("text", "prompt_completion", "prompt", "messages", "tokenized", "classification")
RECIPE_TASKS = ("causal_lm", "classification")  # training.task; token_classification: the Python API only, for now
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
# these raise on a machine without a GPU; `hf-kd check` on a laptop still validates a GPU recipe
HARDWARE_FIELDS = ("bf16", "fp16", "bf16_full_eval", "fp16_full_eval", "tf32")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_INTEGER = re.compile(r"[+-]?\d+")


class RecipeError(ValueError):
    """A recipe problem, printed by the CLI as ``error: <file>: <key>: <problem>`` (exit code 2)."""

    def __init__(self, file: str, key: str, problem: str):
        self.file, self.key, self.problem = file, key, problem
        super().__init__(f"{file}: {key}: {problem}")


@dataclass
class ModelSection:
    """The teacher or the student."""

    name_or_path: str  # a Hub id (org/name), a local save_pretrained directory, or (teacher) "self" with a peft section
    tokenizer: str | None = None  # defaults to name_or_path
    dtype: str | None = None  # None: teacher bfloat16 on GPU / float32 on CPU; student float32 (fp32 master weights)
    init_kwargs: dict = field(default_factory=dict)  # more from_pretrained kwargs, e.g. attn_implementation
    cache: str | None = None  # teacher only: a hf-kd cache-teacher directory; training then loads no teacher model
    kind: str | None = None  # teacher only: hf_kd.TEACHERS' name, or 'your.module:kind' (default: from the above)
    options: dict = field(default_factory=dict)  # teacher only: the settings of a teacher kind of your own
    url: str | None = None  # teacher only: a teacher server (hf-kd serve-teacher); name_or_path defaults to it
    token_file: str | None = None  # teacher only: the file holding that server's token
    server: str = "hf_kd"  # teacher only: what answers at url: hf_kd (hf-kd serve-teacher: hidden states) or vllm
    top_k: int = 20  # teacher only, server vllm: log-probabilities per position (vLLM's --max-logprobs, default 20)


@dataclass
class DataSection:
    """Where the examples come from and how they become token ids."""

    dataset: str  # a Hub dataset id, a local .json/.jsonl/.parquet/.csv/.txt file, or a local directory
    subset: str | None = None  # the Hub dataset's configuration name, if it has several
    split: str = "train"  # a Hub/directory split; a single local file is always the split "train"
    # text | prompt_completion | prompt (prompt only: generated completions) | messages | tokenized | classification
    format: str = "text"
    text_field: str = "text"  # classification: the text to classify
    text_pair_field: str | None = None  # classification: a second text (e.g. NLI's hypothesis), encoded as a pair
    label_field: str = "label"  # classification: an integer class id, in the teacher's label order
    prompt_field: str = "prompt"  # prompt_completion: a text; prompt: a text, or messages ending before the answer
    completion_field: str = "completion"
    messages_field: str = "messages"  # a list of {role, content}, rendered with the student's chat template
    completion_only: bool = True  # prompt / non-assistant tokens get label -100 (no CE and no KD on them)
    add_eos: bool = True  # append EOS to text and completions so the student learns to stop
    max_length: int = 2048  # longer examples are truncated (packing: the length of each packed block)
    packing: bool = False  # concatenate examples into max_length blocks (attention crosses example boundaries)
    eval_split: str | None = None  # a split of the same dataset, or a local data file
    eval_size: float = 0.0  # if no eval_split: hold out this fraction (< 1) or number (>= 1) of train examples
    max_samples: int | None = None  # use only the first N training examples (smoke tests)
    max_eval_samples: int | None = None  # evaluate on the first N eval examples (evaluation runs every eval_steps)
    num_proc: int | None = None  # worker processes for tokenization
    # several teachers (teachers:), routed: the column naming each example's teacher (an index from 0, or a member's
    # name); it reaches the batch as teacher_id. None: the teachers are mixed by their weights
    teacher_field: str | None = None
    tokenizer_check_samples: int = 64  # examples tokenized by both tokenizers to prove they agree


def takes_text(section: str, key: str, text: str) -> bool:
    cls = {"teacher": ModelSection, "student": ModelSection, "data": DataSection}.get(section)
    hint = typing.get_type_hints(cls).get(key) if cls is not None else None
    return hint is not None and str in (typing.get_args(hint) or (hint,)) and text.lower() not in ("null", "none")


def yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def reject_unknown(path: str, prefix: str, mapping: dict, known) -> None:
    for key in mapping:
        if key not in known:
            hint = difflib.get_close_matches(str(key), list(known), n=1)
            suffix = f" (did you mean {hint[0]!r}?)" if hint else f"; expected one of: {', '.join(known)}"
            raise RecipeError(path, f"{prefix}{key}", f"unknown key{suffix}")


def coerce(value: Any, hint: Any) -> Any:
    """``value`` converted to the simple type ``hint`` (str, int, float, bool, dict, or one of them | None)."""
    args = typing.get_args(hint)
    if args:  # X | None
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if value is None:
        raise ValueError("must not be null")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ValueError(f"expected true or false, got {value!r}")
    if hint in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = int(value) if _INTEGER.fullmatch(value.strip()) else float(value)
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(f"expected a number, got {value!r}")
        if hint is int:
            if float(number) != int(number):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(number)
        # a whole number written as one stays one: `eval_steps: 10` is 10 in the resolved recipe, not 10.0
        return number if isinstance(number, int) else float(number)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {type_name(value)} {value!r}")
    if hint is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise ValueError(f"expected a mapping, got {type_name(value)}")
    raise TypeError(f"unsupported field type {hint!r}")  # a new section field with a type coerce does not know


def section_of(path: str, name: str, raw: Any, cls):
    if not isinstance(raw, dict):
        raise RecipeError(path, name, f"expected a mapping, got {type_name(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    reject_unknown(path, f"{name}.", raw, list(fields))
    values = {}
    for key, f in fields.items():
        if key not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(path, f"{name}.{key}", "required key missing")
            continue
        try:
            values[key] = coerce(raw[key], hints[key])
        except ValueError as err:
            raise RecipeError(path, f"{name}.{key}", str(err)) from None
    return cls(**values)


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or (os.sep != "/" and os.sep in name) or os.path.exists(name)


BUILT_IN_TEACHERS = ("model", "self", "cache", "cross_tokenizer")  # hf_kd.teachers' kinds (no torch import here)


def loads_teacher_model(teacher: ModelSection) -> bool:
    """Whether the teacher section names a model that the CLI may inspect and load: a teacher kind of the user's own
    decides what its name_or_path means."""
    return teacher.url is None and (teacher.kind is None or teacher.kind in ("model", "cross_tokenizer"))


def check_model(path: str, name: str, model: ModelSection) -> None:
    if name == "teacher" and model.url is not None:
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", model.url):
            raise RecipeError(path, "teacher.url", f"{model.url!r} is not http://host:port (hf-kd serve-teacher)")
        if model.server not in ("hf_kd", "vllm"):
            raise RecipeError(path, "teacher.server", f"{model.server!r} is not hf_kd (hf-kd serve-teacher) or vllm")
        if model.token_file is not None and not os.path.isfile(os.path.expanduser(model.token_file)):
            raise RecipeError(path, "teacher.token_file", f"no such file: {os.path.abspath(model.token_file)}")
        if model.kind is not None and model.kind != ("vllm" if model.server == "vllm" else "served"):
            raise RecipeError(
                path, "teacher.kind", f"a url makes a served teacher (server: {model.server}); remove kind or url"
            )
        return  # a served teacher: nothing local to check
    if name == "teacher" and model.kind is not None:
        if not re.fullmatch(r"([\w.]+:)?\w+", model.kind):
            raise RecipeError(
                path,
                "teacher.kind",
                f"{model.kind!r} is not a kind: built in: "
                f"{', '.join(BUILT_IN_TEACHERS)}, or 'your.module:kind' for a kind of your own",
            )
        if not isinstance(model.options, dict):
            raise RecipeError(path, "teacher.options", "expected a mapping of the teacher kind's settings")
        if not loads_teacher_model(model):
            return  # name_or_path is what the kind makes of it
    for key in ("name_or_path", "tokenizer"):
        value = getattr(model, key)
        if value is None:
            continue
        if _looks_local(value):
            if not os.path.isdir(os.path.expanduser(value)):
                raise RecipeError(path, f"{name}.{key}", f"no such directory: {os.path.abspath(value)}")
        elif not _HUB_ID.match(value):
            raise RecipeError(path, f"{name}.{key}", f"{value!r} is neither a local directory nor a Hub id (org/name)")
    if model.dtype is not None and model.dtype not in DTYPES:
        raise RecipeError(path, f"{name}.dtype", f"{model.dtype!r} is not one of {', '.join(DTYPES)}")
    for key, why in (
        ("dtype", f"use {name}.dtype"),
        ("torch_dtype", f"use {name}.dtype"),
        ("device_map", "accelerate places the models on devices; remove it"),
        ("pretrained_model_name_or_path", f"use {name}.name_or_path"),
    ):
        if key in model.init_kwargs:
            raise RecipeError(path, f"{name}.init_kwargs.{key}", why)


def check_data(path: str, data: DataSection) -> None:
    if data.format not in DATA_FORMATS:
        raise RecipeError(path, "data.format", f"{data.format!r} is not one of {', '.join(DATA_FORMATS)}")
    for key in ("dataset", "eval_split"):
        value = getattr(data, key)
        if value is None:
            continue
        if _is_data_file(value) or _looks_local(value):
            if not os.path.exists(os.path.expanduser(value)):
                raise RecipeError(path, f"data.{key}", f"no such file: {os.path.abspath(value)}")
        elif key == "dataset" and not _HUB_ID.match(value):
            raise RecipeError(path, "data.dataset", f"{value!r} is neither a local file nor a Hub dataset id")
    if data.max_length < 2:
        raise RecipeError(path, "data.max_length", f"must be >= 2 (one input and one target), got {data.max_length}")
    if data.eval_size < 0 or (data.eval_size >= 1 and not float(data.eval_size).is_integer()):
        raise RecipeError(
            path, "data.eval_size", f"must be a fraction in [0, 1) or a whole number, got {data.eval_size}"
        )
    if data.eval_split is not None and data.eval_size > 0:
        raise RecipeError(path, "data.eval_size", "give eval_split or eval_size, not both")
    for key in ("max_samples", "max_eval_samples", "num_proc", "tokenizer_check_samples"):
        value = getattr(data, key)
        if value is not None and value < (0 if key == "tokenizer_check_samples" else 1):
            raise RecipeError(path, f"data.{key}", f"must be positive, got {value}")


def _is_data_file(value: str) -> bool:
    return os.path.splitext(value)[1].lower() in DATA_EXTENSIONS

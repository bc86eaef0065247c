"""A recipe YAML -> validated dataclasses, before any model or dataset is touched.

A recipe has five top-level sections::

    teacher:  {name_or_path, tokenizer, dtype, init_kwargs}
    student:  {name_or_path, tokenizer, dtype, init_kwargs}
    data:     {dataset, split, format, ..., max_length, packing, eval_split | eval_size}
    training: any DistillationConfig / TrainingArguments field (loss_type, temperature, learning_rate, task, ...)
    peft:     optional LoraConfig keyword arguments

Every problem is a :class:`RecipeError` whose message is ``<file>: <key>: <problem>``. YAML's ``2e-5`` is the
*string* '2e-5' (YAML 1.1 wants a dot), so every value is coerced through the type of the field it sets.

Validation imports nothing heavy until every name is known to exist: a typo anywhere (a section, a key, a
command-line override) is reported in a fraction of a second (see :mod:`hf_kd.recipe_training`); only then are the
training values checked through ``DistillationConfig`` (transformers and torch: seconds).
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
    tokenizer_check_samples: int = 64  # examples tokenized by both tokenizers to prove they agree


@dataclass
class Recipe:
    path: str
    teacher: ModelSection
    student: ModelSection
    data: DataSection
    training: dict[str, Any]  # coerced DistillationConfig keyword arguments (validated)
    peft: dict[str, Any] | None = None  # LoraConfig keyword arguments (validated)

    @property
    def task(self) -> str:
        """``causal_lm`` (the default) or ``classification``: which Auto class loads the student and the teacher."""
        return self.training.get("task") or "causal_lm"

    def training_args(self, check_hardware: bool = True):
        """The DistillationConfig, teacher included. ``check_hardware=False`` turns bf16/fp16/tf32 off instead of
        failing on a machine without a GPU (validation and `hf-kd check`; ``self.training`` keeps the asked values)."""
        from .recipe_training import build_config

        return build_config(self.path, self._config_kwargs(), neutralize_hardware=not check_hardware)

    def _config_kwargs(self) -> dict[str, Any]:
        init_kwargs = dict(self.teacher.init_kwargs)
        if self.teacher.dtype is not None:
            init_kwargs["dtype"] = self.teacher.dtype
        cache = {"teacher_cache": self.teacher.cache} if self.teacher.cache else {}
        return {
            **cache,  # a --teacher_cache override (in self.training) wins over the recipe's teacher.cache
            **self.training,
            "teacher_model_name_or_path": self.teacher.name_or_path,
            "teacher_model_init_kwargs": init_kwargs or None,
            # the teacher's own tokenizer: a different one means cross-tokenizer distillation (hf_kd.alignment)
            "teacher_tokenizer_name_or_path": None if self.teacher.name_or_path == "self" else (
                self.teacher.tokenizer or self.teacher.name_or_path),
        }  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher": dataclasses.asdict(self.teacher),
            "student": dataclasses.asdict(self.student),
            "data": dataclasses.asdict(self.data),
            "training": self.training,
            "peft": self.peft,
        }


# ---- loading ------------------------------------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, coerce and validate a recipe. ``overrides`` are command-line flags: training fields (``["--max_steps",
    "10"]``) and any recipe key by its dotted name (``["--data.max_samples", "100"]``)."""
    from .recipe_training import (
        check_override_flags,
        check_training_keys,
        coerce_training,
        parse_overrides,
        split_overrides,
    )

    path = str(path)
    section_overrides, training_flags = split_overrides(path, overrides or [])
    if os.path.isdir(path):
        raise RecipeError(path, "recipe", "is a directory; give the recipe's .yaml file (e.g. recipes/qwen3-8b-to-0.6b.yaml)")
    if not os.path.isfile(path):
        raise RecipeError(path, "recipe", "no such file")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except UnicodeDecodeError:
        raise RecipeError(path, "recipe", "not a text file (a recipe is UTF-8 YAML)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "yaml"
        raise RecipeError(path, where, f"invalid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(raw, dict):
        raise RecipeError(path, "recipe", "expected a mapping with teacher, student, data and training sections")
    raw = _with_overrides(raw, section_overrides)
    _reject_unknown(path, "", raw, ("teacher", "student", "data", "training", "peft"))
    for name in ("teacher", "student", "data"):
        if name not in raw:
            raise RecipeError(path, name, "required section missing")

    teacher = _section(path, "teacher", raw["teacher"], ModelSection)
    student = _section(path, "student", raw["student"], ModelSection)
    for name, model in (("teacher", teacher), ("student", student)):
        _check_model(path, name, model)
    if student.cache is not None:
        raise RecipeError(path, "student.cache", "only the teacher can be cached (hf-kd cache-teacher); remove it")
    data = _section(path, "data", raw["data"], DataSection)
    _check_data(path, data)

    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise RecipeError(path, "training", f"expected a mapping of DistillationConfig fields, got {_kind(training)}")
    peft = raw.get("peft")
    # every name first (cached names: no heavy import), then the values
    check_training_keys(path, training)
    check_override_flags(path, training_flags)
    if isinstance(peft, dict):
        _reject_unknown(path, "peft.", peft, _peft_fields())
    training = coerce_training(path, training)
    training.update(parse_overrides(path, training_flags))  # the command line wins over the YAML
    for key in ("teacher_model_name_or_path", "teacher_model_init_kwargs", "teacher_tokenizer_name_or_path"):
        if key in training:
            raise RecipeError(path, f"training.{key}", "set the teacher in the teacher: section instead")
    if not training.get("output_dir"):
        raise RecipeError(path, "training.output_dir", "required: set it in the recipe or pass --output_dir")
    recipe = Recipe(path=path, teacher=teacher, student=student, data=data, training=training)

    config = recipe.training_args(check_hardware=False)
    _check_task(path, recipe)
    has_eval = data.eval_split is not None or data.eval_size > 0
    if config.eval_strategy != "no" and not has_eval:
        raise RecipeError(path, "training.eval_strategy", "evaluation needs data.eval_split or data.eval_size")

    if peft is not None:
        recipe.peft = _check_peft(path, peft)
    if teacher.name_or_path == "self" and recipe.peft is None:
        raise RecipeError(path, "teacher.name_or_path", "'self' (the student's base model, adapters disabled) needs a "
                                                         "peft section: without adapters teacher and student are one model")  # fmt: skip
    return recipe


def _with_overrides(raw: dict, overrides: dict[str, dict[str, str]]) -> dict:
    """``raw`` with the command line's dotted keys set (``data.max_samples``, ``teacher.init_kwargs.x``); a value is
    read as YAML (``100``, ``true``, ``{a: 1}``) except for a string field, which takes the text as written."""
    raw = dict(raw)
    for section, values in overrides.items():
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            continue  # the section itself is wrong: validation says so
        raw[section] = updated = dict(raw.get(section) or {})
        for dotted, text in values.items():
            *parents, key = dotted.split(".")
            target = updated
            for parent in parents:
                if not isinstance(target.get(parent), dict):
                    target[parent] = {}
                target[parent] = target = dict(target[parent])
            target[key] = text if not parents and _takes_text(section, key, text) else _yaml_value(text)
    return raw


def _takes_text(section: str, key: str, text: str) -> bool:
    cls = {"teacher": ModelSection, "student": ModelSection, "data": DataSection}.get(section)
    hint = typing.get_type_hints(cls).get(key) if cls is not None else None
    return hint is not None and str in (typing.get_args(hint) or (hint,)) and text.lower() not in ("null", "none")


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _peft_fields() -> list[str]:
    from .recipe_training import known_names

    return known_names("peft")["fields"]


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _reject_unknown(path: str, prefix: str, mapping: dict, known) -> None:
    for key in mapping:
        if key not in known:
            hint = difflib.get_close_matches(str(key), list(known), n=1)
            suffix = f" (did you mean {hint[0]!r}?)" if hint else f"; expected one of: {', '.join(known)}"
            raise RecipeError(path, f"{prefix}{key}", f"unknown key{suffix}")


def _coerce(value: Any, hint: Any) -> Any:
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
        raise ValueError(f"expected a string, got {_kind(value)} {value!r}")
    if hint is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise ValueError(f"expected a mapping, got {_kind(value)}")
    raise TypeError(f"unsupported field type {hint!r}")  # a new section field with a type _coerce does not know


def _section(path: str, name: str, raw: Any, cls):
    if not isinstance(raw, dict):
        raise RecipeError(path, name, f"expected a mapping, got {_kind(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(path, f"{name}.", raw, list(fields))
    values = {}
    for key, f in fields.items():
        if key not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(path, f"{name}.{key}", "required key missing")
            continue
        try:
            values[key] = _coerce(raw[key], hints[key])
        except ValueError as err:
            raise RecipeError(path, f"{name}.{key}", str(err)) from None
    return cls(**values)


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or (os.sep != "/" and os.sep in name) or os.path.exists(name)


def _check_model(path: str, name: str, model: ModelSection) -> None:
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


def _check_data(path: str, data: DataSection) -> None:
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
        raise RecipeError(path, "data.eval_size", f"must be a fraction in [0, 1) or a whole number, got {data.eval_size}")
    if data.eval_split is not None and data.eval_size > 0:
        raise RecipeError(path, "data.eval_size", "give eval_split or eval_size, not both")
    for key in ("max_samples", "max_eval_samples", "num_proc", "tokenizer_check_samples"):
        value = getattr(data, key)
        if value is not None and value < (0 if key == "tokenizer_check_samples" else 1):
            raise RecipeError(path, f"data.{key}", f"must be positive, got {value}")


def _check_task(path: str, recipe: Recipe) -> None:
    task, data_format = recipe.task, recipe.data.format
    if task not in RECIPE_TASKS:
        raise RecipeError(path, "training.task", f"{task!r} is not available in recipes ({', '.join(RECIPE_TASKS)}); "
                                                 "use DistillationTrainer from Python")  # fmt: skip
    if task == "classification" and data_format != "classification":
        raise RecipeError(path, "data.format", "training.task classification reads a text and a label per example: "
                                               "set data.format: classification")  # fmt: skip
    if task != "classification" and data_format == "classification":
        raise RecipeError(path, "training.task", "data.format classification needs training.task: classification")
    if data_format == "classification" and recipe.data.packing:
        raise RecipeError(path, "data.packing", "a classification example has one label: it cannot be packed")


def _is_data_file(value: str) -> bool:
    return os.path.splitext(value)[1].lower() in DATA_EXTENSIONS


def _check_peft(path: str, peft: Any) -> dict[str, Any]:
    if not isinstance(peft, dict):
        raise RecipeError(path, "peft", f"expected a mapping of LoraConfig arguments, got {_kind(peft)}")
    _reject_unknown(path, "peft.", peft, _peft_fields())
    from peft import LoraConfig  # only recipes with a peft section pay for the import

    hints = typing.get_type_hints(LoraConfig)
    peft = dict(peft)
    for key, value in peft.items():
        simple = [a for a in (typing.get_args(hints[key]) or (hints[key],)) if a is not type(None)]
        if len(simple) == 1 and simple[0] in (int, float, bool):  # `lora_dropout: 5e-2` is the string '5e-2' in YAML
            try:
                peft[key] = _coerce(value, hints[key])
            except ValueError as err:
                raise RecipeError(path, f"peft.{key}", str(err)) from None
    try:
        LoraConfig(**peft)  # target_modules / task_type left out are filled in by the trainer from the student
    except (TypeError, ValueError) as err:
        raise RecipeError(path, "peft", str(err).splitlines()[0]) from None
    return peft

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
command-line override) is reported in a fraction of a second (see :mod:`hf_kd.recipe.training`); only then are the
training values checked through ``DistillationConfig`` (transformers and torch: seconds).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from hf_kd.recipe.schema import (  # noqa: F401 (DATA_EXTENSIONS ... loads_teacher_model: importable from here too)
    BUILT_IN_TEACHERS,
    DATA_EXTENSIONS,
    DATA_FORMATS,
    RECIPE_TASKS,
    DataSection,
    ModelSection,
    RecipeError,
    check_data,
    check_model,
    coerce,
    loads_teacher_model,
    reject_unknown,
    section_of,
    takes_text,
    type_name,
    yaml_value,
)
from hf_kd.recipe.training import (
    build_config,
    check_override_flags,
    check_training_keys,
    coerce_training,
    known_names,
    parse_overrides,
    split_overrides,
)


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
        return build_config(self.path, self._config_kwargs(), neutralize_hardware=not check_hardware)

    def _config_kwargs(self) -> dict[str, Any]:
        init_kwargs = dict(self.teacher.init_kwargs)
        if self.teacher.dtype is not None:
            init_kwargs["dtype"] = self.teacher.dtype
        cache = {"teacher_cache": self.teacher.cache} if self.teacher.cache else {}
        if self.teacher.url is not None:
            served = {"url": self.teacher.url, "token_file": self.teacher.token_file}
            if self.teacher.server == "vllm":
                served["top_k"] = self.teacher.top_k
            kind = "vllm" if self.teacher.server == "vllm" else "served"
            cache.update(teacher_kind=kind, teacher_options={**self.teacher.options, **served})
        elif self.teacher.kind is not None:
            cache.update(teacher_kind=self.teacher.kind, teacher_options=self.teacher.options or None)
        return {
            **cache,  # a --teacher_cache override (in self.training) wins over the recipe's teacher.cache
            **self.training,
            "teacher_model_name_or_path": self.teacher.name_or_path,
            "teacher_model_init_kwargs": init_kwargs or None,
            # the teacher's own tokenizer: a different one means cross-tokenizer distillation (hf_kd.teachers.cross_tokenizer.alignment)
            "teacher_tokenizer_name_or_path": None
            if self.teacher.name_or_path == "self"
            else (self.teacher.tokenizer or (self.teacher.name_or_path if loads_teacher_model(self.teacher) else None)),
        }

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
    path = str(path)
    section_overrides, training_flags = split_overrides(path, overrides or [])
    if os.path.isdir(path):
        raise RecipeError(
            path, "recipe", "is a directory; give the recipe's .yaml file (e.g. recipes/qwen3-8b-to-0.6b.yaml)"
        )
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
    reject_unknown(path, "", raw, ("teacher", "teachers", "student", "data", "training", "peft"))
    if "teachers" in raw:
        raw = {**raw, "teacher": _mixture_section(path, raw)}
    for name in ("teacher", "student", "data"):
        if name not in raw:
            raise RecipeError(path, name, "required section missing")

    raw_teacher = raw["teacher"]
    if isinstance(raw_teacher, dict) and raw_teacher.get("url") and "name_or_path" not in raw_teacher:
        raw_teacher = {**raw_teacher, "name_or_path": raw_teacher["url"]}  # a served teacher is named by its address
    teacher = section_of(path, "teacher", raw_teacher, ModelSection)
    student = section_of(path, "student", raw["student"], ModelSection)
    for name, model in (("teacher", teacher), ("student", student)):
        check_model(path, name, model)
    if student.cache is not None:
        raise RecipeError(path, "student.cache", "only the teacher can be cached (hf-kd cache-teacher); remove it")
    for key in ("kind", "options", "url", "token_file"):  # (server and top_k have defaults: not checked)
        if getattr(student, key):
            raise RecipeError(path, f"student.{key}", "applies to the teacher only; remove it")
    data = section_of(path, "data", raw["data"], DataSection)
    check_data(path, data)

    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise RecipeError(
            path, "training", f"expected a mapping of DistillationConfig fields, got {type_name(training)}"
        )
    peft = raw.get("peft")
    # every name first (cached names: no heavy import), then the values
    check_training_keys(path, training)
    check_override_flags(path, training_flags)
    if isinstance(peft, dict):
        reject_unknown(path, "peft.", peft, _peft_fields())
    training = coerce_training(path, training)
    training.update(parse_overrides(path, training_flags))  # the command line wins over the YAML
    for key in (
        "teacher_model_name_or_path",
        "teacher_model_init_kwargs",
        "teacher_tokenizer_name_or_path",
        "teacher_kind",
        "teacher_options",
    ):
        if key in training:
            raise RecipeError(path, f"training.{key}", "set the teacher in the teacher: section instead")
    if not training.get("output_dir"):
        raise RecipeError(path, "training.output_dir", "required: set it in the recipe or pass --output_dir")
    recipe = Recipe(path=path, teacher=teacher, student=student, data=data, training=training)

    config = recipe.training_args(check_hardware=False)
    _check_task(path, recipe)
    if data.teacher_field is not None and teacher.kind != "mixture":
        raise RecipeError(
            path, "data.teacher_field", "routes examples between several teachers: list them in teachers:"
        )
    if data.teacher_field is not None and data.packing:
        raise RecipeError(path, "data.packing", "a packed block mixes examples, and each example names its teacher")
    has_eval = data.eval_split is not None or data.eval_size > 0
    if config.eval_strategy != "no" and not has_eval:
        raise RecipeError(path, "training.eval_strategy", "evaluation needs data.eval_split or data.eval_size")

    if peft is not None:
        recipe.peft = _check_peft(path, peft)
    if teacher.name_or_path == "self" and recipe.peft is None:
        raise RecipeError(
            path,
            "teacher.name_or_path",
            "'self' (the student's base model, adapters disabled) needs a "
            "peft section: without adapters teacher and student are one model",
        )
    return recipe


def _mixture_section(path: str, raw: dict) -> dict:
    """``teachers: [{..., weight: w}, ...]`` -> the teacher section of a ``mixture`` teacher (each member checked as a
    teacher section of its own)."""
    if "teacher" in raw:
        raise RecipeError(path, "teachers", "give either teacher (one) or teachers (several), not both")
    members = raw["teachers"]
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, dict) for m in members):
        raise RecipeError(path, "teachers", "expected a list of two teacher sections or more")
    routed = isinstance(raw.get("data"), dict) and raw["data"].get("teacher_field") is not None
    sections, weights = [], []
    for index, member in enumerate(members):
        member = dict(member)
        if routed and "weight" in member:
            raise RecipeError(
                path, f"teachers[{index}].weight", "data.teacher_field routes each example to one teacher: no weights"
            )
        name = member.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise RecipeError(path, f"teachers[{index}].name", f"must be a non-empty text without '/', got {name!r}")
        weights.append(member.pop("weight", 1.0))
        if not isinstance(weights[-1], (int, float)) or isinstance(weights[-1], bool) or weights[-1] < 0:
            raise RecipeError(path, f"teachers[{index}].weight", f"must be a number >= 0, got {weights[-1]!r}")
        if member.get("url") and "name_or_path" not in member:
            member["name_or_path"] = member["url"]
        section = section_of(path, f"teachers[{index}]", member, ModelSection)
        check_model(path, "teacher", section)
        if section.server != "hf_kd":
            raise RecipeError(
                path,
                f"teachers[{index}].server",
                "a mixture mixes full distributions; a vLLM "
                "teacher sends top-k log-probabilities (serve it with hf-kd serve-teacher)",
            )
        spec = {k: v for k, v in dataclasses.asdict(section).items() if v not in (None, {})}
        spec.pop("server"), spec.pop("top_k")  # the defaults of a served teacher: hf-kd serve-teacher
        if "dtype" in spec:  # as for one teacher: a from_pretrained keyword
            spec["init_kwargs"] = {**spec.get("init_kwargs", {}), "dtype": spec.pop("dtype")}
        if loads_teacher_model(section) and section.name_or_path != "self":
            spec.setdefault("tokenizer", section.name_or_path)  # the teacher's own, as for one teacher
        sections.append({**spec, "name": name} if name is not None else spec)
    names = [spec.get("name", str(index)) for index, spec in enumerate(sections)]
    if len(set(names)) != len(names):
        raise RecipeError(path, "teachers", f"two teachers share a name ({', '.join(names)}); name each one once")
    if sum(weights) == 0:
        raise RecipeError(path, "teachers", "every weight is 0")
    options = {"teachers": sections, **({"routed": True} if routed else {"weights": weights})}
    return {"name_or_path": "mixture", "kind": "mixture", "options": options}


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
            target[key] = text if not parents and takes_text(section, key, text) else yaml_value(text)
    return raw


def _peft_fields() -> list[str]:
    return known_names("peft")["fields"]


def _check_task(path: str, recipe: Recipe) -> None:
    task, data_format = recipe.task, recipe.data.format
    if task not in RECIPE_TASKS:
        raise RecipeError(
            path,
            "training.task",
            f"{task!r} is not available in recipes ({', '.join(RECIPE_TASKS)}); use DistillationTrainer from Python",
        )
    if task == "classification" and data_format != "classification":
        raise RecipeError(
            path,
            "data.format",
            "training.task classification reads a text and a label per example: set data.format: classification",
        )
    if task != "classification" and data_format == "classification":
        raise RecipeError(path, "training.task", "data.format classification needs training.task: classification")
    if data_format == "classification" and recipe.data.packing:
        raise RecipeError(path, "data.packing", "a classification example has one label: it cannot be packed")


def _check_peft(path: str, peft: Any) -> dict[str, Any]:
    if not isinstance(peft, dict):
        raise RecipeError(path, "peft", f"expected a mapping of LoraConfig arguments, got {type_name(peft)}")
    reject_unknown(path, "peft.", peft, _peft_fields())
    from peft import LoraConfig  # only recipes with a peft section pay for the import

    hints = typing.get_type_hints(LoraConfig)
    peft = dict(peft)
    for key, value in peft.items():
        simple = [a for a in (typing.get_args(hints[key]) or (hints[key],)) if a is not type(None)]
        if len(simple) == 1 and simple[0] in (int, float, bool):  # `lora_dropout: 5e-2` is the string '5e-2' in YAML
            try:
                peft[key] = coerce(value, hints[key])
            except ValueError as err:
                raise RecipeError(path, f"peft.{key}", str(err)) from None
    try:
        LoraConfig(**peft)  # target_modules / task_type left out are filled in by the trainer from the student
    except (TypeError, ValueError) as err:
        raise RecipeError(path, "peft", str(err).splitlines()[0]) from None
    return peft

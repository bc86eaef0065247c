"""A recipe's ``training:`` section and command-line overrides, typed by :class:`hf_kd.DistillationConfig`'s fields.

YAML values and ``--key value`` overrides go through the same ``HfArgumentParser`` actions as the command line of a
plain ``TrainingArguments`` script, so ``2e-5`` is a float and ``--bf16 false`` a bool; the config's own checks then
report the first bad value under its recipe key.

Overrides: ``--max_steps 10`` (or ``--training.max_steps 10``) sets a training field; a dotted name sets any other
recipe key: ``--data.max_samples 100``, ``--teacher.dtype float32``, ``--teacher.init_kwargs.attn_implementation
eager``, ``--peft.r 16``.

Speed: the names a recipe may use (DistillationConfig's fields and flags, LoraConfig's fields) are cached on disk per
installed version (:func:`known_names`), so a typo is reported in a fraction of a second, without importing torch,
transformers or peft; the values are then coerced and checked through the real classes.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import hashlib
import json
import os
import re
import typing
from typing import Any

from hf_kd.recipe.schema import HARDWARE_FIELDS, RecipeError, coerce, reject_unknown, type_name

SECTIONS = ("teacher", "student", "data", "training", "peft")
# a current TrainingArguments name -> the older name of the same field, for a transformers that predates the rename
# (renamed in transformers 5.23: recipes use the current names, the old ones warn; 5.5.4-5.22 know only the old ones)
RENAMED = {
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}
_INTEGER = re.compile(r"[+-]?\d+")
OVERRIDE_FORM = "overrides look like --max_steps 10 or --data.max_samples 100"


# ---- the names a recipe may use, cached per installed version --------------------------------------------------------

# kind -> files (package, path in it) whose change invalidates the cached names: pip upgrades rewrite them
_NAME_SOURCES = {
    "training": (("transformers", "__init__.py"), ("transformers", "training_args.py"), ("hf_kd", "config.py")),
    "peft": (("peft", "__init__.py"), ("peft", "config.py"), ("peft", "tuners/lora/config.py")),
}


def cache_dir() -> str:
    """Where hf_kd keeps small derived files: ``$HF_KD_CACHE``, else ``$XDG_CACHE_HOME/hf_kd`` (``~/.cache/hf_kd``)."""
    if os.environ.get("HF_KD_CACHE"):
        return os.environ["HF_KD_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hf_kd")


def _package_dir(package: str) -> str | None:
    if package == "hf_kd":
        return os.path.dirname(os.path.abspath(__file__))
    import importlib.util

    spec = importlib.util.find_spec(package)  # a top-level package is found, not imported
    return spec.submodule_search_locations[0] if spec is not None and spec.submodule_search_locations else None


def _names_file(kind: str) -> str:
    stamps = []
    for package, relative in _NAME_SOURCES[kind]:
        path = os.path.join(_package_dir(package) or f"<no {package}>", relative)
        try:
            stat = os.stat(path)
            stamps.append(f"{path}:{stat.st_mtime_ns}:{stat.st_size}")
        except OSError:
            stamps.append(f"{path}:missing")
    digest = hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"{kind}-names-{digest}.json")


@functools.cache
def known_names(kind: str) -> dict[str, list[str]]:
    """``"training"``: ``{"fields": DistillationConfig's fields, "flags": its --options}``; ``"peft"``: ``{"fields":
    LoraConfig's init fields}``. Read from the cache when the installed files match, else computed (which imports the
    real classes: seconds) and cached for the next time."""
    path = _names_file(kind)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    names = _training_names() if kind == "training" else _peft_names()
    _write_names(path, names)
    return names


def _training_names() -> dict[str, list[str]]:
    parser = _training_parser()
    fields = {a.dest for a in parser._actions if a.option_strings and a.option_strings[0] == f"--{a.dest}"}
    return {"fields": sorted(fields), "flags": sorted({o for a in parser._actions for o in a.option_strings})}


def _peft_names() -> dict[str, list[str]]:
    import dataclasses

    from peft import LoraConfig

    return {"fields": [f.name for f in dataclasses.fields(LoraConfig) if f.init]}


def _write_names(path: str, names: dict) -> None:
    """Best effort: a read-only home only means the next typo is slow again."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        prefix = os.path.basename(path).split("-names-")[0] + "-names-"
        for old in os.listdir(os.path.dirname(path)):  # another version's names
            if old.startswith(prefix) and old.endswith(".json") and old != os.path.basename(path):
                os.remove(os.path.join(os.path.dirname(path), old))
        with open(f"{path}.{os.getpid()}.tmp", "w", encoding="utf-8") as f:
            json.dump(names, f)
        os.replace(f"{path}.{os.getpid()}.tmp", path)
    except OSError:
        pass


# ---- the training section ------------------------------------------------------------------------------------------


def _training_parser():
    """HfArgumentParser(DistillationConfig) whose defaults are suppressed: parsing yields only the flags given."""
    from transformers import HfArgumentParser

    from hf_kd.config import DistillationConfig

    parser = HfArgumentParser(DistillationConfig, allow_abbrev=False)
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
            action.required = False
    return parser


def _training_actions() -> dict[str, argparse.Action]:
    """The primary ``--name`` action of every field (not the ``--no_name`` negation of booleans)."""
    return {a.dest: a for a in _training_parser()._actions if a.option_strings and a.option_strings[0] == f"--{a.dest}"}


def check_training_keys(path: str, training: dict[str, Any]) -> dict[str, Any]:
    """Unknown keys are errors (with a did-you-mean), from the cached names; a current name that this transformers
    knows under its old one (``activation_checkpointing``) is renamed. Imports nothing heavy."""
    fields = known_names("training")["fields"]
    training = {_installed_name(key, fields): value for key, value in training.items()}
    reject_unknown(path, "training.", training, fields)
    return training


def _installed_name(name: str, fields: list[str]) -> str:
    return RENAMED[name] if name in RENAMED and name not in fields and RENAMED[name] in fields else name


def coerce_training(path: str, training: dict[str, Any]) -> dict[str, Any]:
    """Coerce YAML values through the DistillationConfig field types, the way the command line is parsed."""
    from hf_kd.config import DistillationConfig

    training = check_training_keys(path, training)
    actions = _training_actions()
    hints = typing.get_type_hints(DistillationConfig)
    reject_unknown(path, "training.", training, list(actions))  # a stale name cache still cannot let one through
    out = {}
    for key, value in training.items():
        try:
            out[key] = _coerce_training_value(value, actions[key], hints.get(key))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            raise RecipeError(path, f"training.{key}", str(err)) from None
    return out


def _coerce_training_value(value: Any, action: argparse.Action, hint: Any) -> Any:
    allowed = typing.get_args(hint) or (hint,)
    allowed = tuple(typing.get_origin(a) or a for a in allowed)  # list[str] -> list
    kind = action.type
    if value is None:
        if type(None) in allowed:
            return None
        raise ValueError("must not be null")
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [kind(str(v)) if kind is not None else v for v in items]
    if kind in (int, float):
        return coerce(value, kind)
    if kind is not None and kind.__name__ == "string_to_bool":
        return coerce(value, bool)
    if action.choices is not None:
        choice = kind(str(value)) if kind is not None and isinstance(value, (str, int, float)) else value
        if choice not in action.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(str(c) for c in action.choices)}")
        return choice
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        if isinstance(value, allowed):
            return value
        raise ValueError(
            f"expected {' or '.join(a.__name__ for a in allowed if a is not type(None))}, got {type_name(value)}"
        )
    if isinstance(value, (bool, int, float)) and str in allowed:
        return str(value)  # e.g. `resume_from_checkpoint: true`, `run_name: 7`
    raise ValueError(f"unexpected {type_name(value)} {value!r}")


# ---- command-line overrides ------------------------------------------------------------------------------------------


def split_overrides(path: str, argv: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``["--data.max_samples", "100", "--max_steps", "10"]`` -> ``({"data": {"max_samples": "100"}}, ["--max_steps",
    "10"])``: the values of dotted recipe keys by section (strings, typed later by the section), and the training
    flags for :func:`parse_overrides` (``--training.x`` becomes ``--x``). Imports nothing heavy."""
    sections: dict[str, dict[str, str]] = {}
    training: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not _is_flag(arg):  # the values of a flag are taken with it: this one belongs to none
            raise RecipeError(path, arg, f"unexpected argument; {OVERRIDE_FORM}")
        name, equals, value = arg[2:].partition("=")
        section, dot, key = name.partition(".")
        if not dot or section == "training":
            training.append(f"--{key if dot else name}" + (f"={value}" if equals else ""))
            i += 1
            while i < len(argv) and not _is_flag(argv[i]):  # its values
                training.append(argv[i])
                i += 1
            continue
        if section not in SECTIONS:
            hint = difflib.get_close_matches(section, SECTIONS, n=1)
            known = f" (did you mean --{hint[0]}.{key}?)" if hint else f"; sections: {', '.join(SECTIONS)}"
            raise RecipeError(path, f"--{name}", f"{section!r} is not a recipe section{known}")
        if not equals:
            if i + 1 >= len(argv) or _is_flag(argv[i + 1]):
                raise RecipeError(path, f"--{name}", "expected one argument")
            i += 1
            value = argv[i]
        sections.setdefault(section, {})[key] = value
        i += 1
    return sections, training


def _is_flag(arg: str) -> bool:
    return arg.startswith("-") and not _is_number(arg)


def check_override_flags(path: str, argv: list[str]) -> None:
    """Every ``--flag`` of ``argv`` (training flags, as :func:`split_overrides` returns them) is a DistillationConfig
    option; a recipe key of another section gets its dotted spelling. Imports nothing heavy."""
    known = known_names("training")["flags"]
    for arg in argv:
        if not _is_flag(arg):
            continue
        name = arg.split("=", 1)[0]
        if name in known or _installed_name(name[2:], known_names("training")["fields"]) != name[2:]:
            continue
        owners = _section_keys().get(name.lstrip("-"))
        if owners:
            problem = (
                "not a DistillationConfig / TrainingArguments field; it is a recipe key: pass "
                f"{' or '.join(f'--{owner}.{name[2:]}' for owner in owners)}"
            )
        else:
            hint = difflib.get_close_matches(name, known, n=1)
            problem = "not a DistillationConfig / TrainingArguments field" + (
                f" (did you mean {hint[0]}?)" if hint else ""
            )
        raise RecipeError(path, name, problem)


def _section_keys() -> dict[str, list[str]]:
    """Key -> the sections (teacher, student, data) that have it."""
    import dataclasses

    from hf_kd.recipe.schema import DataSection, ModelSection

    owners: dict[str, list[str]] = {}
    for section, cls in (("teacher", ModelSection), ("student", ModelSection), ("data", DataSection)):
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(section)
    return owners


def parse_overrides(path: str, argv: list[str]) -> dict[str, Any]:
    """``["--max_steps", "10", "--bf16"]`` -> ``{"max_steps": 10, "bf16": True}`` (only the flags given). A float
    field given a whole number keeps it whole (``--eval_steps 10`` is 10, as in YAML, not 10.0)."""
    if not argv:
        return {}
    if not _is_flag(argv[0]):
        raise RecipeError(path, argv[0], "unexpected argument; overrides look like --max_steps 10")
    check_override_flags(path, argv)
    fields = known_names("training")["fields"]
    argv = [
        f"--{_installed_name(a[2:].split('=', 1)[0], fields)}" + (f"={a.split('=', 1)[1]}" if "=" in a else "")
        if _is_flag(a)
        else a
        for a in argv
    ]
    parser = _training_parser()

    def error(message):  # argparse would print usage and exit; report it like every other recipe problem
        match = re.match(r"argument (--[\w-]+)[^:]*: (.*)", message)
        raise RecipeError(path, *(match.groups() if match else ("command line", message)))

    parser.error = error
    namespace, rest = parser.parse_known_args(argv)
    if rest:
        raise RecipeError(path, rest[0], "unexpected argument; overrides look like --max_steps 10")
    values = vars(namespace)
    for flag, raw in _flag_values(argv):
        action = parser._option_string_actions.get(flag)
        if action is not None and action.type is float and _INTEGER.fullmatch(raw.strip()):
            values[action.dest] = int(raw)
    return values


def _flag_values(argv: list[str]) -> list[tuple[str, str]]:
    """``(flag, value)`` for each flag written with exactly one value (``--x 1`` or ``--x=1``)."""
    pairs = []
    for i, arg in enumerate(argv):
        if not _is_flag(arg):
            continue
        flag, equals, value = arg.partition("=")
        if equals:
            pairs.append((flag, value))
        elif i + 1 < len(argv) and not _is_flag(argv[i + 1]) and (i + 2 >= len(argv) or _is_flag(argv[i + 2])):
            pairs.append((flag, argv[i + 1]))
    return pairs


def _check_report_to(path: str, report_to) -> None:
    """A logging integration that is not installed fails now, not after the models and the data have loaded."""
    from transformers.integrations import get_available_reporting_integrations

    asked = [report_to] if isinstance(report_to, str) else list(report_to or [])
    missing = [
        name for name in asked if name not in ("none", "all") and name not in get_available_reporting_integrations()
    ]
    if missing:
        raise RecipeError(
            path,
            "training.report_to",
            f"{', '.join(missing)} is not installed: pip install {' '.join(missing)}, or set report_to: none",
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_config(path: str, kwargs: dict[str, Any], neutralize_hardware: bool):
    from hf_kd.config import DistillationConfig

    if neutralize_hardware:
        kwargs = {**kwargs, **{k: False for k in HARDWARE_FIELDS if k in kwargs}}
    _check_report_to(path, kwargs.get("report_to"))
    try:
        return DistillationConfig(**kwargs)
    except (ValueError, TypeError) as err:
        message = str(err).strip().splitlines()[0]
        first = re.split(r"[\s:=]", message.lstrip("-"), maxsplit=1)[0]
        key = f"training.{first}" if first in kwargs else "training"
        hardware = next((k for k in ("bf16", "fp16") if kwargs.get(k) and k in message), None)
        if key == "training" and hardware:  # transformers: "Your setup doesn't support bf16/gpu. ..."
            key, message = (
                f"training.{hardware}",
                (
                    f"this machine cannot train in {hardware} (no GPU with {hardware} "
                    f"support); set {hardware}: false (--{hardware} false)"
                ),
            )
        if key != "training" and message.startswith(f"{first}: "):  # "loss_type: unknown loss": the key is said once
            message = message[len(first) + 2 :]
        raise RecipeError(path, key, message) from None

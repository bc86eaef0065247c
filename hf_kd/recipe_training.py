"""A recipe's ``training:`` section and command-line overrides, typed by :class:`hf_kd.DistillationConfig`'s fields.

YAML values and ``--key value`` overrides go through the same ``HfArgumentParser`` actions as the command line of a
plain ``TrainingArguments`` script, so ``2e-5`` is a float and ``--bf16 false`` a bool; the config's own checks then
report the first bad value under its recipe key.
"""

from __future__ import annotations

import argparse
import difflib
import re
import typing
from typing import Any

from .recipe import HARDWARE_FIELDS, RecipeError, _coerce, _kind, _reject_unknown

def _training_parser():
    """HfArgumentParser(DistillationConfig) whose defaults are suppressed: parsing yields only the flags given."""
    from transformers import HfArgumentParser

    from .config import DistillationConfig

    parser = HfArgumentParser(DistillationConfig, allow_abbrev=False)
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
            action.required = False
    return parser


def _training_actions() -> dict[str, argparse.Action]:
    """The primary ``--name`` action of every field (not the ``--no_name`` negation of booleans)."""
    return {a.dest: a for a in _training_parser()._actions if a.option_strings and a.option_strings[0] == f"--{a.dest}"}


def coerce_training(path: str, training: dict[str, Any]) -> dict[str, Any]:
    """Coerce YAML values through the DistillationConfig field types, the way the command line is parsed."""
    from .config import DistillationConfig

    actions = _training_actions()
    hints = typing.get_type_hints(DistillationConfig)
    _reject_unknown(path, "training.", training, list(actions))
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
        return _coerce(value, kind)
    if kind is not None and kind.__name__ == "string_to_bool":
        return _coerce(value, bool)
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
        raise ValueError(f"expected {' or '.join(a.__name__ for a in allowed if a is not type(None))}, got {_kind(value)}")
    if isinstance(value, (bool, int, float)) and str in allowed:
        return str(value)  # e.g. `resume_from_checkpoint: true`, `run_name: 7`
    raise ValueError(f"unexpected {_kind(value)} {value!r}")


def parse_overrides(path: str, argv: list[str]) -> dict[str, Any]:
    """``["--max_steps", "10", "--bf16"]`` -> ``{"max_steps": 10, "bf16": True}`` (only the flags given)."""
    if not argv:
        return {}
    parser = _training_parser()
    known = sorted({a.option_strings[0] for a in parser._actions if a.option_strings})
    for i, arg in enumerate(argv):
        if arg.startswith("-") and not _is_number(arg) and arg.split("=", 1)[0] not in known:
            name = arg.split("=", 1)[0]
            hint = difflib.get_close_matches(name, known, n=1)
            problem = "not a DistillationConfig / TrainingArguments field" + (f" (did you mean {hint[0]}?)" if hint else "")
            raise RecipeError(path, name, problem)
        if i == 0 and not arg.startswith("-"):
            raise RecipeError(path, arg, "unexpected argument; overrides look like --max_steps 10")

    def error(message):  # argparse would print usage and exit; report it like every other recipe problem
        match = re.match(r"argument (--[\w-]+)[^:]*: (.*)", message)
        raise RecipeError(path, *(match.groups() if match else ("command line", message)))

    parser.error = error
    namespace, rest = parser.parse_known_args(argv)
    if rest:
        raise RecipeError(path, rest[0], "unexpected argument; overrides look like --max_steps 10")
    return vars(namespace)


def _check_report_to(path: str, report_to) -> None:
    """A logging integration that is not installed fails now, not after the models and the data have loaded."""
    from transformers.integrations import get_available_reporting_integrations

    asked = [report_to] if isinstance(report_to, str) else list(report_to or [])
    missing = [name for name in asked if name not in ("none", "all") and name not in get_available_reporting_integrations()]
    if missing:
        raise RecipeError(path, "training.report_to", f"{', '.join(missing)} is not installed: pip install "
                          f"{' '.join(missing)}, or set report_to: none")  # fmt: skip


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_config(path: str, kwargs: dict[str, Any], neutralize_hardware: bool):
    from .config import DistillationConfig

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
            key, message = f"training.{hardware}", (f"this machine cannot train in {hardware} (no GPU with {hardware} "
                                                    f"support); set {hardware}: false (--{hardware} false)")  # fmt: skip
        if key != "training" and message.startswith(f"{first}: "):  # "loss_type: unknown loss": the key is said once
            message = message[len(first) + 2 :]
        raise RecipeError(path, key, message) from None

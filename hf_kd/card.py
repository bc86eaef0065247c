"""The model card (README.md) of a distilled student: what it was distilled from, how, on what, and how to load it.

:func:`distillation_card` is a function of plain values (tested on its own); :func:`card_from_trainer` reads those
values off a :class:`~hf_kd.DistillationTrainer` after training.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .losses import Objective
from .models import TASKS

TAGS = ["distillation", "hf_kd"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "org/name" or "name"; a local path is not one
_SECRET_KEY = re.compile(r"token|secret|password", re.IGNORECASE)  # e.g. training.hub_token: never publish it
SAVED_AS = {  # kind -> what the directory holds
    "adapters": "PEFT adapters (load them on top of the base model)",
    "merged": "a full model: the student's base model with its adapters merged in",
    "full": "a full model",
}


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a Hub repo id rather than a local path (only Hub ids go into the card's metadata)."""
    return bool(name) and _HUB_ID.match(name) is not None and not os.path.exists(name)


def final_losses(log_history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The last logged value of every loss: ``loss``, ``distill_loss``, ``ce_loss``, ``eval_*_loss``, ``train_loss``
    (the run's mean, logged once at the end) and any ``*_loss`` a subclass adds."""
    losses = {}
    for entry in log_history:
        for key, value in entry.items():
            if (key == "loss" or key.endswith("_loss")) and isinstance(value, (int, float)):
                losses[key] = float(value)
    return losses


def distillation_card(
    *,
    model_name: str,
    repo: str,
    base_model: str | None,
    teacher: str | None,
    kind: str,
    task: str = "causal_lm",
    objective: Objective,
    hyperparameters: Mapping[str, Any] | None = None,
    datasets: Sequence[str] = (),
    steps: int = 0,
    epochs: float | None = None,
    target_tokens: int | None = None,
    target_token_steps: int | None = None,
    input_tokens: int | None = None,
    losses: Mapping[str, float] | None = None,
    recipe: Mapping[str, Any] | str | None = None,
    tags: Sequence[str] = (),
    license: str | None = None,
    language: str | list[str] | None = None,
) -> ModelCard:
    """A model card for a distilled student.

    Args:
        model_name: the card's title. ``repo``: what the loading snippet passes to ``from_pretrained`` (the Hub id,
            or the output directory).
        base_model: the student's starting checkpoint. ``teacher``: the teacher's id or path (``"self"``: the
            student's own base model with adapters disabled).
        kind: ``"adapters"``, ``"merged"`` or ``"full"`` (see ``SAVED_AS``).
        objective: the loss (:class:`hf_kd.losses.Objective`). ``hyperparameters``: more rows for the table.
        target_tokens: positions with a label trained on, in the last ``target_token_steps`` (default: all) steps.
        losses: :func:`final_losses` of the run. ``recipe``: the recipe, embedded as YAML (secrets removed).
    """
    if kind not in SAVED_AS:
        raise ValueError(f"kind must be one of {', '.join(SAVED_AS)}, got {kind!r}")
    spec = TASKS.get(task, TASKS["causal_lm"])
    pipeline_tag, auto_class, peft_auto_class = spec.pipeline_tag, spec.auto_class, spec.peft_auto_class
    all_tags = list(dict.fromkeys([*TAGS, *(["peft"] if kind == "adapters" else []), *tags]))
    data = ModelCardData(
        model_name=model_name,
        base_model=base_model if is_hub_id(base_model) else None,
        datasets=[d for d in datasets if is_hub_id(d)] or None,
        library_name="peft" if kind == "adapters" else "transformers",
        pipeline_tag=pipeline_tag,
        tags=all_tags,
        license=license,
        language=language,
    )
    if teacher == "self":
        teacher_text = f"its own base model `{base_model}` (self-distillation: adapters disabled)"
    else:
        teacher_text = f"`{teacher}`" if teacher else "a teacher model given without a name"
    mixture = " + ".join(f"{weight:g} x {name}" for name, weight in objective.weights.items())
    alpha, knobs = objective.alpha, {}
    if "jsd" in objective.weights:
        knobs["jsd_beta"] = objective.jsd_beta
    if any(name.startswith("skew_") for name in objective.weights):
        knobs["skew_lambda"] = objective.skew_lambda
    knobs["T^2 scaling"] = objective.scale_by_temperature
    rows = [
        ("student (base model)", f"`{base_model}`"),
        ("teacher", teacher_text),
        ("saved as", SAVED_AS[kind]),
        ("loss", f"`{alpha:g} * divergence + {1 - alpha:g} * cross-entropy`" if alpha < 1 else "`divergence`"),
        ("divergence (loss_type)", mixture),
        ("temperature", f"{objective.temperature:g}"),
        ("alpha", f"{alpha:g}"),
        *((key, f"{value}") for key, value in {**knobs, **(hyperparameters or {})}.items()),
        ("datasets", ", ".join(f"`{d}`" for d in datasets) if datasets else "not recorded"),
        ("optimizer steps", f"{steps}" + (f" ({epochs:.3g} epoch{'' if epochs == 1 else 's'})" if epochs else "")),
    ]
    if target_tokens is not None:
        note = "positions with a label, all processes"
        if target_token_steps is not None and target_token_steps < steps:
            note = (f"in the last {target_token_steps} of the {steps} steps: the count restarts on resuming from a "
                    "checkpoint")
        rows.append(("target tokens trained", f"{target_tokens:,} ({note})"))
    if input_tokens:
        rows.append(("input tokens seen", f"{input_tokens:,}"))

    lines = [
        f"# {model_name}",
        "",
        f"A student distilled from {teacher_text} with hf_kd (knowledge distillation on the Hugging Face Trainer). "
        f"This repository holds {SAVED_AS[kind]}.",
        "",
        "## Distillation",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows),
        "",
        *_loss_table(losses or {}),
        "## How to load",
        "",
        "```python",
        *_load_snippet(kind, repo, base_model, auto_class, peft_auto_class),
        "```",
        "",
    ]
    if recipe is not None:
        text = recipe if isinstance(recipe, str) else yaml.safe_dump(_redact(recipe), sort_keys=False)
        if isinstance(recipe, str):
            text = "\n".join(line for line in text.splitlines() if not _is_secret_line(line))
        lines += ["## Recipe", "", "```yaml", text.rstrip("\n"), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _loss_table(losses: Mapping[str, float]) -> list[str]:
    rows = []
    for name, key in (("total", "loss"), ("distillation", "distill_loss"), ("cross-entropy", "ce_loss")):
        train, evaluation = losses.get(key), losses.get(f"eval_{key}")
        if train is not None or evaluation is not None:
            rows.append(f"| {name} (`{key}`) | {_fmt(train)} | {_fmt(evaluation)} |")
    if not rows:
        return []
    return [
        "## Final losses", "",
        "Last logged values (train: the last logging window; eval: the last evaluation).", "",
        "| | train | eval |", "|---|---|---|", *rows, "",
    ]  # fmt: skip


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _load_snippet(kind: str, repo: str, base_model: str | None, auto_class: str, peft_auto_class: str) -> list[str]:
    tokenizer = f'tokenizer = AutoTokenizer.from_pretrained("{repo}")'
    if kind == "adapters":
        return [
            f"from peft import {peft_auto_class}",
            "from transformers import AutoTokenizer",
            "",
            f'model = {peft_auto_class}.from_pretrained("{repo}")  # fetches the base model `{base_model}` as well',
            "model = model.merge_and_unload()  # optional: a plain transformers model, adapters merged in",
            tokenizer,
        ]
    return [
        f"from transformers import AutoTokenizer, {auto_class}",
        "",
        f'model = {auto_class}.from_pretrained("{repo}")',
        tokenizer,
    ]


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _redact(v) for k, v in value.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    return value


def _is_secret_line(line: str) -> bool:
    key = line.split("#", 1)[0].split(":", 1)
    return len(key) == 2 and _SECRET_KEY.search(key[0]) is not None


# ---- from a trainer ------------------------------------------------------------------------------------------------


def card_from_trainer(trainer, *, model_name: str | None = None, dataset=None, tags=None, finetuned_from=None,
                      license=None, language=None) -> ModelCard:  # fmt: skip
    """The card of what ``trainer.save_model()`` writes; the keyword arguments are ``Trainer.create_model_card``'s."""
    from .adapters import is_peft_model

    args, state = trainer.args, trainer.state
    model = trainer.accelerator.unwrap_model(trainer.model)
    peft = is_peft_model(model)
    kind = ("merged" if args.save_merged else "adapters") if peft else "full"
    tags = _as_list(tags)
    if peft:
        adapter = model.peft_config[model.active_adapter]
        base_model = adapter.base_model_name_or_path
        tags.append(str(adapter.peft_type.value).lower())  # "lora"
    else:
        base_model = getattr(model, "name_or_path", None) or None
    repo = args.hub_model_id or os.path.abspath(args.output_dir)
    hyperparameters = {}
    if args.generates:  # on-policy / sequence-level KD: what the completions were and how they were sampled
        hyperparameters["lmbda (on-policy fraction)"] = args.lmbda
        hyperparameters["seq_kd (teacher completions)"] = args.seq_kd
        hyperparameters["generation"] = ", ".join(f"{k}={v}" for k, v in args.generation_settings().items())
    hyperparameters["learning rate"] = args.learning_rate
    hyperparameters["batch size (per device x accumulation x processes)"] = (
        f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps} x {args.world_size}"
    )
    tokens = trainer.accounting.tokens_trained
    return distillation_card(
        model_name=model_name or (args.hub_model_id or os.path.abspath(args.output_dir)).split("/")[-1],
        repo=repo,
        base_model=finetuned_from or base_model,
        teacher=trainer.teacher.name,
        kind=kind,
        task=getattr(trainer, "task", "causal_lm"),
        objective=trainer.objective,
        hyperparameters=hyperparameters,
        datasets=_as_list(dataset) or _recipe_datasets(trainer.recipe),
        steps=state.global_step,
        epochs=state.epoch,
        target_tokens=None if tokens is None else int(tokens),
        target_token_steps=trainer.accounting.steps_counted,
        input_tokens=state.num_input_tokens_seen or None,
        losses=final_losses(state.log_history),
        recipe=trainer.recipe,
        tags=tags,
        license=license,
        language=language,
    )


def _as_list(value) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _recipe_datasets(recipe) -> list[str]:
    """``data.dataset`` of a recipe given as a mapping (a string recipe is embedded, not parsed)."""
    data = recipe.get("data") if isinstance(recipe, Mapping) else None
    dataset = data.get("dataset") if isinstance(data, Mapping) else None
    return [dataset] if dataset else []

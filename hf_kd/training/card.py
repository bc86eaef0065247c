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

from hf_kd.models.tasks import DEFAULT_TASK, TASKS
from hf_kd.objective.losses import Objective

TAGS = ["distillation", "hf_kd"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "org/name" or "name"; a local path is not one
# keys whose values are never published, by exact name (any letter case): credentials a recipe may carry (Hub tokens
# in training or from_pretrained kwargs, logger API keys); teacher.tokenizer or tokenizer_check_samples are not secrets
SECRET_KEYS = frozenset(
    {
        "hub_token",
        "push_to_hub_token",
        "token",
        "tokens",
        "use_auth_token",
        "auth_token",
        "access_token",
        "hf_token",
        "api_key",
        "api_token",
        "wandb_api_key",
        "secret",
        "secret_key",
        "client_secret",
        "password",
        "passwd",
    }
)
# evaluation metrics that describe the run, not the model: left out of the card
_RUN_METRICS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch", "step")
_METRIC_NOTES = {  # hf_kd.objective.metrics names -> what the card says about them
    "top1_agreement": "positions where the student's argmax equals the teacher's",
    "teacher_kl": "mean KL(teacher ‖ student) at T = 1, nats per position",
    "student_perplexity": "exp of the student's mean label NLL",
    "teacher_perplexity": "exp of the teacher's mean label NLL",
    "student_accuracy": "student's accuracy on the labels",
    "teacher_accuracy": "teacher's accuracy on the labels",
    "student_ece": "student's expected calibration error (15 bins)",
    "teacher_ece": "teacher's expected calibration error (15 bins)",
}
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


def final_eval_metrics(log_history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The metrics of the last evaluation other than its losses (:func:`final_losses` has those) and timings: the
    teacher-agreement metrics (``eval_top1_agreement``, ``eval_teacher_kl``, perplexities or accuracies, ...)."""
    for entry in reversed(log_history):
        if any(key.startswith("eval_") for key in entry):
            return {
                key: float(value)
                for key, value in entry.items()
                if key.startswith("eval_")
                and not key.endswith("_loss")
                and key not in _RUN_METRICS
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
            }
    return {}


def distillation_card(
    *,
    model_name: str,
    repo: str,
    base_model: str | None,
    teacher: str | None,
    kind: str,
    task: str = DEFAULT_TASK,
    objective: Objective,
    hyperparameters: Mapping[str, Any] | None = None,
    datasets: Sequence[str] = (),
    steps: int = 0,
    epochs: float | None = None,
    target_tokens: int | None = None,
    target_token_steps: int | None = None,
    input_tokens: int | None = None,
    losses: Mapping[str, float] | None = None,
    eval_metrics: Mapping[str, float] | None = None,
    teacher_cache: Mapping[str, Any] | None = None,
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
        objective: the loss (:class:`hf_kd.objective.losses.Objective`). ``hyperparameters``: more rows for the table.
        target_tokens: positions with a label trained on, in the last ``target_token_steps`` (default: all) steps.
        losses: :func:`final_losses` of the run. ``eval_metrics``: :func:`final_eval_metrics` (teacher agreement).
        teacher_cache: the student learned from a teacher cache, not the model: ``{"k", "path", "vocab_size"}``.
        recipe: the recipe, embedded as YAML (the values of :data:`SECRET_KEYS` removed).
    """
    if kind not in SAVED_AS:
        raise ValueError(f"kind must be one of {', '.join(SAVED_AS)}, got {kind!r}")
    spec = TASKS.get(task, TASKS[DEFAULT_TASK])
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
    if teacher_cache is not None:
        teacher_text += f" through a top-{teacher_cache['k']} teacher cache"
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
        *([("teacher outputs", _cache_text(teacher_cache))] if teacher_cache is not None else []),
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
            note = (
                f"in the last {target_token_steps} of the {steps} steps: the count restarts on resuming from a "
                "checkpoint"
            )
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
        *_metrics_table(eval_metrics or {}),
        "## How to load",
        "",
        "```python",
        *_load_snippet(kind, repo, base_model, auto_class, peft_auto_class),
        "```",
        "",
    ]
    if recipe is not None:
        text = recipe if isinstance(recipe, str) else yaml.safe_dump(without_secrets(recipe), sort_keys=False)
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
        "## Final losses",
        "",
        "Last logged values (train: the last logging window; eval: the last evaluation).",
        "",
        "| | train | eval |",
        "|---|---|---|",
        *rows,
        "",
    ]


def _cache_text(cache: Mapping[str, Any]) -> str:
    k, vocab = cache["k"], cache.get("vocab_size")
    exact = k == vocab
    return (
        f"a top-k cache (`hf-kd cache-teacher`, `{cache.get('path')}`): k = {k} of {vocab or '?'} vocab rows, the "
        "teacher's log-probabilities at T = 1; every other token's mass is one tail bucket, so the loss compares "
        f"k + 1 buckets, {'exact (k = vocab size)' if exact else 'exact at T = 1 and an approximation at other T'}"
    )


def _metrics_table(metrics: Mapping[str, float]) -> list[str]:
    if not metrics:
        return []
    rows = []
    for key, value in metrics.items():
        name = key.removeprefix("eval_")
        note = _METRIC_NOTES.get(name, "")
        rows.append(f"| `{key}` | {value:.4f} | {note} |")
    return [
        "## Final evaluation",
        "",
        "Teacher-agreement metrics of the last evaluation (hf_kd.objective.metrics).",
        "",
        "| metric | value | |",
        "|---|---|---|",
        *rows,
        "",
    ]


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


def is_secret_key(key: Any) -> bool:
    return str(key).strip().strip("'\"").lower() in SECRET_KEYS


def without_secrets(value: Any, dropped: list[str] | None = None, where: str = "") -> Any:
    """``value`` without the keys the card never publishes (hub_token, api_key, ...), at any depth; their dotted
    names are appended to ``dropped`` when given."""
    if isinstance(value, Mapping):
        if dropped is not None:
            dropped += [f"{where}{key}" for key in value if is_secret_key(key)]
        return {k: without_secrets(v, dropped, f"{where}{k}.") for k, v in value.items() if not is_secret_key(k)}
    if isinstance(value, (list, tuple)):
        return [without_secrets(v, dropped, where) for v in value]
    return value


def _is_secret_line(line: str) -> bool:
    key = line.split("#", 1)[0].split(":", 1)
    return len(key) == 2 and is_secret_key(key[0].strip().lstrip("-").strip())


# ---- from a trainer ------------------------------------------------------------------------------------------------


def card_from_trainer(
    trainer, *, model_name: str | None = None, dataset=None, tags=None, finetuned_from=None, license=None, language=None
) -> ModelCard:
    """The card of what ``trainer.save_model()`` writes; the keyword arguments are ``Trainer.create_model_card``'s."""
    from hf_kd.models.adapters import is_peft_model

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
        if args.lmbda_warmup_steps or args.lmbda_ramp_steps:
            hyperparameters["on-policy schedule"] = (
                f"off-policy for {args.lmbda_warmup_steps} steps, then lmbda ramped over {args.lmbda_ramp_steps}"
            )
        hyperparameters["seq_kd (teacher completions)"] = args.seq_kd
        hyperparameters["generation"] = ", ".join(f"{k}={v}" for k, v in args.generation_settings().items())
    hyperparameters.update(trainer.teacher.describe())  # what the teacher's kind adds (another tokenizer, ...)
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
        task=getattr(trainer, "task", DEFAULT_TASK),
        objective=trainer.objective,
        hyperparameters=hyperparameters,
        datasets=_as_list(dataset) or _recipe_datasets(trainer.recipe),
        steps=state.global_step,
        epochs=state.epoch,
        target_tokens=None if tokens is None else int(tokens),
        target_token_steps=trainer.accounting.steps_counted,
        input_tokens=state.num_input_tokens_seen or None,
        losses=final_losses(state.log_history),
        eval_metrics=final_eval_metrics(state.log_history),
        teacher_cache=trainer.teacher.cached_outputs(),
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

"""What a DistillationTrainer decides or refuses at setup, before any step: the loss path, the training data, and what
generated completions need. Each function reads the trainer's settings; none changes it."""

from __future__ import annotations

import logging

from transformers import set_seed

from hf_kd.config import DistillationConfig
from hf_kd.errors import SetupError
from hf_kd.models.adapters import wrap_student
from hf_kd.models.heads import lm_head_spec
from hf_kd.models.loading import TASKS, detect_task, unwrap
from hf_kd.models.sharding import sharded_engine
from hf_kd.models.tasks import IGNORE_INDEX

logger = logging.getLogger(__name__)


def fused_loss_applies(trainer) -> bool:
    """Whether the chunked loss applies to this pair; says why in the log when it was asked for but cannot."""
    if not trainer.args.loss_chunk_size or not trainer.task_spec.language_model:
        return False  # a classifier's logits are one row per example (or token): nothing to chunk, nothing to say
    reasons = []
    teachers = trainer.teacher.modules()  # every teacher model (several teachers: each member's)
    for teacher in teachers:
        teacher_task = detect_task(teacher)
        if teacher_task is None or not TASKS[teacher_task].language_model:
            reasons.append("the fused loss is for causal LMs")
            break
    engine = sharded_engine(trainer.accelerator)
    sharded = engine is not None  # FSDP2 / ZeRO-3: the heads are gathered for the loss (models/gathering)
    if engine == "fsdp1":
        reasons.append("FSDP1 keeps the lm_head in flat parameters that the loss cannot gather; use fsdp_version 2")
    elif sharded and teachers and trainer.teacher.kind != "model":
        reasons.append(f"teacher kind {trainer.teacher.kind!r} under FSDP / ZeRO-3: only kind 'model' gathers its head")
    for role, model in (("student", trainer.model), *(("teacher", teacher) for teacher in teachers)):
        spec, reason = lm_head_spec(model, sharded=sharded)
        if spec is None:
            reasons.append(f"{role}: {reason}")
    if reasons:
        logger.warning(
            "loss_chunk_size=%d: using full logits instead (%s)", trainer.args.loss_chunk_size, "; ".join(reasons)
        )
        return False
    return True


def check_arguments(model, teacher_model, args, peft_config):
    """What the trainer was given, checked before the Trainer is built: ``(args, task, teacher_source, model)``, the
    defaults filled in (a DistillationConfig, the task detected from the student, the teacher from
    ``teacher_model_name_or_path``) and a PEFT student wrapped (before the Trainer builds its optimizer: only the
    adapters train)."""
    if args is None:
        args = DistillationConfig(output_dir="hf_kd_output")
    if not isinstance(args, DistillationConfig):
        raise TypeError("args must be a DistillationConfig (it holds the distillation knobs), not TrainingArguments")
    task = args.task or (detect_task(model) if model is not None else None)
    if task is None:
        raise SetupError(
            "task",
            f"cannot tell how {type(unwrap(model)).__name__}'s logits align with its labels; "
            f"set it to one of {', '.join(TASKS)}",
        )
    teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
    if teacher_model is None and args.teacher_cache is None and args.teacher_kind is None:
        raise SetupError(
            "teacher_model_name_or_path",
            "no teacher: pass teacher_model= (a model or a path), set teacher_model_name_or_path, or set teacher_cache",
        )
    if model is not None and teacher_model is model:
        raise SetupError(
            "teacher_model_name_or_path",
            "teacher_model is the student object itself; for "
            "self-distillation pass teacher_model='self' and a peft_config: the teacher is then the "
            "student's base model with its adapters disabled",
        )
    if peft_config is not None:  # wrapped before the Trainer builds its optimizer: only the adapters train
        if model is None:
            raise SetupError("peft_config", "needs the student as model= (model_init is not supported with it)")
        set_seed(args.seed)  # the adapters' random init: reproducible, as if made after the Trainer's own seeding
        model = wrap_student(model, peft_config, args.gradient_checkpointing, args.gradient_checkpointing_kwargs)
    return args, task, teacher_model, model


def check_setup(trainer) -> None:
    """Every refusal of the trainer's own settings, before the teacher is loaded."""
    args = trainer.args
    if args.label_smoothing_factor:
        raise SetupError(
            "label_smoothing_factor",
            "is not applied by the distillation loss (the teacher's "
            "distribution is the soft target; alpha mixes in the plain CE); set it to 0",
        )
    if args.save_merged and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        raise SetupError(
            "save_merged",
            "needs the whole student on one process; with FSDP/DeepSpeed save the adapters and merge them afterwards",
        )
    check_targets(trainer)
    if args.generates:
        check_generation(trainer)
    if trainer.objective.reads_targets() and (args.lmbda < 1 or args.lmbda_warmup_steps or args.lmbda_ramp_steps):
        logger.warning(
            "loss_type reverse_kl_sampled with lmbda=%s, lmbda_warmup_steps=%s, lmbda_ramp_steps=%s: the estimate is "
            "unbiased on the student's own samples only; the off-policy batches' tokens are not samples of the "
            "student (set lmbda: 1 without a schedule)",
            args.lmbda,
            args.lmbda_warmup_steps,
            args.lmbda_ramp_steps,
        )


def check_targets(trainer) -> None:
    """Training data without a single target trains on nothing (a loss of 0): refused, as the CLI does, unless
    every batch is generated (then a prompt is all an example needs)."""
    data = trainer.train_dataset
    if not _indexable(data) or trainer.args.every_batch_generated or "labels" not in (data.column_names or ()):
        return  # streamed (iterable) data is not scanned up front
    first = 1 if trainer.task_spec.shift_labels else 0  # a causal LM's first label is never a target
    for start in range(0, len(data), 1000):  # stops at the first chunk with a target: cheap on real data
        labels = data.select(range(start, min(start + 1000, len(data))))["labels"]
        if any(label != IGNORE_INDEX for row in labels for label in ([row] if isinstance(row, int) else row[first:])):
            return
    hint = (
        "; with lmbda < 1 and no seq_kd some batches train on them: set lmbda 1 or seq_kd true"
        if trainer.args.generates
        else ""
    )
    raise SetupError(
        "train_dataset",
        f"no trainable tokens: all {len(data)} examples have every target masked "
        f"or truncated away (prompt-only data? labels all -100?){hint}",
    )


def check_generation(trainer) -> None:
    """On-policy / seq_kd: what generation needs of the task, the engine and the data."""
    field = "lmbda" if trainer.args.lmbda > 0 else "seq_kd"
    if not trainer.task_spec.language_model:
        raise SetupError(field, f"generated completions are for causal LMs, not task {trainer.task!r}")
    if sharded_engine(trainer.accelerator) == "fsdp1":  # generate would run the unwrapped module, outside FSDP1's units
        raise SetupError(field, "generation under FSDP1 is not supported; use FSDP2 (fsdp_version 2) or ZeRO-3")


def _indexable(dataset) -> bool:
    """A map-style ``datasets.Dataset`` (length, ``select``, columns): what can be checked before training."""
    return dataset is not None and all(hasattr(dataset, name) for name in ("__len__", "select", "column_names"))

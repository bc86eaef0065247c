"""DistillationTrainer: a Trainer whose loss matches a frozen teacher's token distributions."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedModel,
    Trainer,
    default_data_collator,
    set_seed,
)
from transformers.models.auto import modeling_auto
from transformers.trainer import TRAINING_ARGS_NAME

from .adapters import SELF_TEACHER, adapters_disabled, is_peft_model, merged_copy, require_adapters, wrap_student
from .cache import TeacherCache
from .card import card_from_trainer
from .config import DistillationConfig
from .data import DistillationCollator
from .distributed import prepare_teacher, teacher_is_sharded
from .fused import fused_distillation_loss, fused_sparse_distillation_loss, lm_head_spec
from .losses import distillation_loss
from .sparse import sparse_distillation_loss
from .metrics import add_sums, agreement_sums, finalize_metrics

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the Trainer's and every HF loss's convention for "not a target"


def _unwrap(model: nn.Module) -> nn.Module:
    """The innermost transformers model under DDP/accelerate and PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):  # PeftModel
        model = model.get_base_model()
    return model


# task -> the Auto class that loads a teacher path for it. The task decides how logits align with labels:
# causal_lm shifts by one; classification has one logit vector per example; token_classification one per token.
TASKS = {
    "causal_lm": AutoModelForCausalLM,
    "classification": AutoModelForSequenceClassification,
    "token_classification": AutoModelForTokenClassification,
}
_DETECT = (  # (transformers' class-name mapping, task): the student's class names its task
    (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "causal_lm"),
    (modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES, "token_classification"),
    (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "classification"),
    (modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, "classification"),
    (modeling_auto.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES, "classification"),
)


def detect_task(model: nn.Module) -> str | None:
    """``causal_lm``, ``classification`` or ``token_classification`` from the model's class, else ``None``."""
    inner = _unwrap(model)
    if getattr(getattr(inner, "config", None), "is_encoder_decoder", False):
        return None  # seq2seq logits align with decoder labels unshifted: not a task handled here yet
    name = type(inner).__name__
    return next((task for names, task in _DETECT if name in names.values()), None)


def _num_outputs(model: nn.Module, task: str) -> int:
    """Size of the logits' last dim: lm_head rows for LMs (padded vocab), ``num_labels`` for classifiers."""
    inner = _unwrap(model)
    if task == "causal_lm":
        head = inner.get_output_embeddings()
        return head.weight.shape[0] if head is not None else inner.config.vocab_size
    return inner.config.num_labels


@contextlib.contextmanager
def _capture_final_hidden(model: nn.Module):
    """Record the decoder's output (the post-norm hidden states that feed the lm_head) during a forward call.

    The hook sits on the inner decoder, while the call itself still goes through every wrapper (DDP, PEFT, gradient
    checkpointing), so gradient synchronization and adapters behave exactly as in a plain forward.
    """
    box: list[torch.Tensor] = []

    def hook(_module, _args, output):
        box.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = _unwrap(model).get_decoder().register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


class DistillationTrainer(Trainer):
    """Train ``model`` (the student) to match ``teacher_model`` with :func:`hf_kd.distillation_loss`.

    Extension points (override one, call ``super()``; ``compute_loss`` itself never needs copying):

    * :meth:`teacher_forward` -- how the frozen teacher is run (e.g. ask for hidden states).
    * :meth:`student_forward` -- how the student is run.
    * :meth:`distillation_terms` -- the loss terms from both outputs; add a key (``"hidden_loss"``) and fold it into
      ``"loss"``: every ``*_loss`` key is logged for train and eval next to ``loss``.

    Normalization is exact: every term is a sum over valid target positions divided by the number of valid positions
    in the whole optimizer step (all gradient-accumulation micro-batches, all processes), so per-device batch 4 x GA 1
    and batch 1 x GA 4 (or 2 processes x batch 2) produce the same update.
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the step's global token count itself

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | None = None,
        args: DistillationConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        recipe: Mapping[str, Any] | str | None = None,
        **kwargs,
    ):
        if args is None:
            args = DistillationConfig(output_dir="hf_kd_output")
        if not isinstance(args, DistillationConfig):
            raise TypeError("args must be a DistillationConfig (it holds the distillation knobs), not TrainingArguments")
        self.task = args.task or (detect_task(model) if model is not None else None)
        if self.task is None:
            raise ValueError(
                f"cannot tell how {type(_unwrap(model)).__name__}'s logits align with its labels; set task to one of "
                f"{', '.join(TASKS)} in DistillationConfig"
            )
        if data_collator is None:
            data_collator = self._default_collator(processing_class)
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher_model is None and args.teacher_cache is None:
            raise ValueError("no teacher: pass teacher_model= (a model or a path), set teacher_model_name_or_path, or "
                             "set teacher_cache")  # fmt: skip
        if model is not None and teacher_model is model:
            raise ValueError(
                "teacher_model is the student object itself; for self-distillation pass teacher_model='self' and a "
                "peft_config: the teacher is then the student's base model with its adapters disabled"
            )
        if peft_config is not None:  # wrapped before the Trainer builds its optimizer: only the adapters train
            if model is None:
                raise ValueError("peft_config needs the student as model= (model_init is not supported with it)")
            set_seed(args.seed)  # the adapters' random init: reproducible, as if made after the Trainer's own seeding
            model = wrap_student(model, peft_config, args.gradient_checkpointing, args.gradient_checkpointing_kwargs)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.recipe = recipe  # embedded in the model card; the CLI passes the recipe it ran
        self.teacher_cache = None  # a hf_kd.cache.TeacherCache when distilling from cached top-k log-probs
        if args.teacher_cache is not None:
            self._open_teacher_cache(teacher_model)  # sets teacher_cache, teacher, teacher_name, vocab_size, ...
        else:
            self.teacher_name = (  # for the model card: an id, a path or "self"
                teacher_model if isinstance(teacher_model, str) else getattr(teacher_model, "name_or_path", None)
            )
            self.self_distillation = isinstance(teacher_model, str) and teacher_model == SELF_TEACHER
            if self.self_distillation:
                teacher_model = self._self_teacher()
            elif isinstance(teacher_model, str):
                teacher_model = self._load_teacher(teacher_model)
            if not self.self_distillation:
                teacher_model.requires_grad_(False)
                teacher_model.eval()
                if getattr(teacher_model, "config", None) is not None:
                    teacher_model.config.use_cache = False
            self.shift_labels = self.task == "causal_lm"
            self.vocab_size = self._shared_vocab_size(teacher_model)
            self.use_fused_loss = self._can_fuse(teacher_model)
            if not self.self_distillation:  # DDP: a plain replica; FSDP / ZeRO-3: sharded like the student
                self.teacher = prepare_teacher(self.accelerator, teacher_model)
            else:
                self.teacher = teacher_model  # the student's PeftModel itself: one copy of the weights
        if args.save_merged and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            raise ValueError("save_merged needs the whole student on one process; with FSDP/DeepSpeed save the "
                             "adapters and merge them afterwards")
        self.tokens_trained = 0  # target positions of this run's optimizer steps, all processes (for the model card)
        self.steps_counted = 0  # optimizer steps in tokens_trained (fewer than global_step after a resume)
        self._final_save = False  # set by save_model for a final save (not a checkpoint-N)
        self._components: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self._component_steps = 0
        self._eval_sums: dict[str, torch.Tensor] = {}

    # ---- setup ------------------------------------------------------------------------------------------------

    def _default_collator(self, processing_class):
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if self.task == "classification":  # one label per example: pad text if a tokenizer is given, else stack
            return DataCollatorWithPadding(tokenizer) if hasattr(tokenizer, "pad") else default_data_collator
        pad_id = getattr(tokenizer, "pad_token_id", None)
        return DistillationCollator(pad_token_id=pad_id if pad_id is not None else 0)

    def _load_teacher(self, path: str) -> PreTrainedModel:
        init_kwargs = dict(self.args.teacher_model_init_kwargs or {})
        init_kwargs.setdefault("dtype", torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        if isinstance(init_kwargs["dtype"], str) and init_kwargs["dtype"] != "auto":
            init_kwargs["dtype"] = getattr(torch, init_kwargs["dtype"])
        logger.info("loading teacher %s with %s", path, init_kwargs)
        return TASKS[self.task].from_pretrained(path, **init_kwargs)

    def _self_teacher(self) -> nn.Module:
        """Teacher ``"self"``: the student's PeftModel, run by :meth:`teacher_forward` with its adapters disabled."""
        require_adapters(self.model)
        if self.args.teacher_model_init_kwargs:
            raise ValueError("teacher_model_init_kwargs do not apply to teacher 'self' (the student's own weights)")
        if self.args.alpha == 1:
            logger.warning(
                "teacher 'self' with alpha=1: freshly initialized LoRA adapters (B = 0) make the student equal to its "
                "teacher, so loss and gradients start at 0; use alpha < 1 to learn from the labels while the "
                "divergence keeps the student close to its base model"
            )
        return self.accelerator.unwrap_model(self.model)

    def _shared_vocab_size(self, teacher: nn.Module) -> int | None:
        """``None`` when the vocabularies match; else the shared prefix both logits are cut to (checked here)."""
        student_vocab, teacher_vocab = _num_outputs(self.model, self.task), _num_outputs(teacher, self.task)
        if student_vocab == teacher_vocab:
            return None
        if self.task != "causal_lm":
            raise ValueError(
                f"the teacher has {teacher_vocab} labels and the student {student_vocab}; classifiers must share "
                "their label set (set num_labels, id2label and label2id alike on both)"
            )
        shared = min(student_vocab, teacher_vocab)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)  # processors wrap one
        if tokenizer is None or not hasattr(tokenizer, "__len__"):
            raise ValueError(
                f"teacher vocab ({teacher_vocab}) and student vocab ({student_vocab}) differ and no tokenizer was given "
                "to prove the extra rows are padding; pass processing_class=tokenizer"
            )
        if len(tokenizer) > shared:
            raise ValueError(
                f"teacher vocab ({teacher_vocab}) and student vocab ({student_vocab}) differ and the tokenizer has "
                f"{len(tokenizer)} tokens, more than the smaller model has rows ({shared}); these models do not share "
                "a vocabulary -- pick a teacher/student pair from the same tokenizer family"
            )
        logger.warning(
            "teacher vocab %d != student vocab %d: distilling over the shared first %d rows (the tokenizer has %d "
            "tokens); dropped padding rows: teacher %d..%d, student %d..%d",
            teacher_vocab, student_vocab, shared, len(tokenizer),
            shared, teacher_vocab - 1, shared, student_vocab - 1,
        )  # fmt: skip
        return shared

    def _can_fuse(self, teacher: nn.Module | None) -> bool:
        """Whether the chunked loss applies to this pair (``teacher=None``: a cached teacher, the student alone); says
        why in the log when it was asked for but cannot."""
        if not self.args.loss_chunk_size:
            return False
        reasons = []
        if self.task != "causal_lm" or (teacher is not None and detect_task(teacher) != "causal_lm"):
            reasons.append("the fused loss is for causal LMs")
        if teacher_is_sharded(self.accelerator):
            reasons.append("under FSDP / ZeRO-3 the lm_head weights are sharded across processes")
        for role, model in (("student", self.model), ("teacher", teacher)):
            if model is None:
                continue
            spec, reason = lm_head_spec(model)
            if spec is None:
                reasons.append(f"{role}: {reason}")
        if reasons:
            logger.warning("loss_chunk_size=%d: using full logits instead (%s)", self.args.loss_chunk_size,
                           "; ".join(reasons))
            return False
        return True

    def _open_teacher_cache(self, teacher_model) -> None:
        """Distill from ``args.teacher_cache`` (no teacher model); the cache must fit this student, tokenizer, data."""
        if self.task != "causal_lm":
            raise ValueError(f"teacher_cache: cached teachers are for causal LMs, not task {self.task!r}")
        if teacher_model is not None and not isinstance(teacher_model, str):
            raise ValueError("teacher_cache replaces the teacher model: pass no teacher_model (a name is checked)")
        cache = TeacherCache(self.args.teacher_cache)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        self.vocab_size = cache.check_compatible(student_vocab=_num_outputs(self.model, self.task), tokenizer=tokenizer,
                                                 teacher=teacher_model)  # fmt: skip
        if self.train_dataset is not None and hasattr(self.train_dataset, "column_names"):  # not for iterable data
            missing = cache.missing(self.train_dataset)
            if missing:
                raise ValueError(f"teacher cache {cache.path} has no row for {len(missing)} of the "
                                 f"{len(self.train_dataset)} training examples (first: example {missing[0]}); build "
                                 "it from this training data")  # fmt: skip
        logger.info("teacher cache %s: %d examples of %s, top-%d; evaluation logs no teacher-agreement metrics",
                    cache.path, len(cache), cache.name_or_path, cache.k)  # fmt: skip
        self.teacher_cache = self.teacher = cache
        self.teacher_name = cache.name_or_path  # the model card names the cached teacher
        self.self_distillation = False
        self.shift_labels = True
        self.use_fused_loss = self._can_fuse(None)  # the sparse loss chunked over the student's lm_head

    # ---- the loss -----------------------------------------------------------------------------------------------

    def target_labels(self, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """Labels aligned with the logits, -100 where a position is not a target.

        Causal LMs: ``labels[:, 1:]`` (missing labels are the input ids with padding masked). Classifiers: the labels
        as given (one per example, or one per token), never shifted; ``None`` when a classification batch has no
        labels (every example counts, and ``alpha`` must be 1).
        """
        labels = inputs.get("labels")
        if labels is None and self.task == "token_classification":
            raise ValueError("token classification needs labels (-100 on padding and sub-word continuations)")
        if labels is None and self.task == "classification":
            return None
        if labels is None:
            labels = inputs["input_ids"]
            if inputs.get("attention_mask") is not None:
                labels = labels.masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
        # logits at position i predict the token at i + 1: the first label is never a target
        return labels[..., 1:] if self.shift_labels else labels

    def _forward(self, model: nn.Module, inputs: Mapping[str, Any]):
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if self.task != "causal_lm":
            return model(**model_inputs)
        if not self.use_fused_loss:
            return model(**model_inputs, use_cache=False)
        # Fused path: logits for the last position only (B x V, negligible); the loss projects the captured final
        # hidden states chunk by chunk instead of materializing [B, S, V] logits.
        with _capture_final_hidden(model) as box:
            outputs = model(**model_inputs, use_cache=False, logits_to_keep=1)
        outputs["final_hidden_state"] = box[-1]
        return outputs

    def student_forward(self, model: nn.Module, inputs: Mapping[str, Any]):
        """Run the student without labels (its own CE over full logits would be a wasted second pass).

        With the fused loss (``loss_chunk_size > 0``) the outputs carry ``final_hidden_state`` and ``logits`` hold
        the last position only.
        """
        return self._forward(model, inputs)

    def teacher_forward(self, inputs: Mapping[str, Any]):
        """Run the frozen teacher on the student's inputs; no graph is kept.

        Teacher ``"self"``: the student's own forward with its adapters disabled and dropout off, not through DDP
        (without a gradient there is nothing to synchronize). A teacher cache: this batch's cached top-k rows, found by
        the hash of each example's token ids (:meth:`hf_kd.cache.TeacherCache.lookup`).
        """
        if self.teacher_cache is not None:
            targets = self.target_labels(inputs)
            return self.teacher_cache.lookup(inputs["input_ids"], inputs.get("attention_mask"), targets)
        if self.self_distillation:
            with torch.no_grad(), adapters_disabled(self.teacher) as base_model:
                return self._forward(base_model, inputs)
        self.teacher.eval()  # every step: nothing may switch dropout back on
        with torch.no_grad():
            return self._forward(self.teacher, inputs)

    def distillation_terms(
        self, student_outputs, teacher_outputs, labels: torch.Tensor, num_items_in_batch=None
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "distill_loss", "ce_loss"}``: the objective and its components, normalized alike."""
        args = self.args
        knobs = dict(
            loss_type=args.loss_weights,
            temperature=args.temperature,
            alpha=args.alpha,
            ignore_index=IGNORE_INDEX,
            num_items_in_batch=num_items_in_batch,
            jsd_beta=args.jsd_beta,
            skew_lambda=args.skew_lambda,
            scale_by_temperature=args.scale_by_temperature,
            return_components=True,
        )
        if self.teacher_cache is not None and self.use_fused_loss:  # the sparse top-k loss, chunked
            student, _ = lm_head_spec(self.model)
            loss, distill, ce = fused_sparse_distillation_loss(
                student_outputs["final_hidden_state"][:, :-1],  # position i predicts the token at i + 1
                student.weight,
                **teacher_outputs,
                labels=labels,
                chunk_size=self.args.loss_chunk_size,
                student_bias=student.bias,
                student_softcap=student.softcap,
                student_logit_scale=student.logit_scale,
                vocab_size=self.vocab_size,
                **knobs,
            )
            return {"loss": loss, "distill_loss": distill, "ce_loss": ce}
        if self.teacher_cache is not None:  # the sparse top-k loss on the student's full logits
            student = student_outputs["logits"][:, :-1]  # position i predicts the token at i + 1: pairs with labels
            if self.vocab_size is not None:  # the cache covers the first vocab_size rows (the rest are padding)
                student = student[..., : self.vocab_size]
            loss, distill, ce = sparse_distillation_loss(student, **teacher_outputs, labels=labels, **knobs)
            return {"loss": loss, "distill_loss": distill, "ce_loss": ce}
        if self.use_fused_loss:
            loss, distill, ce = self._fused_loss(student_outputs, teacher_outputs, labels, knobs)
            return {"loss": loss, "distill_loss": distill, "ce_loss": ce}
        loss, distill, ce = distillation_loss(*self._aligned(student_outputs, teacher_outputs), labels, **knobs)
        return {"loss": loss, "distill_loss": distill, "ce_loss": ce}

    def _aligned(self, student_outputs, teacher_outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and teacher logits (or, fused, final hidden states) position-aligned with target_labels."""
        key = "final_hidden_state" if self.use_fused_loss else "logits"
        for role, outputs in (("student", student_outputs), ("teacher", teacher_outputs)):
            if key not in outputs:
                raise KeyError(f"{role}_forward returned no {key!r}; the fused loss needs the final hidden states: "
                               f"build on super().{role}_forward(...), or set loss_chunk_size=0 for full logits")
        student, teacher = student_outputs[key], teacher_outputs[key]
        if self.shift_labels:  # position i predicts the token at i + 1: pairs with labels[:, 1:]
            student, teacher = student[:, :-1], teacher[:, :-1]
        if self.vocab_size is not None and not self.use_fused_loss:  # padded vocabularies: the shared prefix
            student, teacher = student[..., : self.vocab_size], teacher[..., : self.vocab_size]
        return student, teacher

    def _fused_loss(self, student_outputs, teacher_outputs, labels, knobs):
        student_hidden, teacher_hidden = self._aligned(student_outputs, teacher_outputs)
        (student, _), (teacher, _) = lm_head_spec(self.model), lm_head_spec(self.teacher)
        return fused_distillation_loss(
            student_hidden,
            student.weight,
            teacher_hidden,
            teacher.weight,
            labels,
            chunk_size=self.args.loss_chunk_size,
            student_bias=student.bias,
            teacher_bias=teacher.bias,
            student_softcap=student.softcap,
            teacher_softcap=teacher.softcap,
            student_logit_scale=student.logit_scale,
            teacher_logit_scale=teacher.logit_scale,
            vocab_size=self.vocab_size,
            **knobs,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = self.target_labels(inputs)
        if not model.training:
            num_items_in_batch = None  # evaluation: per-batch means, token-weighted exactly in _record
        student_outputs = self.student_forward(model, inputs)
        teacher_outputs = self.teacher_forward(inputs)
        terms = self.distillation_terms(student_outputs, teacher_outputs, labels, num_items_in_batch)
        loss = terms["loss"]
        if num_items_in_batch is not None and self.accelerator.num_processes > 1:
            # The count is global, and DDP averages gradients over processes: undo that mean to get the global sum.
            loss = loss * self.accelerator.num_processes
        self._record(terms, inputs, model.training, counted=num_items_in_batch is not None)
        if not model.training and self.teacher_cache is None:  # agreement metrics need the teacher's full logits
            add_sums(self._eval_sums, self._agreement_sums(student_outputs, teacher_outputs, labels))
        return (loss, student_outputs) if return_outputs else loss

    def _agreement_sums(self, student_outputs, teacher_outputs, labels) -> dict[str, torch.Tensor]:
        """Evaluation metrics of this batch as sums (see hf_kd.metrics); chunked from hidden states when fused."""
        calibration = self.task != "causal_lm"  # ECE for classifiers
        student, teacher = self._aligned(student_outputs, teacher_outputs)
        if not self.use_fused_loss:
            return agreement_sums(student, teacher, labels, ignore_index=IGNORE_INDEX, calibration=calibration)
        student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        flat = labels.reshape(-1)
        valid = flat != IGNORE_INDEX
        student, teacher, flat = student[valid], teacher[valid], flat[valid]
        (s_head, _), (t_head, _) = lm_head_spec(self.model), lm_head_spec(self.teacher)
        sums: dict[str, torch.Tensor] = {}
        chunk = self.args.loss_chunk_size
        for start in range(0, max(flat.numel(), 1), chunk):  # never more than [chunk, V] logits at once
            rows = slice(start, start + chunk)
            with torch.no_grad():
                s_logits, t_logits = s_head.logits(student[rows], self.vocab_size), t_head.logits(teacher[rows], self.vocab_size)
            add_sums(sums, agreement_sums(s_logits, t_logits, flat[rows], calibration=calibration))
        return sums

    # ---- saving -------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student (a PEFT student: its adapters, or with ``save_merged`` the merged model) and a model card.

        The Trainer writes its checkpoints with ``save_model(<checkpoint-N>, _internal_call=True)``: those keep the
        adapters (training resumes from them) and get no card. Every other call (the user's, push_to_hub's) is final.
        """
        self._final_save = not (_internal_call and output_dir is not None)
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._final_save = False

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if not (self._final_save and self.args.save_merged and is_peft_model(model)):
            super()._save(output_dir, state_dict)
        elif self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            merged_copy(model).save_pretrained(output_dir)  # a copy: the trained model keeps its unmerged adapters
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self._final_save and self.args.should_save:
            card_from_trainer(self).save(os.path.join(output_dir, "README.md"))

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> None:  # fmt: skip
        """Write the distillation card (:mod:`hf_kd.card`) to ``output_dir``; push_to_hub calls it before uploading."""
        if not self.is_world_process_zero():
            return
        card = card_from_trainer(self, model_name=model_name, dataset=dataset, tags=tags,
                                 finetuned_from=finetuned_from, license=license, language=language)  # fmt: skip
        card.save(os.path.join(self.args.output_dir, "README.md"))

    # ---- exact token counts ----------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch one optimizer step's micro-batches and count their target positions across all processes."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batch_samples:
            return batch_samples, None
        count = sum(self._count_targets(batch) for batch in batch_samples).to(device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count).sum()
        self.tokens_trained = self.tokens_trained + count.detach()  # a tensor: no device sync per step
        self.steps_counted += 1
        return batch_samples, count

    def _count_targets(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        labels = self.target_labels(inputs)
        if labels is None:  # unlabeled classification batch: every example is one target
            first = next(v for v in inputs.values() if torch.is_tensor(v))
            return torch.tensor(first.shape[0])
        return (labels != IGNORE_INDEX).sum()

    # ---- logging ------------------------------------------------------------------------------------------------

    def _record(self, terms: dict[str, torch.Tensor], inputs, training: bool, counted: bool) -> None:
        """Accumulate the ``*_loss`` components: per optimizer step in training, token-weighted sums in evaluation."""
        mode = "train" if training else "eval"
        bucket = self._components[mode]
        if mode == "eval" or not counted:
            tokens = self._count_targets(inputs).to(torch.float64)
            bucket["tokens"] = bucket.get("tokens", 0) + tokens
        for name, value in terms.items():
            if name == "loss" or not name.endswith("_loss") or value is None:
                continue
            value = value.detach().to(torch.float64)
            if mode == "eval" or not counted:
                value = value * tokens  # normalized per batch -> back to a sum, re-normalized at log time
            bucket[name] = bucket.get(name, 0) + value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._components["train"]:
            steps = self.state.global_step - self._component_steps
            self._component_steps = self.state.global_step
            logs.update(self._reduce(self._components["train"], "", steps))
        prefix = next((k[: -len("_runtime")] for k in logs if k.endswith("_runtime") and k != "train_runtime"), None)
        if prefix is not None and self._components["eval"]:
            logs.update(self._reduce(self._components["eval"], f"{prefix}_", None))
        if prefix is not None and self._eval_sums:
            logs.update({f"{prefix}_{k}": round(v, 6) for k, v in self._finalize_eval_sums().items()})
        super().log(logs, start_time)

    def _finalize_eval_sums(self) -> dict[str, float]:
        names = sorted(self._eval_sums)
        values = [self._eval_sums[n].to(self.args.device, torch.float64).reshape(-1) for n in names]
        flat = torch.cat(values)
        if self.accelerator.num_processes > 1:
            flat = self.accelerator.reduce(flat, reduction="sum")  # one collective for every sum
        self._eval_sums = {}
        totals, offset = {}, 0
        for name, value in zip(names, values):
            part = flat[offset : offset + value.numel()].tolist()
            totals[name] = part if name.endswith(("_count", "_confidence", "_correct")) and "_bin_" in name else part[0]
            offset += value.numel()
        return finalize_metrics(totals, language_model=self.task == "causal_lm")

    def _reduce(self, bucket: dict[str, torch.Tensor], prefix: str, steps: int | None) -> dict[str, float]:
        """Sum a bucket over processes and normalize it: by token count if one was kept, else per optimizer step."""
        names = sorted(bucket)
        device = self.args.device
        values = torch.stack([torch.as_tensor(bucket[n], dtype=torch.float64, device=device) for n in names])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        totals = dict(zip(names, values.tolist()))
        bucket.clear()
        tokens = totals.pop("tokens", None)
        if tokens is not None:
            divisor = max(tokens, 1.0)
        else:
            divisor = max(steps or 1, 1)  # each step's values already sum to that step's global mean
        return {f"{prefix}{name}": round(value / divisor, 6) for name, value in totals.items()}

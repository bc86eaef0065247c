"""DistillationTrainer: a Trainer whose loss matches a frozen teacher's token distributions.

Reads top to bottom: setup, the step's micro-batches (generation, the :class:`Batch`, the exact count), the forward
passes, the loss, evaluation, saving and logs. ``compute_loss`` reads as: student rows, teacher signal, objective. The
kinds of teacher live in :mod:`hf_kd.teachers`, the tasks in :mod:`hf_kd.models.tasks`, the pairing of student and
teacher signals with a loss path in :mod:`hf_kd.objective.terms`, the counts and logged sums in
:mod:`hf_kd.training.accounting`, generation in :mod:`hf_kd.training.generation`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer

from hf_kd.config import DistillationConfig
from hf_kd.data import default_collator
from hf_kd.models.heads import lm_head_spec
from hf_kd.models.loading import TASKS, capture_final_hidden, unwrap
from hf_kd.models.sharding import check_world
from hf_kd.models.tasks import TEACHER_ID
from hf_kd.objective.signals import StudentHidden
from hf_kd.objective.terms import agreement, objective_terms, sample_health, signal_of, with_heads_gathered
from hf_kd.teachers import Teacher, make_teacher
from hf_kd.training.accounting import Accounting
from hf_kd.training.batch import Batch
from hf_kd.training.card import card_from_trainer
from hf_kd.training.evaluation import prediction_outputs, without_eval_repeats
from hf_kd.training.faults import FaultGuard
from hf_kd.training.generation import Generation, completion_stats
from hf_kd.training.preflight import check_arguments, check_setup, fused_loss_applies
from hf_kd.training.saving import save_student

logger = logging.getLogger(__name__)


class DistillationTrainer(Trainer):
    """Train ``model`` (the student) to match ``teacher_model`` with :func:`hf_kd.distillation_loss`.

    ``teacher_model``: a model, a path, ``"self"`` (the student's base model, adapters off) or a
    :class:`hf_kd.Teacher` object of any kind. Extension points (override one, call ``super()``; ``compute_loss``
    itself never needs copying):

    * :meth:`teacher_forward` -- how the frozen teacher is run. It may return the model's plain outputs (full
      ``logits``): the loss takes them on either path, fused or not.
    * :meth:`student_forward` -- how the student is run.
    * :meth:`distillation_terms` -- the loss terms from both outputs; add a key (``"hidden_loss"``) and fold it into
      ``"loss"``: every ``*_loss`` key is logged for train and eval next to ``loss``.
    * :meth:`prepare_batch` -- rewrite a micro-batch before it is counted and trained on (on-policy and seq_kd
      generation live there); :meth:`generate_completions` -- another generation engine.

    Normalization is exact: every term is a sum over valid target positions divided by the number of valid positions
    in the whole optimizer step (all gradient-accumulation micro-batches, all processes), so per-device batch 4 x GA 1
    and batch 1 x GA 4 (or 2 processes x batch 2) produce the same update. Evaluation is token-weighted over the whole
    set: ``eval_loss = alpha * eval_distill_loss + (1 - alpha) * eval_ce_loss``.
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the step's global token count itself

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | Teacher | None = None,
        args: DistillationConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        recipe: Mapping[str, Any] | str | None = None,
        **kwargs,
    ):
        args, self.task, teacher_model, model = check_arguments(model, teacher_model, args, peft_config)
        self.task_spec = TASKS[self.task]  # the task as an object: its targets, alignment and what it supports
        if data_collator is None:
            data_collator = default_collator(self.task_spec, processing_class)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        check_world(self.accelerator)  # processes launched together train together, on the engine asked for
        # transformers releases before loss_is_scaled_for_ga divide the loss by the GA steps unless they believe the
        # model normalized it by num_items_in_batch: it has been, by compute_loss, whatever the student accepts
        self.model_accepts_loss_kwargs = True
        self.recipe = recipe  # embedded in the model card; the CLI passes the recipe it ran
        self.objective = args.objective  # every knob of the loss, validated once
        check_setup(self)  # refusals first: nothing is loaded for a run that cannot work
        self.teacher = make_teacher(self, teacher_model)
        self.vocab_size = self.teacher.vocab_size  # None, or the shared prefix of padded vocabularies
        self.use_fused_loss = fused_loss_applies(self)
        self.accounting = Accounting(
            self._sum_over_processes, args.device, language_model=self.task_spec.language_model
        )
        self.add_callback(self.accounting)  # its clocks start with training
        self.generation = Generation.for_trainer(self) if args.generates else None
        if self.generation is not None and self.generation.engine is not None:  # vLLM: fed the student's weights
            self.add_callback(self.generation.engine.syncing(args.vllm_sync_steps))
        student_name = getattr(unwrap(self.model), "name_or_path", None) or type(unwrap(self.model)).__name__
        self.faults = FaultGuard(self._sum_over_processes, self.teacher.name, student_name)
        self.add_callback(self.faults)  # stops a NaN step before the optimizer applies it
        self._wants_full_logits = False  # set while a prediction loop returns logits (see evaluation_loop)
        self._final_save = False  # set by save_model for a final save (not a checkpoint-N)

    # ---- setup ------------------------------------------------------------------------------------------------

    @property
    def teacher_model(self) -> nn.Module | None:
        """The frozen teacher module (the student's own PeftModel for teacher 'self'; ``None`` without one)."""
        return self.teacher.model

    def _set_signature_columns_if_needed(self) -> None:
        """The Trainer keeps the dataset columns the student's forward takes; a teacher's own columns (a routing
        ``teacher_id``) are kept too, and dropped again before any forward (:meth:`_forward`)."""
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in self.teacher.columns if c not in self._signature_columns]

    def _sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.args.device), reduction="sum")

    # ---- one optimizer step's micro-batches: generated, made Batches, counted -----------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch one optimizer step's micro-batches, prepare them, and count their target positions on all processes."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batch_samples:
            return batch_samples, None
        batch_samples = [self._batch_of(self.prepare_batch(batch, index)) for index, batch in enumerate(batch_samples)]
        for batch in batch_samples:
            self.teacher.prefetch(batch)  # a served teacher answers while the student runs its forward
        local = sum(batch.count for batch in batch_samples).to(device)  # after generation: the batch trained on
        return batch_samples, self.accounting.count_step(local)

    def _batch_of(self, prepared: Mapping[str, Any]) -> Batch:
        batch = Batch.of(prepared, self.task_spec)
        batch.written_by = None if self.generation is None else self.generation.writer
        return batch

    def prepare_batch(self, inputs: Mapping[str, Any], index: int) -> Mapping[str, Any]:
        """Micro-batch ``index`` of this optimizer step as the loss will see it: the dataset's completions, the
        student's own (with probability ``lmbda``), or the teacher's (``seq_kd``). Runs before the step's targets are
        counted, so the normalization follows the batch that is trained on."""
        if self.generation is None:
            return inputs
        self.generation.restore_rng_first(super()._load_rng_state)
        turn = self.generation.turn(self.state.global_step, index)
        if turn is None:
            self.accounting.record_generation(None)
            return inputs
        started = time.perf_counter()
        inputs = self._prepare_inputs(inputs)
        with self.accelerator.autocast():  # bf16 / fp16 training: generate in the same precision
            if turn == "student":  # the student as it is now: PEFT adapters on
                generated = self.generate_completions(self.accelerator.unwrap_model(self.model), inputs)
            else:
                with self.teacher.generating() as teacher:
                    generated = self.generate_completions(teacher, inputs)
        seconds = time.perf_counter() - started
        max_new_tokens = self.args.generation_settings()["max_new_tokens"]
        self.accounting.record_generation(completion_stats(generated, self.generation.eos, max_new_tokens), seconds)
        # one completion per example, in order: the example's own teacher (routing) scores it
        return {**generated, **{c: inputs[c] for c in self.teacher.columns if c in inputs}}

    def generate_completions(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The batch the loss sees after ``model`` completes each example's prompt (:meth:`Generation.complete`:
        ``model.generate``). The override point for another engine (vLLM, a server): return the same three tensors,
        right-padded ``input_ids`` / ``attention_mask`` and ``labels`` -100 on the prompt and the padding."""
        return self.generation.complete(model, inputs)

    def _prepare_inputs(self, inputs):
        if isinstance(inputs, Batch):  # moved to the device as a whole: its targets and count travel with it
            return inputs.moved(super()._prepare_inputs(inputs.tensors), self.args.device)
        return super()._prepare_inputs(inputs)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.generation is not None:  # sampled completions must see the checkpoint's RNG
            self.generation.resuming(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_rng_state(self, checkpoint) -> None:
        if self.generation is None or self.generation.trainer_may_restore_rng():
            super()._load_rng_state(checkpoint)

    # ---- the forward passes -------------------------------------------------------------------------------------

    def target_labels(self, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """Labels aligned with the logits, -100 where a position is not a target (:meth:`Task.targets`)."""
        return inputs.targets if isinstance(inputs, Batch) else self.task_spec.targets(inputs)

    def _forward(self, model: nn.Module, inputs: Mapping[str, Any]):
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", TEACHER_ID)}
        if not self.task_spec.language_model:
            return model(**model_inputs)
        if not self.use_fused_loss:
            return model(**model_inputs, use_cache=False)
        # Fused path: logits for the last position only (B x V, negligible); the loss projects the captured final
        # hidden states chunk by chunk instead of materializing [B, S, V] logits.
        with capture_final_hidden(model) as box:
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
        """The frozen teacher's view of the batch, no graph kept (:meth:`hf_kd.Teacher.run`): model outputs, or a
        signal (a cache's top-k rows, another tokenizer's aligned outputs)."""
        return self.teacher.run(inputs, self._forward, self.target_labels(inputs))

    # ---- the loss -----------------------------------------------------------------------------------------------

    def _student_signal(self, outputs) -> torch.Tensor | StudentHidden:
        """The student's aligned full logits, or (fused) its final hidden states with its head."""
        if self.use_fused_loss and "final_hidden_state" in outputs:
            head = lm_head_spec(self.model, sharded=True)[0]  # FSDP2 / ZeRO-3: gathered by with_heads_gathered
            return StudentHidden(self.task_spec.aligned(outputs["final_hidden_state"]), head)
        return self.task_spec.aligned(outputs["logits"])

    def _teacher_signal(self, outputs):
        """A signal already (a cache's rows, another tokenizer's outputs), or the teacher model's outputs made one."""
        return signal_of(outputs, self.teacher.model, self.task_spec)

    def distillation_terms(
        self, student_outputs, teacher_outputs, labels: torch.Tensor, num_items_in_batch=None
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "distill_loss", "ce_loss"}``: the objective and its components, normalized alike (a teacher with
        another tokenizer adds ``aligned_fraction`` and ``shared_mass``, logged too)."""

        def terms(student, teacher):
            return objective_terms(
                student,
                teacher,
                labels,
                self.objective,
                num_items_in_batch=num_items_in_batch,
                chunk_size=self.args.loss_chunk_size or None,
                vocab_size=self.vocab_size,
            )

        return self._with_heads(terms, student_outputs, teacher_outputs)

    def _with_heads(self, compute, student_outputs, teacher_outputs):
        """``compute(student_signal, teacher_signal)``, any head sharded by FSDP2 / ZeRO-3 gathered for it."""
        student, teacher = self._student_signal(student_outputs), self._teacher_signal(teacher_outputs)
        return with_heads_gathered(compute, student, teacher, self.model, self.teacher.model)

    def _metric_sums(self, metric, student_outputs, teacher_outputs, targets, **kwargs):
        """``metric(student_signal, teacher_signal, targets, ...)`` (teacher agreement, on-policy health), chunked as
        the loss is and with any sharded head gathered."""
        chunk, vocab = self.args.loss_chunk_size or None, self.vocab_size
        compute = lambda s, t: metric(s, t, targets, chunk_size=chunk, vocab_size=vocab, **kwargs)  # noqa: E731
        return self._with_heads(compute, student_outputs, teacher_outputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            inputs = without_eval_repeats(self.accelerator, inputs)
            num_items_in_batch = None  # evaluation: per-batch means, weighted by their token counts in accounting
        batch = Batch.of(inputs, self.task_spec)
        student_outputs = self.student_forward(model, batch)
        teacher_outputs = self.teacher_forward(batch)
        with self.accelerator.autocast():  # bf16 / fp16 training: the loss's head GEMMs too (accelerate wraps only
            # model.forward), its softmax and divergence math in float32
            terms = self.distillation_terms(student_outputs, teacher_outputs, batch.targets, num_items_in_batch)
        loss = terms["loss"]
        if num_items_in_batch is not None and self.accelerator.num_processes > 1:
            # The count is global, and DDP averages gradients over processes: undo that mean to get the global sum.
            loss = loss * self.accelerator.num_processes
        self.faults.record(terms, self.objective.alpha)
        if model.training and self.accelerator.sync_gradients:
            # the step's last micro-batch, before its backward: under DeepSpeed that backward also steps the optimizer
            self.faults.check(f"step {self.state.global_step + 1}")
        if model.training:
            self.accounting.record_train(terms, None if num_items_in_batch is not None else batch.count)
            if batch.written_by == "student":  # on-policy health, from the rows the loss read
                with torch.no_grad():  # the heads gathered without a gradient, as the teacher's (no hooked forward)
                    health = self._metric_sums(sample_health, student_outputs, teacher_outputs, batch.targets)
                self.accounting.record_health(health)
        else:
            calibration = not self.task_spec.language_model
            sums = self._metric_sums(
                agreement, student_outputs, teacher_outputs, batch.targets, calibration=calibration
            )
            self.accounting.record_eval(terms, batch.count, sums)
        if not return_outputs:
            return loss
        chunk = self.args.loss_chunk_size or None
        return loss, prediction_outputs(student_outputs, self.model, self._wants_full_logits, chunk)

    # ---- evaluation ---------------------------------------------------------------------------------------------

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """The Trainer's loop, with ``{prefix}_loss`` and every component token-weighted over the whole set, and the
        teacher-agreement metrics; ``evaluate()`` and ``predict()`` (``test_*``) alike, nothing carried over."""
        self.accounting.reset_eval()  # a compute_loss called by hand in eval mode must not leak into this loop
        loss_only = prediction_loss_only if prediction_loss_only is not None else self.args.prediction_loss_only
        self._wants_full_logits = not loss_only
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        finally:
            self._wants_full_logits = False
        self.faults.check(description.lower())  # NaN metrics are a fault, not a result
        output.metrics.update(self.accounting.eval_metrics(metric_key_prefix))
        return output

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
        save_student(self, output_dir if output_dir is not None else self.args.output_dir, state_dict, self._final_save)

    def create_model_card(
        self,
        language=None,
        license=None,
        tags=None,
        model_name=None,
        finetuned_from=None,
        tasks=None,
        dataset_tags=None,
        dataset=None,
        dataset_args=None,
    ) -> None:
        """Write the distillation card (:mod:`hf_kd.training.card`); push_to_hub calls it before uploading."""
        if not self.is_world_process_zero():
            return
        card = card_from_trainer(
            self,
            model_name=model_name,
            dataset=dataset,
            tags=tags,
            finetuned_from=finetuned_from,
            license=license,
            language=language,
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))

    # ---- counts and logs ----------------------------------------------------------------------------------------

    @property
    def tokens_trained(self):
        """Target positions of this run's optimizer steps, all processes (for the model card)."""
        return self.accounting.tokens_trained

    @property
    def steps_counted(self) -> int:
        """Optimizer steps in :attr:`tokens_trained` (fewer than ``global_step`` after a resume)."""
        return self.accounting.steps_counted

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: the components of the steps since the last one
            logs.update(self.accounting.train_logs())
        if "train_runtime" in logs:  # the end-of-training summary: components over the whole run, like train_loss
            run = self.accounting.run_logs()
            # the Trainer's own train_loss adds this process's unlogged steps ungathered: wrong under DDP
            logs["train_loss"] = run.pop("train_loss", logs.get("train_loss"))
            logs.update(run)
        super().log(logs, start_time)

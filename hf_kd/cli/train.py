"""`hf-kd train`: a recipe -> a distilled student in output_dir, with a completion marker only once it is finished."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
import time

from hf_kd.cli import COMPLETE_MARKER, OUTPUT_DIR_HELP  # noqa: F401
from hf_kd.cli.output_dir import (
    check_output_dir,
    checkpoints_in,
    clear_previous_run,
    resume_target,
    save_resolved_recipe,
    write_marker,
)
from hf_kd.recipe.recipe import Recipe, RecipeError, loads_teacher_model

logger = logging.getLogger("hf_kd")


# output_dir/RESOLVED_RECIPE: the recipe as this run started it (every command-line override applied), written when
# training starts; `hf-kd train <it> --resume_from_checkpoint true` continues the run from any working directory
def _load(loader, name: str, key: str, recipe: Recipe, **kwargs):
    try:
        return loader(name, **kwargs)
    except OSError as err:  # missing repo, offline without a cache, gated model: a recipe-level problem
        raise RecipeError(recipe.path, key, str(err).strip().splitlines()[0]) from None


def load_tokenizer(recipe: Recipe, name: str, key: str):
    from transformers import AutoTokenizer

    from hf_kd.data import is_empty_tokenizer

    tokenizer = _load(AutoTokenizer.from_pretrained, name, key, recipe)
    if is_empty_tokenizer(tokenizer):
        raise RecipeError(
            recipe.path,
            key,
            f"{name} holds no tokenizer files (transformers built an empty tokenizer: "
            f"{len(tokenizer)} special tokens, no vocabulary); set {key} to one that has them",
        )
    return tokenizer


def load_student(recipe: Recipe):
    """The student, loaded with the Auto class of the recipe's task; a classifier gets the teacher's label set."""
    from transformers import AutoConfig

    from hf_kd.models.adapters import SELF_TEACHER
    from hf_kd.models.loading import load_model

    section = recipe.student
    # fp32 master weights; bf16: true in training autocasts the compute
    kwargs = {**section.init_kwargs, "dtype": section.dtype or "float32"}
    if recipe.task == "classification" and recipe.teacher.name_or_path != SELF_TEACHER:
        # a base checkpoint (google/bert_uncased_L-4_H-256_A-4) gets a new head with the teacher's classes, in its order
        teacher = _load(AutoConfig.from_pretrained, recipe.teacher.name_or_path, "teacher.name_or_path", recipe)
        kwargs = {
            "num_labels": teacher.num_labels,
            "id2label": teacher.id2label,
            "label2id": teacher.label2id,
            **kwargs,
        }
        # a student fine-tuned on other classes: its head is re-initialized for the teacher's (transformers warns)
        kwargs.setdefault("ignore_mismatched_sizes", True)
    return _load(load_model, section.name_or_path, "student.name_or_path", recipe, task=recipe.task, init_kwargs=kwargs)


def check_labels(recipe: Recipe, datasets: dict, num_labels: int) -> None:
    """Classification: every label is a class of the model (a string or out-of-range label fails here, not in CUDA)."""
    for key, dataset in datasets.items():
        if dataset is not None and len(dataset) and max(dataset["labels"]) >= num_labels:
            raise RecipeError(
                recipe.path,
                "data.label_field",
                f"{key} data has label {max(dataset['labels'])}, but the "
                f"teacher has {num_labels} classes (labels are 0..{num_labels - 1})",
            )


# DistillationConfig field (or trainer argument) -> where a recipe sets it; any other field sits under training:
_RECIPE_KEYS = {
    "teacher_model_name_or_path": "teacher.name_or_path",
    "teacher_model_init_kwargs": "teacher.init_kwargs",
    "teacher_cache": "teacher.cache",
    "teacher_kind": "teacher.kind",
    "teacher_options": "teacher.options",
    "teacher_tokenizer_name_or_path": "teacher.tokenizer",
    "peft_config": "peft",
    "train_dataset": "data",
    "teacher_id": "data.teacher_field",  # several teachers, routed: the column a recipe names
}


def recipe_key(field: str) -> str:
    """The recipe key of a :class:`hf_kd.config.SetupError`'s field, for the one-line error."""
    return _RECIPE_KEYS.get(field, f"training.{field}")


def cpu_threads(args) -> int | None:
    """A CPU run's torch threads: 1, set here, unless OMP_NUM_THREADS is set (torch reads it itself). Returns the
    number set, or ``None`` (not a CPU run, or OMP_NUM_THREADS chose).

    Why 1 (``benchmarks/cli_speed.py --part threads``, README "Recipes and the CLI"): on a shared 2-core machine a
    step of the demo's models took 0.10 s with 1 thread and 2.2 s with torch's default of 2 (OpenMP threads spin while
    another process holds the other core), and a 7.6M-parameter student with a 29M teacher 4.9 s vs 15.5 s. On idle
    cores a model that size may gain from more: OMP_NUM_THREADS=N asks for N.
    """
    if args.device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    torch.set_num_threads(1)
    return 1


def train_on_cpu_defaults(recipe: Recipe, args) -> None:
    """What a CPU run (``use_cpu``, or no accelerator) changes in the recipe's config unless the recipe sets it:
    no pinned memory (there is no device to pin it for: torch warns once per dataloader), one torch thread."""
    if args.device.type != "cpu":
        return
    if "dataloader_pin_memory" not in recipe.training:
        args.dataloader_pin_memory = False
    if cpu_threads(args):
        logger.info("CPU run: 1 torch thread (faster for models a CPU can train; OMP_NUM_THREADS=N for N)")


def final_evaluation(trainer) -> dict:
    """The evaluation of the final weights: the one logged at the last step if there was one (eval_steps dividing
    the steps, or eval_strategy epoch), else a new ``evaluate()``."""
    state = trainer.state
    for entry in reversed(state.log_history):
        if any(key.startswith("eval_") for key in entry):
            if entry.get("step") == state.global_step:
                return {key: value for key, value in entry.items() if key != "step"}
            break
    return trainer.evaluate()


@contextlib.contextmanager
def _quiet_transformers_bars():
    """No "Writing model shards" / "Loading weights" bars inside the training bar (checkpoints, the final save)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class _NoDeepSpeedAcceleratorLine(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU. If you have GPU ..." warning (printed to stdout)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Setting accelerator to CPU")


@contextlib.contextmanager
def _quiet_deepspeed_import(args):
    """A run without DeepSpeed does not print DeepSpeed's accelerator line. hf_kd imports deepspeed only for a
    DeepSpeed run (hf_kd.models.sharding), but accelerate's ``unwrap_model`` imports it whenever it is installed
    (from the Trainer's ``__init__``), and its import on a machine without a GPU warns that it "was unable to detect"
    one. A DeepSpeed run keeps the line."""
    uses_deepspeed = bool(args.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    if uses_deepspeed or "deepspeed" in sys.modules:  # imported already: its line, if any, is out
        yield
        return
    deepspeed_logger, line = logging.getLogger("DeepSpeed"), _NoDeepSpeedAcceleratorLine()
    deepspeed_logger.addFilter(line)  # deepspeed's own logger setup keeps a logger's filters
    try:
        yield
    finally:
        deepspeed_logger.removeFilter(line)


def _end_progress_bars() -> None:
    """Close the progress bars an interrupt left open (Ctrl-C skips the Trainer's on_train_end): the line printed
    next starts a line of its own instead of continuing the bar's."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def run_train(recipe: Recipe, overwrite: bool = False) -> dict:
    """Train the recipe's student; returns the metrics written to ``training_complete.json``."""
    from hf_kd.data import prepare_datasets
    from hf_kd.errors import SetupError
    from hf_kd.models.adapters import SELF_TEACHER
    from hf_kd.training.trainer import DistillationTrainer

    args = recipe.training_args()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO if args.process_index == 0 else logging.WARNING)
    resume = resume_target(args.resume_from_checkpoint)
    check_output_dir(recipe, args, resume, overwrite)
    train_on_cpu_defaults(recipe, args)

    tokenizer = load_tokenizer(recipe, recipe.student.tokenizer or recipe.student.name_or_path, "student.tokenizer")
    teacher_name = recipe.teacher.tokenizer or recipe.teacher.name_or_path
    if not loads_teacher_model(recipe.teacher):
        teacher_name = recipe.teacher.tokenizer or SELF_TEACHER  # a kind of the user's own: its tokenizer, if named
    teacher_tokenizer = None  # self-distillation: one model, one tokenizer, nothing to compare
    if teacher_name != SELF_TEACHER:
        teacher_tokenizer = load_tokenizer(recipe, teacher_name, "teacher.tokenizer")
    from hf_kd.teachers.cross_tokenizer.vocabulary import same_ids

    if teacher_tokenizer is not None and not same_ids(tokenizer, teacher_tokenizer):
        teacher_tokenizer = None  # another vocabulary: the trainer aligns the two tokenizations (hf_kd.teachers.cross_tokenizer.alignment)
    with args.main_process_first(desc="dataset preparation"):  # rank 0 tokenizes and caches, the others reuse it
        train_dataset, eval_dataset = prepare_datasets(
            recipe.data,
            tokenizer,
            teacher_tokenizer,
            seed=args.seed,
            every_batch_generated=args.every_batch_generated,
            generates=args.generates,
        )
    logger.info(
        "train: %d examples%s",
        len(train_dataset),
        f", eval: {len(eval_dataset)} examples" if eval_dataset is not None else "",
    )

    student = load_student(recipe)
    if recipe.task == "classification":
        check_labels(recipe, {"train": train_dataset, "eval": eval_dataset}, student.config.num_labels)
    peft_config = None
    if recipe.peft is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(**recipe.peft)
    try:
        with _quiet_deepspeed_import(args):
            trainer = DistillationTrainer(
                model=student,
                args=args,  # holds teacher_model_name_or_path / _init_kwargs (or teacher_cache): it loads the teacher
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=tokenizer,  # saved with the student; proves padded vocab rows are padding
                peft_config=peft_config,
                recipe=recipe.to_dict(),  # embedded in the model card
            )
    except SetupError as err:  # a pair that cannot be distilled (vocabularies, label sets, a cache of other data)
        raise RecipeError(recipe.path, recipe_key(err.field), err.problem.strip().splitlines()[0]) from None
    if overwrite:
        clear_previous_run(args)
    if args.process_index == 0:  # the run as started, for the resume command (train_command prints it)
        save_resolved_recipe(recipe, args.output_dir)
    started = time.time()
    with _quiet_transformers_bars():
        result = trainer.train(resume_from_checkpoint=resume)
        metrics = {"train": result.metrics}
        if eval_dataset is not None:  # before saving: the model card written by save_model() shows the final metrics
            metrics["eval"] = final_evaluation(trainer)
        trainer.save_model()  # every process: FSDP / ZeRO-3 gather their shards here
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        write_marker(args.output_dir, recipe, metrics, trainer.state.global_step, time.time() - started)
        logger.info("finished: the student is in %s (%s written)", args.output_dir, COMPLETE_MARKER)
    return metrics


def train_command(recipe: Recipe, overwrite: bool) -> int:
    """``run_train``; a NaN step or Ctrl-C ends it with one line (no traceback) that says what is kept and how to
    go on. Exit codes: 1 for a fault, 130 for an interrupt (as a shell reports Ctrl-C)."""
    from hf_kd.errors import SetupError
    from hf_kd.teachers.served.teacher import TeacherUnavailable
    from hf_kd.training.faults import NonFiniteError

    try:
        run_train(recipe, overwrite=overwrite)
        return 0
    except NonFiniteError as err:
        print(f"error: {recipe.path}: training stopped: {err}", file=sys.stderr)
        return 1
    except SetupError as err:  # found at a batch, not at setup (a routed teacher's id in streamed data): one line
        _end_progress_bars()
        print(f"error: {recipe.path}: {recipe_key(err.field)}: {err.problem.strip().splitlines()[0]}", file=sys.stderr)
        return 2
    except TeacherUnavailable as err:  # the step was not applied; the run resumes from its last checkpoint
        _end_progress_bars()
        out = recipe.training_args(check_hardware=False).output_dir
        checkpoints = checkpoints_in(out)
        command = f"hf-kd train {shlex.quote(save_resolved_recipe(recipe, out))}"
        where = (
            f"the last checkpoint is {checkpoints[-1]}; resume with: {command} --resume_from_checkpoint true"
            if checkpoints
            else f"no checkpoint yet; start again with: {command}"
        )
        print(f"error: {recipe.path}: training stopped: {err}; {where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _end_progress_bars()
        out = recipe.training_args(check_hardware=False).output_dir
        checkpoints = checkpoints_in(out)
        # the recipe as this command resolved it: resuming with the original file would drop the overrides
        command = f"hf-kd train {shlex.quote(save_resolved_recipe(recipe, out))}"
        if os.path.exists(os.path.join(out, COMPLETE_MARKER)):  # --overwrite_output_dir had not cleared it yet
            print(
                f"interrupted before training started; start again with: {command} --overwrite_output_dir",
                file=sys.stderr,
            )
        elif checkpoints:
            print(
                f"interrupted: the last checkpoint is {checkpoints[-1]}; resume with: {command} "
                "--resume_from_checkpoint true",
                file=sys.stderr,
            )
        else:
            print(
                f"interrupted before the first checkpoint (none in {out}); start again with: {command}", file=sys.stderr
            )
        return 130

"""`hf-kd train`: a recipe -> a distilled student in output_dir, with a completion marker only once it is finished."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shlex
import shutil
import sys
import time

import yaml

from hf_kd.cli import COMPLETE_MARKER, OUTPUT_DIR_HELP  # noqa: F401
from hf_kd.recipe.recipe import Recipe, RecipeError, loads_teacher_model

logger = logging.getLogger("hf_kd")
# output_dir/RESOLVED_RECIPE: the recipe as this run started it (every command-line override applied), written when
# training starts; `hf-kd train <it> --resume_from_checkpoint true` continues the run from any working directory
RESOLVED_RECIPE = "hf_kd_recipe.yaml"


def _checkpoints(output_dir: str) -> list[str]:
    found = glob.glob(os.path.join(output_dir, "checkpoint-*"))
    return sorted((p for p in found if p.rsplit("-", 1)[-1].isdigit()), key=lambda p: int(p.rsplit("-", 1)[-1]))


def resume_target(value: str | None) -> str | bool | None:
    """``resume_from_checkpoint``: ``true`` resumes from the last checkpoint in output_dir, a path from that one."""
    if value is None or str(value).lower() in ("", "false", "no", "none"):
        return None
    return True if str(value).lower() in ("true", "yes", "last") else str(value)


def check_output_dir(recipe: Recipe, args, resume, overwrite: bool) -> None:
    """Refuse to train over a finished run or to silently restart an unfinished one (all processes agree)."""
    out = args.output_dir
    finished = os.path.exists(os.path.join(out, COMPLETE_MARKER))
    checkpoints = _checkpoints(out)
    key = "training.output_dir"
    if overwrite and resume:
        raise RecipeError(recipe.path, key, "--overwrite_output_dir and --resume_from_checkpoint contradict each other")
    if finished and not overwrite:
        raise RecipeError(
            recipe.path,
            key,
            f"{out} already holds a finished run ({COMPLETE_MARKER}); choose another "
            "--output_dir, or pass --overwrite_output_dir to replace it",
        )
    if checkpoints and not resume and not overwrite:
        raise RecipeError(
            recipe.path,
            key,
            f"{out} holds checkpoints of an unfinished run (last: "
            f"{os.path.basename(checkpoints[-1])}); pass --resume_from_checkpoint true to continue it, or "
            "--overwrite_output_dir to start over",
        )
    for section in (recipe.student, recipe.teacher):  # saving there would overwrite the model the run started from
        if os.path.isdir(section.name_or_path) and os.path.realpath(section.name_or_path) == os.path.realpath(out):
            raise RecipeError(
                recipe.path,
                key,
                f"{out} is the {'student' if section is recipe.student else 'teacher'}'s "
                "own model directory: training would overwrite it; choose another output_dir",
            )
    if resume is True and not checkpoints:
        raise RecipeError(recipe.path, "training.resume_from_checkpoint", f"no checkpoint-* in {out} to resume from")
    if isinstance(resume, str) and not os.path.isdir(resume):
        raise RecipeError(recipe.path, "training.resume_from_checkpoint", f"no such directory: {resume}")


def clear_previous_run(args) -> None:
    """--overwrite_output_dir: remove the marker, then the checkpoints. Called once the data and models have loaded,
    so a recipe that fails on its data leaves the previous run intact."""
    out = args.output_dir
    with args.main_process_first(local=False, desc="clearing the previous run"):
        if args.process_index == 0:  # the marker goes first: a half-overwritten dir must never look finished
            if os.path.exists(os.path.join(out, COMPLETE_MARKER)):
                os.remove(os.path.join(out, COMPLETE_MARKER))
            for path in _checkpoints(out):
                shutil.rmtree(path)


def _absolute(value):
    """A local path made absolute (the run's working directory no longer matters); anything else (a Hub id, "self",
    None, a teacher kind's own name) as it was."""
    if isinstance(value, str) and value and value != "self" and os.path.exists(os.path.expanduser(value)):
        return os.path.abspath(os.path.expanduser(value))
    return value


def _without_secrets(value, where: str, dropped: list[str]):
    """``value`` without the keys the model card never publishes (hub_token, api_key, ...); their dotted names are
    appended to ``dropped``."""
    from hf_kd.training.card import is_secret_key

    if isinstance(value, dict):
        dropped += [f"{where}{key}" for key in value if is_secret_key(key)]
        return {
            key: _without_secrets(v, f"{where}{key}.", dropped) for key, v in value.items() if not is_secret_key(key)
        }
    if isinstance(value, list):
        return [_without_secrets(v, where, dropped) for v in value]
    return value


def save_resolved_recipe(recipe: Recipe, output_dir: str) -> str:
    """Write the recipe as this run resolved it to ``output_dir/hf_kd_recipe.yaml``: the YAML with every command-line
    override applied and local paths made absolute, without ``resume_from_checkpoint`` (the resume command adds it)
    and without secrets (output_dir is what push_to_hub uploads: the file names the keys left out). Returns the
    file's path."""
    dropped: list[str] = []
    resolved = json.loads(json.dumps(recipe.to_dict(), default=str))  # plain YAML types: tuples -> lists, enums -> str
    resolved = _without_secrets(resolved, "", dropped)
    for role in ("teacher", "student"):
        for key in ("name_or_path", "tokenizer", "cache"):
            resolved[role][key] = _absolute(resolved[role].get(key))
    for key in ("dataset", "eval_split"):
        resolved["data"][key] = _absolute(resolved["data"].get(key))
    training = resolved["training"]
    training.pop("resume_from_checkpoint", None)
    training["output_dir"] = os.path.abspath(os.path.expanduser(training["output_dir"]))  # required: never missing
    if "teacher_cache" in training:  # a --teacher_cache override
        training["teacher_cache"] = _absolute(training["teacher_cache"])
    path = os.path.join(output_dir, RESOLVED_RECIPE)
    header = (
        f"# The recipe of the run in this directory, as `hf-kd train` resolved it from {recipe.path} (command-line "
        f"overrides applied, local paths absolute).\n# Resume the run with: hf-kd train "
        f"{shlex.quote(os.path.abspath(path))} --resume_from_checkpoint true\n"
    )
    if dropped:
        header += f"# Left out (secrets): {', '.join(dropped)}; pass them again on the command line (--key value).\n"
    os.makedirs(output_dir, exist_ok=True)
    with open(f"{path}.{os.getpid()}.tmp", "w", encoding="utf-8") as f:
        f.write(header + yaml.safe_dump(resolved, sort_keys=False))
    os.replace(f"{path}.{os.getpid()}.tmp", path)
    return path


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
        _write_marker(args.output_dir, recipe, metrics, trainer.state.global_step, time.time() - started)
        logger.info("finished: the student is in %s (%s written)", args.output_dir, COMPLETE_MARKER)
    return metrics


def _write_marker(output_dir: str, recipe: Recipe, metrics: dict, step: int, seconds: float) -> None:
    import torch
    import transformers

    from hf_kd import __version__

    payload = {
        "recipe": os.path.abspath(recipe.path),
        "resolved_recipe": _without_secrets(recipe.to_dict(), "", []),  # output_dir is what push_to_hub uploads
        "global_step": step,
        "train_seconds": round(seconds, 1),
        "metrics": metrics,
        "versions": {"hf_kd": __version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = os.path.join(output_dir, COMPLETE_MARKER)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(path + ".tmp", path)  # atomic: the marker is either absent or complete


def train_command(recipe: Recipe, overwrite: bool) -> int:
    """``run_train``; a NaN step or Ctrl-C ends it with one line (no traceback) that says what is kept and how to
    go on. Exit codes: 1 for a fault, 130 for an interrupt (as a shell reports Ctrl-C)."""
    from hf_kd.teachers.served.teacher import TeacherUnavailable
    from hf_kd.training.faults import NonFiniteError

    try:
        run_train(recipe, overwrite=overwrite)
        return 0
    except NonFiniteError as err:
        print(f"error: {recipe.path}: training stopped: {err}", file=sys.stderr)
        return 1
    except TeacherUnavailable as err:  # the step was not applied; the run resumes from its last checkpoint
        _end_progress_bars()
        out = recipe.training_args(check_hardware=False).output_dir
        checkpoints = _checkpoints(out)
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
        checkpoints = _checkpoints(out)
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

"""The output directory of `hf-kd train`: what may be trained over, the resolved recipe kept there, the completion
marker written last (a directory without it is not a finished run)."""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import time

import yaml

from hf_kd.cli import COMPLETE_MARKER
from hf_kd.recipe.recipe import Recipe, RecipeError

RESOLVED_RECIPE = "hf_kd_recipe.yaml"


def checkpoints_in(output_dir: str) -> list[str]:
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
    checkpoints = checkpoints_in(out)
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
            for path in checkpoints_in(out):
                shutil.rmtree(path)


def _absolute(value):
    """A local path made absolute (the run's working directory no longer matters); anything else (a Hub id, "self",
    None, a teacher kind's own name) as it was."""
    if isinstance(value, str) and value and value != "self" and os.path.exists(os.path.expanduser(value)):
        return os.path.abspath(os.path.expanduser(value))
    return value


def save_resolved_recipe(recipe: Recipe, output_dir: str) -> str:
    """Write the recipe as this run resolved it to ``output_dir/hf_kd_recipe.yaml``: the YAML with every command-line
    override applied and local paths made absolute, without ``resume_from_checkpoint`` (the resume command adds it)
    and without secrets (output_dir is what push_to_hub uploads: the file names the keys left out). Returns the
    file's path."""
    dropped: list[str] = []
    resolved = json.loads(json.dumps(recipe.to_dict(), default=str))  # plain YAML types: tuples -> lists, enums -> str
    from hf_kd.training.card import without_secrets

    resolved = without_secrets(resolved, dropped)
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


def write_marker(output_dir: str, recipe: Recipe, metrics: dict, step: int, seconds: float) -> None:
    import torch
    import transformers

    from hf_kd import __version__
    from hf_kd.training.card import without_secrets

    payload = {
        "recipe": os.path.abspath(recipe.path),
        "resolved_recipe": without_secrets(recipe.to_dict()),  # output_dir is what push_to_hub uploads
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

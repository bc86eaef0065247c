"""`hf-kd --help`, a bad command line and a recipe's typo import none of torch, transformers, peft, datasets (the
seconds they take are benchmarks/cli_speed.py's to measure; here, what is imported)."""

import json
import os
import subprocess
import sys

import pytest

import hf_kd
from hf_kd import recipe_training

HEAVY = ("torch", "transformers", "peft", "datasets")
# runs `hf-kd ARGV` in a fresh interpreter, then prints the heavy modules it imported
PROBE = """\
import sys
from hf_kd.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules), "CODE=" + str(code), file=sys.stderr)
"""
BASE = "teacher: {name_or_path: org/teacher}\nstudent: {name_or_path: org/student}\ndata: {dataset: org/data}\n"


def hf_kd_process(argv, cache_dir) -> tuple[list[str], int, str]:
    """(heavy modules imported, exit code, stderr without the probe's line) of `hf-kd ARGV` in a new process."""
    env = {**os.environ, "HF_KD_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *map(str, argv)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = done.stderr.splitlines()
    heavy, code = lines[-1].split(" ")
    return [m for m in heavy[len("HEAVY=") :].split(",") if m], int(code[len("CODE=") :]), "\n".join(lines[:-1])


def test_importing_the_cli_imports_nothing_heavy(tmp_path):
    code = f"import sys, hf_kd.cli; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["check", "--help"], ["trian", "r.yaml"]])
def test_help_and_a_bad_command_import_nothing_heavy(tmp_path, argv):
    heavy, code, err = hf_kd_process(argv, tmp_path)
    assert heavy == [] and code == (2 if argv[0] == "trian" else 0), err


def test_a_typo_imports_nothing_heavy_once_the_names_are_cached(tmp_path):
    cache = tmp_path / "cache"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE + "training: {output_dir: out, learning_rat: 1.0e-5}\npeft: {r: 8}\n")
    expected = f"error: {recipe}: training.learning_rat: unknown key (did you mean 'learning_rate'?)"
    _, code, err = hf_kd_process(["check", recipe], cache)  # a cold cache: the names come from DistillationConfig
    assert (code, err) == (2, expected)
    assert len(list(cache.glob("training-names-*.json"))) == 1
    heavy, code, err = hf_kd_process(["check", recipe], cache)
    assert (heavy, code, err) == ([], 2, expected)

    recipe.write_text(BASE + "training: {output_dir: out}\npeft: {r: 8, lora_alpah: 16}\n")
    hf_kd_process(["train", recipe], cache)  # caches LoraConfig's names
    for argv, message in [
        (["train", recipe], "peft.lora_alpah: unknown key (did you mean 'lora_alpha'?)"),
        (
            ["train", recipe, "--max_stepz", "10"],
            ("--max_stepz: not a DistillationConfig / TrainingArguments field (did you mean --max_steps?)"),
        ),
        (
            ["train", recipe, "--max_samples", "10"],
            (
                "--max_samples: not a DistillationConfig / TrainingArguments "
                "field; it is a recipe key: pass --data.max_samples"
            ),
        ),
        (["check", recipe, "--data.max_sample", "10"], "data.max_sample: unknown key (did you mean 'max_samples'?)"),
        (["check", recipe, "--teacher.dtype", "bf16"], "teacher.dtype: 'bf16' is not one of"),
    ]:
        heavy, code, err = hf_kd_process(argv, cache)
        assert heavy == [] and code == 2 and err.startswith(f"error: {recipe}: {message}"), (argv, err)


def test_the_public_api_is_imported_on_first_use():
    assert set(hf_kd.__all__) == set(hf_kd._PUBLIC) and set(hf_kd.__all__) <= set(dir(hf_kd))
    from hf_kd import DistillationConfig, DistillationTrainer
    from hf_kd.training.trainer import DistillationTrainer as Defined

    assert DistillationTrainer is Defined and DistillationConfig.__name__ == "DistillationConfig"
    for name in hf_kd.__all__:
        assert getattr(hf_kd, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'DistilationTrainer'"):
        hf_kd.DistilationTrainer  # noqa: B018


def test_the_name_cache_follows_the_installed_files(tmp_path, monkeypatch):
    for package in ("transformers", "hf_kd"):
        (tmp_path / package).mkdir()
    for name in ("transformers/__init__.py", "transformers/training_args.py", "hf_kd/config.py"):
        (tmp_path / name).write_text("x = 1\n")
    monkeypatch.setattr(recipe_training, "_package_dir", lambda package: str(tmp_path / package))
    monkeypatch.setenv("HF_KD_CACHE", str(tmp_path / "cache"))
    first = recipe_training._names_file("training")
    os.utime(tmp_path / "hf_kd/config.py", ns=(1, 1))  # config.py edited (or transformers upgraded): new names
    second = recipe_training._names_file("training")
    assert first != second and first.startswith(str(tmp_path / "cache"))

    computed = []
    names = {"fields": ["a"], "flags": ["--a"]}
    monkeypatch.setattr(recipe_training, "_training_names", lambda: computed.append(1) or names)
    os.makedirs(os.path.dirname(first))
    with open(first, "w") as f:
        json.dump({"fields": ["old"], "flags": []}, f)  # another version's names are replaced ...
    recipe_training.known_names.cache_clear()
    try:
        assert recipe_training.known_names("training") == {"fields": ["a"], "flags": ["--a"]} and computed == [1]
        assert os.listdir(tmp_path / "cache") == [os.path.basename(second)]
        recipe_training.known_names.cache_clear()
        assert recipe_training.known_names("training")["fields"] == ["a"] and computed == [1]  # ... and then read
        with open(second, "w") as f:
            f.write("{not json")  # a damaged file is recomputed
        recipe_training.known_names.cache_clear()
        assert recipe_training.known_names("training")["fields"] == ["a"] and computed == [1, 1]
    finally:
        recipe_training.known_names.cache_clear()

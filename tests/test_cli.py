"""`hf-kd train | check` on tiny local models: exit codes, error lines, the output directory's life cycle."""

import importlib.util
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from conftest import SPECIALS, WORDS
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kd.cli import COMPLETE_MARKER, main


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prompt_completion_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(8)]
        rows.append({"prompt": " ".join(words[:3]), "completion": " ".join(words[3:])})
    return rows


def write_recipe(
    path,
    tiny_dir,
    data: dict,
    teacher: str = "teacher",
    student: str = "student",
    teacher_tokenizer: str | None = None,
    teacher_section: dict | list | None = None,
    **training,
) -> str:
    """A tiny recipe at ``path``: ``teacher_section`` (a dict; a list: ``teachers:``) replaces the teacher."""
    teacher_key = "teachers" if isinstance(teacher_section, list) else "teacher"
    recipe = {
        teacher_key: teacher_section
        or {"name_or_path": tiny_dir[teacher], "tokenizer": teacher_tokenizer or tiny_dir["tokenizer"]},
        "student": {"name_or_path": tiny_dir[student], "tokenizer": tiny_dir["tokenizer"]},
        "data": {"format": "prompt_completion", "max_length": 16, **data},
        "training": {
            "output_dir": str(path.parent / "out"),
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "learning_rate": "1e-3",
            "logging_steps": 1,
            "save_strategy": "no",
            "use_cpu": True,
            "report_to": "none",
            "disable_tqdm": True,
            **training,
        },
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    return {
        "train": write_jsonl(root / "train.jsonl", prompt_completion_rows(24)),
        "prompt_only": write_jsonl(root / "prompt_only.jsonl", [{"prompt": "w1 w2", "completion": ""}] * 8),
    }


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, start: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(start), err
    assert "Traceback" not in err
    assert sum(line.startswith("error:") for line in lines) == 1


# ---- bad input: exit 2, one line, no traceback, nothing that looks finished ------------------------------------------


def test_bad_recipe_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "teacher: {name_or_path: org/t}\nstudent: {name_or_path: org/s}\ndata: {dataset: org/d}\n"
        "training: {output_dir: out, learning_rat: 1.0e-5}\n"
    )
    for command in ("train", "check", "cache-teacher"):
        extra = ["--output", tmp_path / "cache"] if command == "cache-teacher" else []
        code, _, err = run([command, path, *extra], capsys)
        assert code == 2
        assert err == f"error: {path}: training.learning_rat: unknown key (did you mean 'learning_rate'?)\n"
    code, _, err = run(["train", path.with_name("missing.yaml")], capsys)
    assert (code, err) == (2, f"error: {path.with_name('missing.yaml')}: recipe: no such file\n")


def test_inputs_that_gave_tracebacks_are_one_line(tmp_path, tiny_dir, capsys):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x00\x01\xff\xfe")
    code, _, err = run(["train", binary], capsys)
    assert (code, err) == (2, f"error: {binary}: recipe: not a text file (a recipe is UTF-8 YAML)\n")
    code, _, err = run(["check", tmp_path], capsys)  # a directory
    assert code == 2 and err.startswith(f"error: {tmp_path}: recipe: is a directory")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": str(empty)})
    code, _, err = run(["train", path], capsys)
    assert code == 2
    assert_one_error_line(err, f"error: {path}: data.dataset: '{empty}' has no examples")
    code, out, _ = run(["check", path], capsys)
    assert code == 1 and f"FAIL data: {empty} has no examples" in out
    if importlib.util.find_spec("wandb") is None:
        path = write_recipe(tmp_path / "w.yaml", tiny_dir, {"dataset": str(empty)}, report_to="wandb")
        code, _, err = run(["train", path], capsys)
        assert (code, err) == (
            2,
            f"error: {path}: training.report_to: wandb is not installed: pip install wandb, or set report_to: none\n",
        )
    if not torch.cuda.is_available():
        path = write_recipe(tmp_path / "b.yaml", tiny_dir, {"dataset": str(empty)}, bf16=True, use_cpu=False)
        code, _, err = run(["train", path], capsys)
        assert code == 2
        assert_one_error_line(err, f"error: {path}: training.bf16: this machine cannot train in bf16")


def test_check_applies_the_data_checks_of_train(tmp_path, tiny_dir, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1 w2"}] * 3)
    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": prompts, "format": "prompt"})
    code, out, _ = run(["check", path], capsys)
    assert code == 1 and "FAIL data: data.format: prompt-only data has no completions to distill on" in out
    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": prompts, "format": "prompt"}, lmbda=1.0)
    code, out, _ = run(["check", path], capsys)
    assert code == 0 and "data: the first 3 examples tokenize to 3 trainable examples, 0 target tokens" in out


def test_python_m_hf_kd_entry_point(tmp_path):
    """The real entry point (`python -m hf_kd`, what `accelerate launch -m hf_kd` runs): exit 2 and one line."""
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "teacher: {name_or_path: org/t}\nstudent: {name_or_path: org/s}\ndata: {dataset: org/d}\n"
        "training: {output_dir: out}\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "hf_kd", "train", str(path), "--max_stepz", "10"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr
        == f"error: {path}: --max_stepz: not a DistillationConfig / TrainingArguments field (did you mean --max_steps?)\n"
    )


def test_bad_data_exits_2_and_writes_nothing(tmp_path, tiny_dir, files, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": files["prompt_only"]})
    code, _, err = run(["train", path], capsys)
    assert code == 2
    assert_one_error_line(err, f"error: {path}: data: no trainable tokens: all 8 examples")
    assert not os.path.exists(tmp_path / "out")


def save_swapped_tokenizer(tmp_path) -> str:
    """The test tokenizer with two ids exchanged: the same strings, other ids for w2 and w3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = SPECIALS + WORDS
    vocab[5], vocab[6] = vocab[6], vocab[5]  # the same strings, two ids exchanged
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = str(tmp_path / "other_tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(other)
    return other


def save_lowercasing_tokenizer(tmp_path) -> str:
    """The test tokenizer's vocabulary (every id the same) with a lowercasing normalizer: "W2" is w2 to it, <unk> to
    the student's. The teacher would read ids the student made of other text: refused."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = str(tmp_path / "lowercasing_tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(other)
    return other


def test_tokenizers_with_one_vocabulary_that_disagree_are_refused(tmp_path, tiny_dir, files, capsys):
    other = save_lowercasing_tokenizer(tmp_path)
    rows = [{"prompt": "w1", "completion": "W2 w3"}] * 4  # W2 is <unk> (2) to the student, w2 (5) to the teacher
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": data}, teacher_tokenizer=other)
    code, _, err = run(["train", path], capsys)
    assert code == 2
    assert_one_error_line(
        err,
        f"error: {path}: tokenizers: the teacher and student tokenizers disagree on sample "
        "example 0 at token 1: the student has id 2 ('<unk>'), the teacher id 5 ('w2')",
    )
    assert not os.path.exists(tmp_path / "out")


def test_tokenizers_with_other_vocabularies_distill_across_tokenizers(tmp_path, tiny_dir, files, capsys):
    """Two ids exchanged: another vocabulary, so `hf-kd check` reports the alignment and `hf-kd train` aligns (every
    token is shared and every target aligns one to one)."""
    other = save_swapped_tokenizer(tmp_path)
    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": files["train"]}, teacher_tokenizer=other)
    code, out, _ = run(["check", path], capsys)
    assert code == 0, out
    assert (
        "tokenizers: different vocabularies -> cross-tokenizer distillation; 40 tokens spelled alike (100.0% of the "
        "student's 40, the teacher has 40)"
    ) in out
    assert "target positions in 24 sample examples, 100.0% align one to one" in out
    assert "shared tokens: 100.0% of the teacher's target tokens" in out
    code, _, err = run(["train", path], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / COMPLETE_MARKER).read_text())
    assert metrics["metrics"]["train"]["train_aligned_fraction"] == pytest.approx(1.0)
    card = (tmp_path / "out" / "README.md").read_text()
    assert (
        f"| teacher tokenizer (cross-tokenizer) | {other} |" in card
        and "| shared vocabulary | 40 tokens (100.0%" in card
    )
    code, _, err = run(["cache-teacher", path, "--output", tmp_path / "cache"], capsys)  # a cache needs one tokenizer
    assert code == 2
    assert_one_error_line(err, f"error: {path}: teacher.tokenizer: a teacher cache needs teacher and student to share")
    assert not os.path.exists(tmp_path / "cache")


@pytest.mark.parametrize("case", ["self_with_init_kwargs", "vocab_too_small"])
def test_a_trainer_setup_error_names_the_recipe_key_it_comes_from(tmp_path, tiny_dir, files, capsys, case):
    path = write_recipe(
        tmp_path / "r.yaml",
        tiny_dir,
        {"dataset": files["train"]},
        teacher="teacher_small" if case == "vocab_too_small" else "teacher",
    )
    recipe = yaml.safe_load(open(path))
    if case == "self_with_init_kwargs":
        recipe["teacher"] = {"name_or_path": "self", "init_kwargs": {"attn_implementation": "eager"}}
        recipe["peft"] = {"r": 4, "lora_alpha": 8}
        recipe["training"]["alpha"] = 0.5
        expected = f"error: {path}: teacher.init_kwargs: does not apply to teacher 'self'"
    else:
        expected = f"error: {path}: teacher.name_or_path: teacher vocab (32) and student vocab (40) differ"
    open(path, "w").write(yaml.safe_dump(recipe, sort_keys=False))
    code, _, err = run(["train", path], capsys)
    assert code == 2
    assert_one_error_line(err, expected)
    assert not os.path.exists(os.path.join(tmp_path / "out", COMPLETE_MARKER))


def test_generation_combinations_that_cannot_work_are_refused(tmp_path, tiny_dir, files, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": files["train"]}, lmbda=0.5)
    recipe = yaml.safe_load(open(path))
    recipe["teacher"]["cache"] = str(tmp_path)  # a cache cannot score the student's samples
    open(path, "w").write(yaml.safe_dump(recipe, sort_keys=False))
    code, _, err = run(["train", path], capsys)
    assert code == 2
    assert_one_error_line(err, f"error: {path}: training.lmbda: a teacher cache cannot score new samples")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1 w2 w3"}] * 4)
    path = write_recipe(tmp_path / "p.yaml", tiny_dir, {"dataset": prompts, "format": "prompt"}, lmbda=0.5)
    code, _, err = run(["train", path], capsys)
    assert code == 2
    assert_one_error_line(err, f"error: {path}: data.format: prompt-only data has no completions to distill on")
    assert not os.path.exists(tmp_path / "out")


def test_on_policy_recipe_on_prompt_only_data_trains(tmp_path, tiny_dir, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"w{i} w{i + 1} w{i + 2}"} for i in range(8)])
    path = write_recipe(
        tmp_path / "p.yaml",
        tiny_dir,
        {"dataset": prompts, "format": "prompt"},
        lmbda=1.0,
        max_new_tokens=4,
        loss_type="reverse_kl",
    )
    code, _, err = run(["train", path], capsys)
    assert code == 0, err
    marker = read_marker(tmp_path / "out")
    assert marker["global_step"] == 2 and marker["resolved_recipe"]["training"]["lmbda"] == 1.0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "lmbda (on-policy fraction) | 1" in card and "max_new_tokens=4" in card


def test_a_nan_teacher_stops_the_run_with_one_line_and_no_marker(tmp_path, tiny_dir, files, capsys):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dir["teacher"])
    with torch.no_grad():
        teacher.lm_head.weight[4, 0] = float("nan")
    teacher.save_pretrained(tmp_path / "nan_teacher")
    path = write_recipe(
        tmp_path / "r.yaml",
        {**tiny_dir, "nan": str(tmp_path / "nan_teacher")},
        {"dataset": files["train"]},
        teacher="nan",
    )
    code, _, err = run(["train", path], capsys)
    assert code == 1
    assert_one_error_line(
        err, f"error: {path}: training stopped: step 1: the teacher ({tmp_path / 'nan_teacher'}) gave NaN"
    )
    assert not os.path.exists(os.path.join(tmp_path / "out", COMPLETE_MARKER))


def test_ctrl_c_says_how_to_resume(tmp_path, tiny_dir, files, capsys, monkeypatch):
    import hf_kd.cli.train

    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": files["train"]})
    os.makedirs(tmp_path / "out" / "checkpoint-2")

    def interrupted(recipe, overwrite=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_kd.cli.train, "run_train", interrupted)
    code, _, err = run(["train", path], capsys)
    assert code == 130 and "Traceback" not in err
    assert err.strip() == (
        f"interrupted: the last checkpoint is {tmp_path / 'out' / 'checkpoint-2'}; resume with: "
        f"hf-kd train {tmp_path / 'out' / 'hf_kd_recipe.yaml'} --resume_from_checkpoint true"
    )


def test_the_printed_resume_command_resumes_the_run_as_started(tmp_path, tiny_dir, files, capsys, monkeypatch):
    """Overrides on the command line (another output_dir, more steps, fewer samples) are part of the run: the resume
    command printed on Ctrl-C reproduces them, from any working directory, and continues from the checkpoint."""
    from hf_kd.training.trainer import DistillationTrainer

    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": files["train"]})  # max_steps 2, no checkpoints
    out = tmp_path / "run 2"  # a space: the printed command quotes it
    steps, interrupt_at = [], [2]
    training_step = DistillationTrainer.training_step

    def counted(self, *args, **kwargs):
        if self.state.global_step in interrupt_at:  # after checkpoint-2 was written: Ctrl-C
            raise KeyboardInterrupt
        steps.append(self.state.global_step)
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "training_step", counted)
    code, _, err = run(
        [
            "train",
            path,
            "--output_dir",
            out,
            "--max_steps",
            "4",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--data.max_samples",
            "16",
            "--hub_token",
            "hf_SECRET",
        ],
        capsys,
    )
    assert code == 130 and steps == [0, 1], err
    saved = (out / "hf_kd_recipe.yaml").read_text()  # output_dir is what push_to_hub uploads: no secret in it
    assert "hf_SECRET" not in saved and "# Left out (secrets): training.hub_token;" in saved
    hint = err.strip().splitlines()[-1]
    assert hint.startswith(f"interrupted: the last checkpoint is {out / 'checkpoint-2'}; resume with: hf-kd train ")
    argv = shlex.split(hint.split("resume with: ", 1)[1])
    assert argv[:2] == ["hf-kd", "train"]

    steps.clear()
    interrupt_at.clear()
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, _, err = run(argv[1:], capsys)
    assert code == 0, err
    assert steps == [2, 3]  # resumed after step 2, up to the command line's max_steps 4
    marker = read_marker(out)
    assert marker["global_step"] == 4 and marker["resolved_recipe"]["data"]["max_samples"] == 16
    assert not os.path.exists(tmp_path / "out")  # the recipe's own output_dir was never used


def test_an_interrupt_line_starts_on_a_line_of_its_own(tmp_path, tiny_dir, files, capsys, monkeypatch):
    """Ctrl-C leaves the training bar open (no on_train_end): the interrupted line must not continue the bar's."""
    from tqdm.auto import tqdm

    import hf_kd.cli.train

    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": files["train"]})

    def interrupted(recipe, overwrite=False):
        bar = tqdm(total=4)
        bar.update(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_kd.cli.train, "run_train", interrupted)
    code, _, err = run(["train", path], capsys)
    assert code == 130
    line = next(line for line in err.split("\n") if "interrupted" in line)
    assert line.startswith("interrupted before the first checkpoint"), repr(line)


def test_output_dir_that_is_a_models_own_directory_is_refused(tmp_path, tiny_dir, files, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": files["train"]}, output_dir=tiny_dir["student"])
    code, _, err = run(["train", path], capsys)
    assert code == 2
    assert_one_error_line(err, f"error: {path}: training.output_dir: {tiny_dir['student']} is the student's own model")


# ---- a full run and the output directory's life cycle ---------------------------------------------------------------


def read_marker(out) -> dict:
    with open(os.path.join(out, COMPLETE_MARKER)) as f:
        return json.load(f)


def test_train_end_to_end_and_output_dir_life_cycle(tmp_path, tiny_dir, files, capsys):
    # evaluation only at the end (eval_strategy no): the card must still show the final eval losses
    path = write_recipe(
        tmp_path / "r.yaml", tiny_dir, {"dataset": files["train"], "eval_size": 4}, save_strategy="steps", save_steps=2
    )
    out = str(tmp_path / "out")
    code, _, err = run(["train", path, "--max_steps", "3"], capsys)
    assert code == 0, err

    marker = read_marker(out)
    assert marker["global_step"] == 3 and marker["resolved_recipe"]["training"]["max_steps"] == 3
    eval_loss = marker["metrics"]["eval"]["eval_loss"]
    student = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("w3") == 6
    original = AutoModelForCausalLM.from_pretrained(tiny_dir["student"])
    assert not torch.equal(student.lm_head.weight, original.lm_head.weight)  # it trained
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    assert "| total (`loss`) | " in card and f"| {eval_loss:.4f} |" in card  # the final evaluation is in the card
    assert "- distillation" in card and "from_pretrained" in card
    assert os.path.isdir(os.path.join(out, "checkpoint-2"))

    # a finished run is never trained over ...
    code, _, err = run(["train", path], capsys)
    assert code == 2
    assert_one_error_line(err, f"error: {path}: training.output_dir: {out} already holds a finished run")
    # ... --overwrite_output_dir with bad data fails before touching it ...
    bad = write_recipe(tmp_path / "bad.yaml", tiny_dir, {"dataset": files["prompt_only"]})
    code, _, err = run(["train", bad, "--overwrite_output_dir"], capsys)
    assert code == 2 and "no trainable tokens" in err
    assert read_marker(out)["global_step"] == 3
    code, _, err = run(["train", path, "--overwrite_output_dir", "--resume_from_checkpoint", "true"], capsys)
    assert code == 2 and "contradict each other" in err

    # an unfinished run (checkpoints, no marker) is refused, then resumed on request
    unfinished = str(tmp_path / "unfinished")
    os.makedirs(unfinished)
    shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(unfinished, "checkpoint-2"))
    code, _, err = run(["train", path, "--output_dir", unfinished], capsys)
    assert code == 2
    assert_one_error_line(
        err,
        f"error: {path}: training.output_dir: {unfinished} holds checkpoints of an unfinished "
        "run (last: checkpoint-2); pass --resume_from_checkpoint true",
    )
    code, _, err = run(
        ["train", path, "--output_dir", unfinished, "--resume_from_checkpoint", "true", "--max_steps", "4"], capsys
    )
    assert code == 0, err
    assert read_marker(unfinished)["global_step"] == 4
    assert read_marker(unfinished)["metrics"]["train"]["train_runtime"] > 0

    # ... and --overwrite_output_dir replaces a finished run
    code, _, err = run(["train", path, "--overwrite_output_dir", "--max_steps", "1", "--save_strategy", "no"], capsys)
    assert code == 0, err
    assert read_marker(out)["global_step"] == 1
    assert not os.path.exists(os.path.join(out, "checkpoint-2"))  # the old run's checkpoints went first


def test_the_last_steps_evaluation_is_not_run_twice(tmp_path, tiny_dir, files, capsys, monkeypatch):
    from hf_kd.training.trainer import DistillationTrainer

    calls, trainers = [], []
    evaluate = DistillationTrainer.evaluate

    def counted(self, *args, **kwargs):
        calls.append(self.state.global_step)
        trainers.append(self)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "evaluate", counted)
    path = write_recipe(
        tmp_path / "r.yaml",
        tiny_dir,
        {"dataset": files["train"], "eval_size": 4},
        eval_strategy="steps",
        eval_steps=2,
        max_steps=4,
    )
    code, out, err = run(["train", path], capsys)
    assert code == 0, err
    assert calls == [2, 4]  # the final metrics are the step-4 evaluation's, not a third one
    marker = read_marker(tmp_path / "out")
    logged = [h for h in trainers[-1].state.log_history if "eval_loss" in h][-1]
    assert marker["metrics"]["eval"]["eval_loss"] == logged["eval_loss"] and logged["step"] == 4
    # the evaluation metrics, teacher agreement included, reach the printed logs
    assert "'eval_top1_agreement'" in out and "'eval_teacher_kl'" in out
    calls.clear()
    code, _, err = run(["train", path, "--eval_steps", "3", "--overwrite_output_dir"], capsys)
    assert code == 0, err
    assert calls == [3, 4]  # the last evaluation was at step 3: the final weights are evaluated once more


def test_a_cpu_run_is_quiet_and_logs_tokens_per_second(tmp_path, tiny_dir, files, capsys):
    """No pin_memory warnings (no accelerator to pin for), no "Writing model shards" bars inside the training bar,
    and the target tokens per second of each logging window and of the run."""
    path = write_recipe(
        tmp_path / "r.yaml",
        tiny_dir,
        {"dataset": files["train"]},
        use_cpu=False,
        max_steps=4,
        logging_steps=2,
        save_strategy="steps",
        save_steps=2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run(["train", path], capsys)
    assert code == 0, err
    if not torch.cuda.is_available():
        assert not [w for w in caught if "pin_memory" in str(w.message)]
    assert "Writing model shards" not in err
    logs = [eval(line) for line in out.splitlines() if line.startswith("{'loss'")]  # PrinterCallback's dicts
    assert len(logs) == 2 and all(float(log["target_tokens_per_second"]) > 0 for log in logs)
    assert read_marker(tmp_path / "out")["metrics"]["train"]["train_target_tokens_per_second"] > 0


def test_a_clean_run_prints_no_deepspeed_line_and_no_future_warning(tmp_path, tiny_dir, files):
    """In a fresh process (the warnings and loggers of a first import): a LoRA run without DeepSpeed prints neither
    DeepSpeed's accelerator line (accelerate imports deepspeed whenever it is installed, and on a machine without a
    GPU it says it found none) nor PEFT's FutureWarning about a renamed transformers property."""
    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": files["train"]}, disable_tqdm=False)
    with open(path) as f:
        recipe = yaml.safe_load(f)
    recipe["peft"] = {"r": 4, "lora_alpha": 8}
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    done = subprocess.run(
        [sys.executable, "-m", "hf_kd", "train", path],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for printed in (done.stderr, done.stdout):  # DeepSpeed's logger writes to stdout
        assert "DeepSpeed" not in printed and "deepspeed" not in printed, printed
        assert "FutureWarning" not in printed, printed
    assert read_marker(tmp_path / "out")["global_step"] == 2


def test_cpu_threads_default_to_one_unless_omp_num_threads_says(monkeypatch):
    from types import SimpleNamespace

    from hf_kd.cli.train import cpu_threads

    before = torch.get_num_threads()
    try:
        cpu, gpu = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(device=torch.device("cuda", 0))
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert cpu_threads(cpu) is None and torch.get_num_threads() == 2  # the user chose
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert cpu_threads(gpu) is None and torch.get_num_threads() == 2  # a GPU run: the CPU only feeds it
        assert cpu_threads(cpu) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_resume_without_checkpoints_is_refused(tmp_path, tiny_dir, files, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": files["train"]})
    code, _, err = run(["train", path, "--resume_from_checkpoint", "true"], capsys)
    assert code == 2
    assert_one_error_line(err, f"error: {path}: training.resume_from_checkpoint: no checkpoint-* in ")


# ---- check ------------------------------------------------------------------------------------------------------------


def test_check_local_recipe(tmp_path, tiny_dir, files, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": files["train"]})
    code, out, _ = run(["check", path], capsys)
    assert code == 0, out
    assert f"recipe {path}: valid" in out
    assert f"teacher {tiny_dir['teacher']}: llama, " in out and "40 vocab rows" in out
    assert "vocab: teacher and student both have 40 rows" in out
    assert "tokenizers: identical vocabularies (40 tokens)" in out
    assert "tokenizers: 24 sample examples" in out and "tokenize identically with both tokenizers" in out
    assert "memory per GPU, rough" in out and "student weights+grads+AdamW (16 B/param)" in out and "total" in out
    assert "not checked" not in out
    assert out.rstrip().splitlines()[-1] == "verdict: ok, no problem found"


def test_check_plans_the_run_from_the_data_sample(tmp_path, tiny_dir, capsys):
    """Truncated examples, and optimizer steps per epoch at the recipe's batch x GA x processes (estimated from the
    sample when the split is larger than it)."""
    rows = [{"prompt": "w1 w2", "completion": " ".join(["w3"] * (4 if i % 3 else 20))} for i in range(300)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)  # every third completion runs past max_length 16
    path = write_recipe(
        tmp_path / "r.yaml",
        tiny_dir,
        {"dataset": data},
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=30,
    )
    code, out, _ = run(["check", path], capsys)
    assert code == 0, out
    assert (
        "data: the first 256 examples tokenize to 256 trainable examples, 2054 target tokens; 86 truncated to "
        "max_length=16 (602 tokens cut)"
    ) in out  # 170 x 5 + 86 x 14 targets; 86 have 2 + 21 tokens: 7 cut from each
    assert (
        "data: estimated from the first 256 of 300 examples: ~300 trainable examples, 38 optimizer steps per epoch "
        "at batch 4 x GA 2 x 1 process = 8; max_steps=30 is 0.79 epochs"
    ) in out
    code, out, _ = run(
        ["check", path, "--data.max_samples", "100", "--data.eval_size", "20", "--max_steps", "-1"], capsys
    )
    assert code == 0, out
    assert (
        "data: estimated from the first 256 of 300 examples, 20 held out for evaluation: ~80 trainable examples, 10 "
        "optimizer steps per epoch at batch 4 x GA 2 x 1 process = 8; num_train_epochs=3 is 30 steps"
    ) in out


def test_check_gives_one_verdict_on_tokenizers_that_disagree(tmp_path, tiny_dir, capsys):
    """Padded vocabularies whose rows would line up, but whose tokenizers give other ids: no "distilling over the
    shared rows" before the FAIL, and a last line that says train would refuse it."""
    other = save_lowercasing_tokenizer(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w1", "completion": "W2 w3"}] * 4)
    path = write_recipe(
        tmp_path / "r.yaml",
        tiny_dir,
        {"dataset": data},
        teacher="teacher_padded",
        student="student_padded",
        teacher_tokenizer=other,
    )
    code, out, _ = run(["check", path], capsys)
    assert code == 1, out
    assert "distilling over the shared" not in out
    assert (
        "vocab: teacher 48 rows, student 44 rows, tokenizer 40 tokens; the tokenizers disagree (below), so the rows "
        "do not mean the same tokens"
    ) in out
    assert "FAIL tokenizers: the teacher and student tokenizers disagree on sample example 0 at token 1" in out
    assert out.rstrip().splitlines()[-1] == "verdict: FAIL: hf-kd train would refuse this recipe (tokenizers)"


def test_check_padded_vocabularies_and_a_vocab_too_small(tmp_path, tiny_dir, files, capsys):
    path = write_recipe(
        tmp_path / "r.yaml", tiny_dir, {"dataset": files["train"]}, teacher="teacher_padded", student="student_padded"
    )
    code, out, _ = run(["check", path], capsys)
    assert code == 0, out
    assert (
        "vocab: teacher 48 rows, student 44 rows, tokenizer 40 tokens -> distilling over the shared first 44 rows"
        in out
    )
    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": files["train"]}, teacher="teacher_small")
    code, out, _ = run(["check", path], capsys)
    assert code == 1
    assert "FAIL vocab: teacher 32 rows, student 40 rows, tokenizer 40 tokens" in out


def test_check_offline_hub_recipe_says_what_it_could_not_check(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "hub.yaml"
    path.write_text(
        "teacher: {name_or_path: hf-kd-test/no-such-teacher}\nstudent: {name_or_path: hf-kd-test/no-such-student}\n"
        "data: {dataset: hf-kd-test/no-such-data}\ntraining: {output_dir: out, bf16: true}\n"
    )
    code, out, err = run(["check", path], capsys)
    gpu = torch.cuda.is_available()  # without one, bf16: true is what train would refuse here
    assert code == (0 if gpu else 1), err
    assert "Traceback" not in err
    unchecked = [line for line in out.splitlines() if line.startswith("not checked: ")]
    assert [line.split(" (")[0] for line in unchecked] == [
        "not checked: teacher config",
        "not checked: student config",
        "not checked: teacher tokenizer",
        "not checked: student tokenizer",
        "not checked: memory estimate: needs both configs",
    ]
    assert "HF_HUB_OFFLINE is set" in unchecked[0]
    assert (
        out.rstrip().splitlines()[-1]
        == (
            "verdict: ok, no problem found"
            if gpu
            else "verdict: FAIL: hf-kd train would refuse this recipe (training.bf16)"
        )
        + "; 5 thing(s) not checked (listed above)"
    )


def test_check_refuses_what_train_refuses_before_loading(tmp_path, tiny_dir, files, capsys):
    """The refusals `hf-kd train` makes before loading a weight are check's FAIL lines (exit 1): an output_dir train
    would not write to, and hardware settings this machine cannot run (with what to change to run them here)."""
    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": files["train"]})
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / COMPLETE_MARKER).write_text("{}")
    code, out, _ = run(["check", path], capsys)
    assert code == 1, out
    assert f"FAIL training.output_dir: {tmp_path / 'out'} already holds a finished run ({COMPLETE_MARKER})" in out
    assert out.rstrip().splitlines()[-1] == "verdict: FAIL: hf-kd train would refuse this recipe (training.output_dir)"
    code, _, err = run(["train", path], capsys)
    assert code == 2 and "training.output_dir: " in err and "already holds a finished run" in err

    unfinished = tmp_path / "unfinished"
    os.makedirs(unfinished / "checkpoint-1")
    code, out, _ = run(["check", path, "--output_dir", unfinished], capsys)
    assert code == 1 and f"FAIL training.output_dir: {unfinished} holds checkpoints of an unfinished run" in out
    code, out, _ = run(["check", path, "--output_dir", unfinished, "--resume_from_checkpoint", "true"], capsys)
    assert code == 0 and out.rstrip().splitlines()[-1] == "verdict: ok, no problem found", out
    code, out, _ = run(["check", path, "--output_dir", tmp_path / "new", "--resume_from_checkpoint", "true"], capsys)
    assert code == 1 and "FAIL training.resume_from_checkpoint: no checkpoint-* in " in out

    if not torch.cuda.is_available():
        code, out, _ = run(
            ["check", path, "--output_dir", tmp_path / "new", "--bf16", "true", "--use_cpu", "false"], capsys
        )
        assert code == 1, out
        assert (
            "FAIL training.bf16: this machine cannot train in bf16 (no GPU with bf16 support); set bf16: false "
            "(--bf16 false); a machine with such a GPU runs it as written"
        ) in out
        assert out.rstrip().splitlines()[-1] == "verdict: FAIL: hf-kd train would refuse this recipe (training.bf16)"
        code, _, err = run(
            ["train", path, "--output_dir", tmp_path / "new", "--bf16", "true", "--use_cpu", "false"], capsys
        )
        assert code == 2 and "training.bf16: this machine cannot train in bf16" in err
    assert not os.path.exists(tmp_path / "new")


def test_check_without_a_network_does_not_wait_for_the_hub(tmp_path, capsys, monkeypatch):
    """No HF_HUB_OFFLINE and no network: one short connection attempt, then only the local cache (no retries)."""
    import socket

    import hf_kd.cli.check

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    attempts = []

    def no_network(address, timeout=None):
        attempts.append((address, timeout))
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    hf_kd.cli.check.hub_reachable.cache_clear()
    try:
        path = tmp_path / "hub.yaml"
        path.write_text(
            "teacher: {name_or_path: hf-kd-test/no-such-teacher}\nstudent: {name_or_path: hf-kd-test/no-"
            "such-student}\ndata: {dataset: hf-kd-test/no-such-data}\ntraining: {output_dir: out}\n"
        )
        code, out, _ = run(["check", path], capsys)
    finally:
        hf_kd.cli.check.hub_reachable.cache_clear()
    assert code == 0, out
    assert attempts == [(("huggingface.co", 443), 2.0)]  # once for the whole check
    unchecked = [line for line in out.splitlines() if line.startswith("not checked: ")]
    assert len(unchecked) == 5 and all(
        "huggingface.co is unreachable (no network? HF_HUB_OFFLINE=1 skips" in line for line in unchecked[:4]
    )


def test_hub_probe_gives_up_after_its_timeout(monkeypatch):
    import socket
    import time
    from types import SimpleNamespace

    import hf_kd.cli.check

    def hanging(*args, **kwargs):  # a DNS lookup that hangs
        time.sleep(5)
        return SimpleNamespace(close=lambda: None)

    monkeypatch.setattr(socket, "create_connection", hanging)
    hf_kd.cli.check.hub_reachable.cache_clear()
    try:
        started = time.perf_counter()
        assert hf_kd.cli.check.hub_reachable(timeout=0.2) is False
        assert time.perf_counter() - started < 2
    finally:
        hf_kd.cli.check.hub_reachable.cache_clear()


# ---- classification (training.task: classification) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory, tiny_dir):
    """A 3-class BERT teacher and a base BERT student without a classifier head (like google/bert_uncased_L-4_H-256_A-4)."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    root = tmp_path_factory.mktemp("bert_cli")

    def config(hidden, **kwargs):
        return BertConfig(
            vocab_size=40,
            hidden_size=hidden,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
            **kwargs,
        )

    torch.manual_seed(0)
    labels = {0: "neg", 1: "neu", 2: "pos"}
    BertForSequenceClassification(
        config(48, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    ).save_pretrained(root / "teacher")
    BertForMaskedLM(config(32)).save_pretrained(root / "student")
    rng = random.Random(0)
    rows = [
        {"sentence": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))), "label": rng.randrange(3)}
        for _ in range(20)
    ]
    return {
        "teacher": str(root / "teacher"),
        "student": str(root / "student"),
        "tokenizer": tiny_dir["tokenizer"],
        "data": write_jsonl(root / "sst.jsonl", rows),
        "root": root,
    }


def write_classification_recipe(path, pair, data: str, **training) -> str:
    recipe = {
        "teacher": {"name_or_path": pair["teacher"], "tokenizer": pair["tokenizer"]},
        "student": {"name_or_path": pair["student"], "tokenizer": pair["tokenizer"]},
        "data": {
            "dataset": data,
            "format": "classification",
            "text_field": "sentence",
            "max_length": 16,
            "eval_size": 4,
        },
        "training": {
            "output_dir": str(path.parent / "out"),
            "task": "classification",
            "temperature": 2.0,
            "alpha": 0.5,
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "learning_rate": "1e-3",
            "loss_chunk_size": 0,
            "use_cpu": True,
            "report_to": "none",
            "disable_tqdm": True,
            **training,
        },
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def test_train_and_check_a_classifier(tmp_path, bert_pair, capsys):
    from transformers import AutoModelForSequenceClassification

    path = write_classification_recipe(tmp_path / "r.yaml", bert_pair, bert_pair["data"])
    code, out, _ = run(["check", path], capsys)
    assert code == 0, out
    assert f"student {bert_pair['student']}: bert, " in out and "3 classes" in out
    assert "labels: 3 classes (neg, neu, pos), taken by the student's classification head from the teacher" in out
    assert "tokenizers: 20 sample examples" in out and "classifier logits and loss (3 classes)" in out

    code, _, err = run(["train", path], capsys)
    assert code == 0, err
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert student.config.id2label == {0: "neg", 1: "neu", 2: "pos"}  # the teacher's classes, in its order
    assert "eval_loss" in read_marker(tmp_path / "out")["metrics"]["eval"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification" in card


def test_a_student_fine_tuned_on_other_classes_gets_the_teachers_head(tmp_path, bert_pair, capsys):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=5,
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path / "student5")
    pair = {**bert_pair, "student": str(tmp_path / "student5")}
    code, _, err = run(["train", write_classification_recipe(tmp_path / "r.yaml", pair, bert_pair["data"])], capsys)
    assert code == 0, err
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert student.config.num_labels == 3 and student.classifier.weight.shape == (3, 32)


@pytest.mark.parametrize(
    "label, problem",
    [(3, "train data has label 3, but the teacher has 3 classes"), (-1, "labels must be class ids 0, 1, ...")],
)
def test_classification_labels_are_checked(tmp_path, bert_pair, capsys, label, problem):
    rows = [{"sentence": "w1 w2", "label": 0}] * 4 + [{"sentence": "w3", "label": label}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    path = write_classification_recipe(tmp_path / "r.yaml", bert_pair, data, eval_strategy="no")
    with open(path) as f:
        recipe = yaml.safe_load(f)
    recipe["data"]["eval_size"] = 0
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    code, _, err = run(["train", path], capsys)
    assert code == 2
    assert_one_error_line(err, f"error: {path}: data.label_field: ")
    assert problem in err
    assert not os.path.exists(tmp_path / "out")


def test_a_directory_without_tokenizer_files_is_refused(tmp_path, tiny_dir, files, capsys):
    """transformers builds an empty tokenizer (special tokens only) from a BERT checkpoint without tokenizer files."""
    from transformers import BertConfig

    BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        tmp_path / "bare"
    )
    path = write_recipe(
        tmp_path / "r.yaml", tiny_dir, {"dataset": files["train"]}, teacher_tokenizer=str(tmp_path / "bare")
    )
    code, _, err = run(["train", path], capsys)
    assert code == 2
    assert_one_error_line(err, f"error: {path}: teacher.tokenizer: {tmp_path / 'bare'} holds no tokenizer files")


def test_the_completion_marker_holds_no_secret(tmp_path, tiny_dir, files, capsys):
    """training_complete.json sits in output_dir, which push_to_hub uploads: a token given to train is not in it."""
    path = write_recipe(tmp_path / "r.yaml", tiny_dir, {"dataset": files["train"]}, max_steps=1)
    code, _, err = run(["train", path, "--hub_token", "hf_SECRET_MARKER"], capsys)
    assert code == 0, err
    marker = (tmp_path / "out" / "training_complete.json").read_text()
    assert "hf_SECRET_MARKER" not in marker and '"max_steps": 1' in marker


@pytest.mark.parametrize("shape", ["prompt_completion", "text", "messages"])
def test_init_writes_a_recipe_that_checks_and_trains(tmp_path, tiny_dir, capsys, monkeypatch, shape):
    """`hf-kd init` from one's own jsonl: the format is read off the first example; check passes; train runs."""
    import shutil

    for role in ("teacher", "student"):  # model directories with their tokenizer, as on the Hub
        shutil.copytree(tiny_dir[role], tmp_path / role)
        for name in os.listdir(tiny_dir["tokenizer"]):
            shutil.copy(os.path.join(tiny_dir["tokenizer"], name), tmp_path / role)
    rows = prompt_completion_rows(24)
    if shape == "text":
        rows = [{"text": f"{r['prompt']} {r['completion']}"} for r in rows]
    if shape == "messages":
        rows = [{"messages": [{"role": "user", "content": r["prompt"]}]} for r in rows]
    data = write_jsonl(tmp_path / "mine.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    argv = ["init", "kd.yaml", "--teacher", "teacher", "--student", "student", "--data", data]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert f"format: {shape}" in (tmp_path / "kd.yaml").read_text()
    assert run(argv, capsys)[0] == 2  # exists: refused without --force
    if shape == "messages":  # the tiny tokenizer has no chat template: check says so, as train would
        return
    code, out, err = run(["check", "kd.yaml"], capsys)
    assert code == 0, out + err
    code, out, err = run(["train", "kd.yaml", "--max_steps", "2", "--eval_strategy", "no"], capsys)
    assert code == 0, err
    assert (tmp_path / "kd_output" / COMPLETE_MARKER).exists()


def test_init_refuses_data_it_cannot_read(tmp_path, capsys):
    data = write_jsonl(tmp_path / "odd.jsonl", [{"question": "w1", "answer": "w2"}])
    code, _, err = run(["init", str(tmp_path / "kd.yaml"), "--teacher", "t", "--student", "s", "--data", data], capsys)
    assert code == 2 and "--data: the first example has keys ['answer', 'question']" in err
    assert not (tmp_path / "kd.yaml").exists()

"""Recipes: every shipped YAML validates offline; every kind of mistake is one line naming the file and the key."""

import re
import warnings
from pathlib import Path

import pytest
from transformers import CONFIG_MAPPING

from hf_kd.recipe.recipe import RecipeError, load_recipe
from hf_kd.recipe.training import RENAMED, _installed_name, parse_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(p.name for p in RECIPES.glob("*.yaml"))

# file -> (teacher, student, model_type of both, loss_type, has a peft section). A new recipe gets a row here.
EXPECTED = {
    "qwen2.5-7b-to-0.5b.yaml": ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2", "forward_kl", False),
    "qwen2.5-7b-to-1.5b-mse.yaml": ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "qwen2", "mse", False),
    "llama-3.1-8b-to-3.2-1b.yaml": (
        "meta-llama/Llama-3.1-8B-Instruct",
        "meta-llama/Llama-3.2-1B-Instruct",
        "llama",
        "forward_kl",
        False,
    ),
    "llama-3.1-8b-to-3.2-3b-lora.yaml": (
        "meta-llama/Llama-3.1-8B-Instruct",
        "meta-llama/Llama-3.2-3B-Instruct",
        "llama",
        "forward_kl",
        True,
    ),
    "qwen3-8b-to-0.6b.yaml": ("Qwen/Qwen3-8B", "Qwen/Qwen3-0.6B", "qwen3", "skew_forward_kl", False),
    "qwen3-8b-to-0.6b-onpolicy.yaml": ("Qwen/Qwen3-8B", "Qwen/Qwen3-0.6B", "qwen3", "reverse_kl", False),
    "llama-3.1-8b-to-qwen2.5-0.5b-cross-tokenizer.yaml": (
        "meta-llama/Llama-3.1-8B-Instruct",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "llama->qwen2",
        "forward_kl",
        False,
    ),
    "gemma-2-9b-to-2b.yaml": ("google/gemma-2-9b-it", "google/gemma-2-2b-it", "gemma2", "forward_kl", False),
    "bert-base-to-small-sst2.yaml": (
        "textattack/bert-base-uncased-SST-2",
        "google/bert_uncased_L-4_H-256_A-4",
        "bert",
        "forward_kl",
        False,
    ),
}
# the model_type a Hub id belongs to, read off its name (no download)
FAMILIES = {
    r"Qwen/Qwen2\.5-": "qwen2",
    r"Qwen/Qwen3-": "qwen3",
    r"meta-llama/Llama-3\.": "llama",
    r"google/gemma-2-": "gemma2",
    r"(textattack/bert-base-uncased|google/bert_uncased)": "bert",
}


def family(model_id: str) -> str:
    return next(kind for pattern, kind in FAMILIES.items() if re.match(pattern, model_id))


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(
        line for line in lines[: next(i for i, line in enumerate(lines) if line and not line.startswith("#"))]
    )


def test_every_shipped_recipe_is_listed():
    assert set(SHIPPED) == set(EXPECTED), "add a row to EXPECTED for a new recipe (and remove it for a deleted one)"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_validates_offline(name):
    recipe = load_recipe(RECIPES / name)
    args = recipe.training_args(check_hardware=False)  # bf16 off on this CPU; the recipe keeps what it asked for
    teacher, student, model_type, loss_type, has_peft = EXPECTED[name]
    assert (recipe.teacher.name_or_path, recipe.student.name_or_path) == (teacher, student)
    if (
        "->" in model_type
    ):  # two families, two tokenizers: the teacher reads its own tokens (hf_kd.teachers.cross_tokenizer.alignment)
        assert f"{family(teacher)}->{family(student)}" == model_type
        assert args.teacher_tokenizer_name_or_path == (recipe.teacher.tokenizer or teacher)
        assert all(kind in CONFIG_MAPPING for kind in model_type.split("->"))
    else:
        assert family(teacher) == family(student) == model_type  # one family: one tokenizer, ids mean the same strings
        assert model_type in CONFIG_MAPPING  # this transformers knows the architecture
    assert args.loss_weights == {loss_type: 1.0}
    assert (recipe.peft is not None) == has_peft
    assert isinstance(args.learning_rate, float) and 0 < args.learning_rate < 1e-3
    assert args.teacher_model_name_or_path == teacher
    assert args.output_dir.startswith("outputs/")
    if args.lmbda == 1:  # on-policy: prompts only (generated completions), nothing teacher-forced to evaluate
        assert recipe.data.format == "prompt" and args.every_batch_generated and args.max_new_tokens >= 256
        assert recipe.data.eval_split is None and args.eval_strategy == "no"
    elif recipe.task == "causal_lm":  # UltraChat: chat format, completion-only
        assert recipe.data.eval_split and args.eval_strategy == "steps"
        assert recipe.data.format == "messages" and recipe.data.completion_only
    else:
        assert recipe.data.eval_split and args.eval_strategy == "steps"
        assert (recipe.task, recipe.data.format, args.task) == ("classification", "classification", "classification")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_uses_no_deprecated_name(name):
    """Building each recipe's config warns about nothing (transformers 5.23 renamed gradient_checkpointing)."""
    recipe = load_recipe(RECIPES / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FutureWarning / DeprecationWarning from TrainingArguments become failures
        args = recipe.training_args(check_hardware=False)
    assert "gradient_checkpointing" not in recipe.training and "gradient_checkpointing_kwargs" not in recipe.training
    if name != "bert-base-to-small-sst2.yaml":
        assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_current_names_map_to_the_old_ones_on_an_older_transformers():
    old_fields = ["gradient_checkpointing", "gradient_checkpointing_kwargs", "max_steps"]  # transformers 5.5.4-5.22
    assert {name: _installed_name(name, old_fields) for name in RENAMED} == RENAMED
    new_fields = [*old_fields, *RENAMED]  # 5.23+: both names exist; the current one is kept
    assert all(_installed_name(name, new_fields) == name for name in RENAMED)
    assert _installed_name("max_steps", old_fields) == "max_steps"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_header_documents_the_launch(name):
    text = header(RECIPES / name)
    assert f"hf-kd check recipes/{name}" in text
    assert f"accelerate launch -m hf_kd train recipes/{name}" in text
    assert "Sized for:" in text and "GiB" in text  # hardware and expected memory


def test_recipe_headers_note_what_is_special_about_the_pair():
    qwen = header(RECIPES / "qwen2.5-7b-to-0.5b.yaml")
    assert "152064" in qwen and "151936" in qwen  # padded vocab sizes differ: the core aligns the shared rows
    gemma = header(RECIPES / "gemma-2-9b-to-2b.yaml")
    assert "softcapping" in gemma
    assert load_recipe(RECIPES / "gemma-2-9b-to-2b.yaml").teacher.init_kwargs == {"attn_implementation": "eager"}
    lora = load_recipe(RECIPES / "llama-3.1-8b-to-3.2-3b-lora.yaml")
    assert lora.peft["r"] == 64 and lora.peft["target_modules"] == "all-linear"
    sst2 = load_recipe(RECIPES / "bert-base-to-small-sst2.yaml")
    assert (sst2.data.dataset, sst2.data.subset, sst2.data.text_field) == ("nyu-mll/glue", "sst2", "sentence")
    assert sst2.data.eval_split == "validation"  # GLUE's test split is unlabeled (-1)


# ---- mistakes ------------------------------------------------------------------------------------------------------

BASE = """\
teacher:
  name_or_path: org/teacher
student:
  name_or_path: org/student
data:
  dataset: org/dataset
training:
  output_dir: out
"""


def write(tmp_path, text: str = BASE, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error(path, overrides=None) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def test_minimal_recipe_and_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path))
    assert recipe.training == {"output_dir": "out"}
    assert recipe.data.format == "text" and recipe.data.max_length == 2048
    assert recipe.training_args(check_hardware=False).loss_type == "forward_kl"


def test_yaml_2e_5_is_coerced_to_a_float(tmp_path):
    text = BASE + "  learning_rate: 2e-5\n  max_steps: 1e3\n  warmup_steps: 0.03\n"
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.training["learning_rate"] == 2e-05 and type(recipe.training["learning_rate"]) is float
    assert recipe.training["max_steps"] == 1000 and type(recipe.training["max_steps"]) is int
    assert recipe.training_args(check_hardware=False).learning_rate == 2e-05
    lora = load_recipe(write(tmp_path, BASE + "peft:\n  r: 8\n  lora_dropout: 5e-2\n"))
    assert lora.peft["lora_dropout"] == 0.05  # the same trap in the peft section


@pytest.mark.parametrize(
    "edit, key, problem",
    [
        ("trainng:\n  max_steps: 1\n", "trainng", "unknown key (did you mean 'training'?)"),
        ("  learning_rat: 1.0e-5\n", "training.learning_rat", "unknown key (did you mean 'learning_rate'?)"),
        ("data:\n  dataset: org/dataset\n  max_lenght: 512\n", "data.max_lenght", "did you mean 'max_length'?"),
        ("peft:\n  r: 8\n  lora_alpah: 16\n", "peft.lora_alpah", "did you mean 'lora_alpha'?"),
        ("  max_steps: ten\n", "training.max_steps", "expected a number, got 'ten'"),
        ("  max_steps: 2.5\n", "training.max_steps", "expected an integer"),
        ("  bf16: maybe\n", "training.bf16", "expected true or false"),
        ("  loss_type: forward_kll\n", "training.loss_type", "unknown loss 'forward_kll'"),
        ("  alpha: 1.5\n", "training.alpha", "alpha must be in [0, 1], got 1.5"),
        ("  temperature: 0\n", "training.temperature", "> 0"),
        ("  lr_scheduler_type: cosinee\n", "training.lr_scheduler_type", "'cosinee' is not one of"),
        ("  eval_strategy: steps\n", "training.eval_strategy", "needs data.eval_split or data.eval_size"),
        ("  teacher_model_name_or_path: org/x\n", "training.teacher_model_name_or_path", "teacher: section"),
        ("data:\n  dataset: ./missing.jsonl\n", "data.dataset", "no such file"),
        (
            "data:\n  dataset: org/dataset\n  format: chat\n",
            "data.format",
            "'chat' is not one of text, prompt_completion",
        ),
        ("data:\n  dataset: org/dataset\n  max_length: 1\n", "data.max_length", "must be >= 2"),
        ("data:\n  dataset: org/dataset\n  eval_size: 1.5\n", "data.eval_size", "fraction"),
        ("teacher:\n  name_or_path: org/teacher\n  dtype: bf16\n", "teacher.dtype", "'bf16' is not one of"),
        ("student:\n  name_or_path: ./no_such_dir\n", "student.name_or_path", "no such directory"),
        (
            "teacher:\n  name_or_path: org/t\n  init_kwargs: {torch_dtype: bfloat16}\n",
            "teacher.init_kwargs.torch_dtype",
            "use teacher.dtype",
        ),
        ("teacher:\n  name_or_path: self\n", "teacher.name_or_path", "needs a peft section"),
        ("peft:\n  r: many\n", "peft.r", "expected a number"),
        ("data: [a, b]\n", "data", "expected a mapping, got list"),
        ("  task: classification\n", "data.format", "set data.format: classification"),
        (
            "data:\n  dataset: org/dataset\n  format: classification\n",
            "training.task",
            "needs training.task: classification",
        ),
        ("  task: token_classification\n", "training.task", "'token_classification' is not available in recipes"),
        ("  task: regression\n", "training.task", "task must be causal_lm, classification or token_classification"),
    ],
)
def test_mistake_is_one_line_naming_file_and_key(tmp_path, edit, key, problem):
    text = BASE
    section = edit.split(":", 1)[0]
    if not edit.startswith(" ") and f"\n{section}:" in "\n" + BASE:  # replace that section of BASE
        text = re.sub(rf"(^|\n){section}:\n(  .*\n)*", r"\1", BASE)
    path = write(tmp_path, text + edit)
    message = error(path)
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message
    assert "\n" not in message


def test_missing_pieces(tmp_path):
    assert error(write(tmp_path, BASE.replace("student:\n  name_or_path: org/student\n", ""))).endswith(
        "student: required section missing"
    )
    assert "training.output_dir: required" in error(write(tmp_path, BASE.replace("  output_dir: out\n", "")))
    assert error(str(tmp_path / "nope.yaml")) == f"{tmp_path / 'nope.yaml'}: recipe: no such file"
    assert ": line 2: invalid YAML" in error(write(tmp_path, "teacher: {name_or_path: org/t\nstudent: x\n"))
    assert error(write(tmp_path, "- a list\n")).endswith(
        "expected a mapping with teacher, student, data and training sections"
    )


def test_local_paths_are_checked(tmp_path, tiny_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "w1"}\n')
    text = (
        f"teacher:\n  name_or_path: {tiny_dir['teacher']}\nstudent:\n  name_or_path: {tiny_dir['student']}\n"
        f"  tokenizer: {tiny_dir['tokenizer']}\ndata:\n  dataset: {data}\n  eval_split: {tmp_path / 'eval.jsonl'}\n"
        "training:\n  output_dir: out\n"
    )
    assert error(write(tmp_path, text)).endswith(f"data.eval_split: no such file: {tmp_path / 'eval.jsonl'}")
    recipe = load_recipe(write(tmp_path, text.replace("  eval_split: ", "  # ")))
    assert recipe.student.tokenizer == tiny_dir["tokenizer"] and recipe.data.dataset == str(data)


def test_overrides(tmp_path):
    path = write(tmp_path, BASE + "  max_steps: 100\n  learning_rate: 2e-5\n")
    recipe = load_recipe(
        path,
        [
            "--max_steps",
            "10",
            "--output_dir",
            "elsewhere",
            "--bf16",
            "--loss_type",
            "forward_kl=0.5,mse=0.5",
            "--learning_rate=1e-4",
        ],
    )
    assert recipe.training == {
        "output_dir": "elsewhere",
        "max_steps": 10,
        "learning_rate": 1e-4,
        "bf16": True,
        "loss_type": "forward_kl=0.5,mse=0.5",
    }
    assert recipe.training_args(check_hardware=False).loss_weights == {"forward_kl": 0.5, "mse": 0.5}
    # --output_dir supplies a recipe that has none
    assert load_recipe(write(tmp_path, BASE.replace("  output_dir: out\n", "")), ["--output_dir", "o"]).training == {
        "output_dir": "o"
    }
    assert parse_overrides(path, ["--bf16", "false", "--seed", "3"]) == {"bf16": False, "seed": 3}


def test_dotted_overrides_reach_every_section(tmp_path):
    path = write(tmp_path, BASE + "  max_steps: 100\n")
    recipe = load_recipe(
        path,
        [
            "--data.max_samples",
            "100",
            "--teacher.dtype",
            "float32",
            "--max_steps",
            "10",
            "--teacher.init_kwargs.attn_implementation",
            "eager",
            "--data.completion_only=false",
            "--training.learning_rate",
            "1e-4",
            "--student.tokenizer",
            "org/tok",
            "--peft.r",
            "16",
            "--peft.target_modules",
            "[q_proj, v_proj]",
        ],
    )
    assert recipe.data.max_samples == 100 and recipe.data.completion_only is False
    assert recipe.teacher.dtype == "float32" and recipe.teacher.init_kwargs == {"attn_implementation": "eager"}
    assert recipe.student.tokenizer == "org/tok"
    assert recipe.training == {"output_dir": "out", "max_steps": 10, "learning_rate": 1e-4}
    assert recipe.peft == {"r": 16, "target_modules": ["q_proj", "v_proj"]}
    resolved = recipe.to_dict()
    assert resolved["data"]["max_samples"] == 100 and resolved["teacher"]["dtype"] == "float32"
    assert recipe.training_args(check_hardware=False).teacher_model_init_kwargs == {
        "attn_implementation": "eager",
        "dtype": "float32",
    }
    assert load_recipe(path, ["--data.eval_split", "null"]).data.eval_split is None


@pytest.mark.parametrize(
    "argv, key, problem",
    [
        (["--max_samples", "100"], "--max_samples", "it is a recipe key: pass --data.max_samples"),
        (["--dtype", "float32"], "--dtype", "pass --teacher.dtype or --student.dtype"),
        (
            ["--dat.max_samples", "100"],
            "--dat.max_samples",
            "'dat' is not a recipe section (did you mean --data.max_samples?)",
        ),
        (["--data.max_sample", "100"], "data.max_sample", "unknown key (did you mean 'max_samples'?)"),
        (["--data.max_samples", "many"], "data.max_samples", "expected a number, got 'many'"),
        (["--data.max_samples"], "--data.max_samples", "expected one argument"),
        (["--data.max_samples", "1", "2"], "2", "unexpected argument"),
        (["--teacher.dtype", "bf16"], "teacher.dtype", "'bf16' is not one of"),
        (["--peft.lora_alpah", "16"], "peft.lora_alpah", "did you mean 'lora_alpha'?"),
    ],
)
def test_bad_dotted_overrides(tmp_path, argv, key, problem):
    path = write(tmp_path)
    message = error(path, argv)
    assert message.startswith(f"{path}: {key}: ") and problem in message, message


def test_whole_numbers_stay_whole_in_the_resolved_recipe(tmp_path):
    """Float fields (logging_steps, eval_steps may be ratios) keep an integer written as one: 5, not 5.0."""
    text = BASE + "  logging_steps: 5\n  eval_steps: 10\n  learning_rate: 2e-5\n  warmup_steps: 0.1\n"
    text += "data:\n  dataset: org/dataset\n  eval_size: 4\n"
    text = text.replace("data:\n  dataset: org/dataset\n", "", 1)
    recipe = load_recipe(write(tmp_path, text), ["--save_steps", "20", "--max_grad_norm=1", "--adam_beta1", "0.5"])
    training = recipe.training
    assert (training["logging_steps"], training["eval_steps"], training["save_steps"], training["max_grad_norm"]) == (
        5,
        10,
        20,
        1,
    )
    assert all(type(training[k]) is int for k in ("logging_steps", "eval_steps", "save_steps", "max_grad_norm"))
    assert (
        type(training["learning_rate"]) is float and training["warmup_steps"] == 0.1 and training["adam_beta1"] == 0.5
    )
    assert recipe.data.eval_size == 4 and type(recipe.data.eval_size) is int
    args = recipe.training_args(check_hardware=False)
    assert (args.logging_steps, args.eval_steps, args.save_steps) == (5, 10, 20)


def test_recipe_file_extensions_match_the_data_loader():
    from hf_kd.data import DATA_EXTENSIONS
    from hf_kd.recipe.recipe import DATA_EXTENSIONS as RECIPE_EXTENSIONS

    assert RECIPE_EXTENSIONS == DATA_EXTENSIONS


@pytest.mark.parametrize(
    "argv, key, problem",
    [
        (
            ["--max_stepz", "10"],
            "--max_stepz",
            "not a DistillationConfig / TrainingArguments field (did you mean --max_steps?)",
        ),
        (["--max_steps", "x"], "--max_steps", "invalid int value: 'x'"),
        (["--max_steps"], "--max_steps", "expected one argument"),
        (["10"], "10", "unexpected argument"),
        (["--alpha", "2"], "training.alpha", "alpha must be in [0, 1]"),
    ],
)
def test_bad_overrides(tmp_path, argv, key, problem):
    path = write(tmp_path)
    message = error(path, argv)
    assert message.startswith(f"{path}: {key}: ") and problem in message, message


def test_classification_recipe(tmp_path):
    text = (
        BASE
        + "  task: classification\n"
        + "data:\n  dataset: org/dataset\n  format: classification\n  text_field: sentence\n"
    )
    text = text.replace("data:\n  dataset: org/dataset\n", "", 1)  # BASE's data section
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.task == "classification" and recipe.data.label_field == "label"
    assert load_recipe(write(tmp_path)).task == "causal_lm"
    packed = text + "  packing: true\n"
    assert "data.packing: a classification example has one label" in error(write(tmp_path, packed))


def test_a_teacher_with_url_and_another_kind_is_refused(tmp_path):
    """A url makes a served teacher: a kind beside it that says otherwise was silently overruled; now it is an error,
    for one teacher and for a member of several. data.teacher_field needs several teachers."""
    from test_cli import write_recipe

    tiny = {"student": str(tmp_path), "tokenizer": str(tmp_path), "teacher": str(tmp_path)}
    data = {"dataset": str(tmp_path / "train.jsonl")}
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    path = write_recipe(tmp_path / "r.yaml", tiny, data, teacher_section={"url": "http://h:1", "kind": "model"})
    with pytest.raises(RecipeError, match="teacher.kind: a url makes a served teacher"):
        load_recipe(path)
    assert load_recipe(write_recipe(tmp_path / "r.yaml", tiny, data, teacher_section={"url": "http://h:1"}))
    members = [{"url": "http://h:1"}, {"url": "http://h:2", "kind": "cache"}]
    with pytest.raises(RecipeError, match="teacher.kind: a url makes a served teacher"):
        load_recipe(write_recipe(tmp_path / "r.yaml", tiny, data, teacher_section=members))
    routed = {**data, "teacher_field": "expert"}
    with pytest.raises(RecipeError, match="data.teacher_field: routes examples between several teachers"):
        load_recipe(write_recipe(tmp_path / "r.yaml", tiny, routed, teacher_section={"url": "http://h:1"}))

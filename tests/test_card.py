"""The distilled student's model card: its content, the card a trained student is saved with, push_to_hub's upload."""

from concurrent.futures import Future
from pathlib import Path

import pytest
from conftest import load_model, variable_length_examples
from datasets import Dataset
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import RepoUrl
from huggingface_hub.utils import filter_repo_objects
from peft import LoraConfig
from safetensors.torch import load_file
from test_trainer import make_args

from hf_kd import DistillationTrainer
from hf_kd.objective.losses import Objective
from hf_kd.teachers.cache.build import build_teacher_cache
from hf_kd.training.card import distillation_card, final_eval_metrics, final_losses

CARD_KW = dict(
    model_name="tiny-kd",
    repo="me/tiny-kd",
    base_model="Qwen/Qwen2.5-0.5B-Instruct",
    teacher="Qwen/Qwen2.5-7B-Instruct",
    objective=Objective(loss_type={"forward_kl": 0.5, "mse": 0.5}, temperature=2.0, alpha=0.9),
    datasets=["org/chat-data", "./local.jsonl"],
    steps=10,
    epochs=1.0,
    target_tokens=12345,
    losses={"loss": 1.0, "distill_loss": 0.5, "ce_loss": 2.0, "eval_distill_loss": 0.25, "eval_ce_loss": 3.0},
)


def test_adapter_card_metadata_objective_losses_and_loading():
    recipe = {"data": {"dataset": "org/chat-data"}, "training": {"learning_rate": 1e-4, "hub_token": "hf_SECRET"}}
    card = distillation_card(kind="adapters", recipe=recipe, tags=["lora"], **CARD_KW)
    text = str(card)
    reloaded = ModelCard(text)  # what the Hub parses
    assert reloaded.data.tags == ["distillation", "hf_kd", "peft", "lora"]
    assert reloaded.data.library_name == "peft" and reloaded.data.pipeline_tag == "text-generation"
    assert reloaded.data.base_model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert reloaded.data.datasets == ["org/chat-data"]  # a local file is named in the text, not in the metadata
    assert "`./local.jsonl`" in text
    assert "| teacher | `Qwen/Qwen2.5-7B-Instruct` |" in text
    assert "| divergence (loss_type) | 0.5 x forward_kl + 0.5 x mse |" in text
    assert "| loss | `0.9 * divergence + 0.1 * cross-entropy` |" in text
    assert "| temperature | 2 |" in text and "| alpha | 0.9 |" in text
    assert "| optimizer steps | 10 (1 epoch) |" in text and "12,345" in text
    assert "| distillation (`distill_loss`) | 0.5000 | 0.2500 |" in text
    assert "| cross-entropy (`ce_loss`) | 2.0000 | 3.0000 |" in text
    assert "| total (`loss`) | 1.0000 | - |" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-kd")' in text
    assert "learning_rate: 0.0001" in text and "hf_SECRET" not in text and "hub_token" not in text


def test_merged_card_loads_with_transformers_and_keeps_a_string_recipe():
    recipe = "# distill 7B -> 0.5B\nteacher:\n  name_or_path: Qwen/Qwen2.5-7B-Instruct\ntraining:\n  hub_token: hf_X\n"
    card = distillation_card(kind="merged", recipe=recipe, **{**CARD_KW, "base_model": "/models/local-student"})
    text = str(card)
    assert card.data.library_name == "transformers" and card.data.tags == ["distillation", "hf_kd"]
    assert card.data.base_model is None and "`/models/local-student`" in text  # a local path is not Hub metadata
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-kd")' in text and "Peft" not in text
    assert "# distill 7B -> 0.5B\nteacher:\n  name_or_path: Qwen/Qwen2.5-7B-Instruct\ntraining:\n```" in text
    assert "hf_X" not in text
    resumed = str(distillation_card(kind="full", **{**CARD_KW, "target_token_steps": 4}))
    assert "| target tokens trained | 12,345 (in the last 4 of the 10 steps: the count restarts on resuming" in resumed
    with pytest.raises(ValueError, match="kind"):
        distillation_card(kind="lora", **CARD_KW)


def test_final_losses_are_the_last_logged_values():
    history = [
        {"loss": 3.0, "distill_loss": 2.0, "ce_loss": 4.0, "step": 1},
        {"eval_loss": 2.5, "eval_distill_loss": 1.5, "eval_agreement": 0.3, "step": 1},
        {"loss": 1.0, "distill_loss": 0.5, "ce_loss": 2.0, "step": 2},
        {"train_loss": 2.0, "train_runtime": 1.0, "step": 2},
    ]
    assert final_losses(history) == {
        "loss": 1.0,
        "distill_loss": 0.5,
        "ce_loss": 2.0,
        "eval_loss": 2.5,
        "eval_distill_loss": 1.5,
        "train_loss": 2.0,
    }


def test_saved_student_carries_a_card_of_its_training(tmp_path, tiny_dir, tokenizer):
    train_rows = variable_length_examples(8, seed=1)
    args = make_args(
        tmp_path,
        max_steps=2,
        loss_type={"forward_kl": 0.5, "mse": 0.5},
        alpha=0.75,
        temperature=2.0,
        eval_strategy="steps",
        eval_steps=2,
    )
    recipe = {"data": {"dataset": "org/tiny-data"}, "training": {"max_steps": 2, "hub_token": "hf_SECRET"}}
    trainer = DistillationTrainer(
        model=load_model(tiny_dir["student"]),
        teacher_model=tiny_dir["teacher"],
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        processing_class=tokenizer,
        eval_dataset=Dataset.from_list(variable_length_examples(4, seed=2)),
        recipe=recipe,
    )
    trainer.train()
    trainer.save_model()
    text = (tmp_path / "out" / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.tags == ["distillation", "hf_kd"] and card.data.datasets == ["org/tiny-data"]
    assert f"| student (base model) | `{tiny_dir['student']}` |" in text
    assert f"| teacher | `{tiny_dir['teacher']}` |" in text
    assert "| optimizer steps | 2 (1 epoch) |" in text
    # 2 steps x 4 examples = all 8; labels[1:] of an example of length n has n - 2 targets (a 2-token prompt)
    tokens = sum(len(r["input_ids"]) - 2 for r in train_rows)
    assert f"| target tokens trained | {tokens:,} (positions with a label, all processes) |" in text
    train = [h for h in trainer.state.log_history if "distill_loss" in h][-1]
    evaluation = [h for h in trainer.state.log_history if "eval_distill_loss" in h][-1]
    for name, key in (("distillation", "distill_loss"), ("cross-entropy", "ce_loss")):
        assert f"| {name} (`{key}`) | {train[key]:.4f} | {evaluation['eval_' + key]:.4f} |" in text
    assert "## Recipe" in text and "org/tiny-data" in text and "hf_SECRET" not in text


def test_a_student_of_a_teacher_with_another_tokenizer_says_so(tmp_path, tiny_dir, tokenizer):
    """The card records cross-tokenizer distillation: the teacher's tokenizer, the shared vocabulary, and how the
    first training examples aligned at setup."""
    from test_cross_tokenizer import permuted_wordlevel

    perm_dir, _ = permuted_wordlevel(tmp_path / "perm_tok", seed=3)
    trainer = DistillationTrainer(
        model=load_model(tiny_dir["student"]),
        teacher_model=tiny_dir["teacher"],
        args=make_args(tmp_path, max_steps=1, teacher_tokenizer_name_or_path=perm_dir),
        train_dataset=Dataset.from_list(variable_length_examples(8, seed=1)),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()
    text = (tmp_path / "out" / "README.md").read_text()
    assert f"| teacher tokenizer (cross-tokenizer) | {perm_dir} |" in text
    assert "| shared vocabulary | 40 tokens (100.0% of the student's) |" in text
    assert (
        "| alignment at setup | of the target positions of the first 8 training examples, 100.0% align one to one, "
        "0.0% in merged spans, the rest with nothing (CE only) |"
    ) in text


def test_push_to_hub_uploads_the_student_and_its_card(tmp_path, tiny_dir, tokenizer, monkeypatch):
    """Everything up to the network: the repo created, the folder and files uploaded, the card they carry."""
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, run_as_future=False, **kwargs):
        folder = Path(folder_path)
        paths = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        files = sorted(filter_repo_objects(paths, ignore_patterns=ignore_patterns))  # what upload_folder would send
        card = folder / "README.md"
        uploads.append(
            {
                "repo_id": repo_id,
                "files": files,
                "card": card.read_text() if card.exists() else None,
                "adapters": sorted(load_file(folder / "adapter_model.safetensors")),
            }
        )
        if run_as_future:  # checkpoint pushes run in the background
            done = Future()
            done.set_result(None)
            return done

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    args = make_args(tmp_path, push_to_hub=True, hub_model_id="me/tiny-kd", save_strategy="steps", save_steps=1)
    trainer = DistillationTrainer(
        model=load_model(tiny_dir["student"]),
        teacher_model=load_model(tiny_dir["teacher"]),
        args=args,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4),
        train_dataset=Dataset.from_list(variable_length_examples(4)),
    )
    trainer.train()
    assert [u["card"] for u in uploads] == [None]  # the checkpoint push (hub_strategy every_save): no card needed
    uploads.clear()
    trainer.save_model()  # with push_to_hub: save, write the card, upload
    assert len(uploads) == 1
    upload = uploads[0]
    assert upload["repo_id"] == "me/tiny-kd"
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(upload["files"])
    assert not any(f.startswith("checkpoint-") or f == "model.safetensors" for f in upload["files"])
    assert upload["adapters"] and all("lora_" in key for key in upload["adapters"])  # no base or teacher weights
    card = ModelCard(upload["card"])
    assert card.data.tags == ["distillation", "hf_kd", "peft", "lora"] and card.data.model_name == "tiny-kd"
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-kd")' in upload["card"]
    assert "| optimizer steps | 1 " in upload["card"]


def test_card_holds_the_final_evaluation_metrics():
    history = [
        {"eval_loss": 2.5, "eval_top1_agreement": 0.1, "step": 1},
        {"loss": 1.0, "step": 2},
        {
            "eval_loss": 2.0,
            "eval_distill_loss": 1.5,
            "eval_top1_agreement": 0.625,
            "eval_teacher_kl": 0.25,
            "eval_student_perplexity": 7.5,
            "eval_runtime": 0.1,
            "eval_samples_per_second": 80.0,
            "epoch": 1.0,
            "step": 2,
        },
        {"train_loss": 2.0, "train_runtime": 1.0, "step": 2},
    ]
    metrics = final_eval_metrics(history)
    assert metrics == {"eval_top1_agreement": 0.625, "eval_teacher_kl": 0.25, "eval_student_perplexity": 7.5}
    text = str(distillation_card(kind="full", eval_metrics=metrics, **CARD_KW))
    assert "## Final evaluation" in text
    assert "| `eval_top1_agreement` | 0.6250 | positions where the student's argmax equals the teacher's |" in text
    assert "| `eval_teacher_kl` | 0.2500 | mean KL(teacher ‖ student) at T = 1, nats per position |" in text
    assert "eval_runtime" not in text and "|| student" not in text  # a bare || would split the table's row
    assert "## Final evaluation" not in str(distillation_card(kind="full", **CARD_KW))  # no evaluation: no table


def test_only_secrets_are_dropped_from_the_recipe():
    recipe = {
        "teacher": {"name_or_path": "org/t", "tokenizer": "org/t-tok", "init_kwargs": {"token": "hf_INIT"}},
        "student": {"name_or_path": "org/s", "tokenizer": "org/s-tok"},
        "data": {"dataset": "org/d", "tokenizer_check_samples": 64, "max_length": 512},
        "training": {
            "hub_token": "hf_HUB",
            "push_to_hub_token": "hf_PUSH",
            "report_to": "wandb",
            "hub_private_repo": True,
        },
        "peft": {"API_KEY": "sk-1"},
    }
    text = str(distillation_card(kind="full", recipe=recipe, **CARD_KW))
    for kept in (
        "tokenizer: org/t-tok",
        "tokenizer: org/s-tok",
        "tokenizer_check_samples: 64",
        "max_length: 512",
        "hub_private_repo: true",
        "report_to: wandb",
    ):
        assert kept in text, kept
    for secret in ("hf_INIT", "hf_HUB", "hf_PUSH", "sk-1", "hub_token", "API_KEY"):
        assert secret not in text, secret
    as_text = "teacher:\n  tokenizer: org/t-tok\n  init_kwargs: {a: 1}\n  token: hf_X\ntraining:\n  hub_token: 'hf_Y'\n"
    text = str(distillation_card(kind="full", recipe=as_text, **CARD_KW))
    assert "tokenizer: org/t-tok" in text and "hf_X" not in text and "hf_Y" not in text


def test_a_student_of_a_teacher_cache_says_so(tmp_path, tiny_dir, tokenizer):
    rows = variable_length_examples(8, seed=3)
    cache = build_teacher_cache(
        load_model(tiny_dir["teacher"]),
        Dataset.from_list(rows),
        str(tmp_path / "cache"),
        k=8,
        tokenizer=tokenizer,
        device="cpu",
        progress=False,
    )
    args = make_args(tmp_path, max_steps=1, teacher_cache=cache.path)
    trainer = DistillationTrainer(
        model=load_model(tiny_dir["student"]),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()
    text = (tmp_path / "out" / "README.md").read_text()
    assert f"| teacher | `{tiny_dir['teacher']}` through a top-8 teacher cache |" in text
    assert (
        f"| teacher outputs | a top-k cache (`hf-kd cache-teacher`, `{cache.path}`): k = 8 of 40 vocab rows, the "
        "teacher's log-probabilities at T = 1; every other token's mass is one tail bucket, so the loss compares "
        "k + 1 buckets, exact at T = 1 and an approximation at other T |"
    ) in text
    live = str(distillation_card(kind="full", **CARD_KW))
    assert "teacher cache" not in live and "teacher outputs" not in live

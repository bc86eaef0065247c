"""The README's and the documentation's Python snippets run as written, with the Hub models swapped for tiny local
ones of the same kind (tests/test_docs.py checks that every other block runs, or says why not)."""

import os
import shutil

import pytest
import torch
from conftest import load_model, variable_length_examples
from test_docs import README, block_with

from hf_kd import DistillationCollator, DistillationConfig, DistillationTrainer


def test_python_in_15_lines(tmp_path, tiny_dir, monkeypatch):
    models = {}
    for role in ("student", "teacher"):  # each directory a model and its tokenizer, as on the Hub
        models[role] = shutil.copytree(tiny_dir[role], tmp_path / role)
        for name in os.listdir(tiny_dir["tokenizer"]):
            shutil.copy(os.path.join(tiny_dir["tokenizer"], name), models[role])
    code = block_with("DistillationTrainer(model=student, teacher_model=")
    code = code.replace('"Qwen/Qwen2.5-0.5B-Instruct"', repr(str(models["student"])))
    code = code.replace('"Qwen/Qwen2.5-7B-Instruct"', repr(str(models["teacher"])))
    monkeypatch.chdir(tmp_path)  # output_dir="student-kd" lands here
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 10
    # 10 steps < logging_steps (500): the end-of-training summary carries the run's means
    assert {"train_loss", "train_distill_loss", "train_ce_loss"} <= set(trainer.state.log_history[-1])
    assert next(trainer.teacher_model.parameters()).dtype == torch.bfloat16  # teacher_model_init_kwargs applied
    assert (tmp_path / "student-kd" / "model.safetensors").exists() and (tmp_path / "student-kd" / "README.md").exists()


def test_extension_point_snippet(tmp_path, tiny_dir):
    def my_hidden_term(student_out, teacher_out):  # a per-position term: 0.5 everywhere
        return torch.full(teacher_out.logits[:, :-1].shape[:2], 0.5)

    namespace = {"DistillationTrainer": DistillationTrainer, "torch": torch, "my_hidden_term": my_hidden_term}
    exec(compile(block_with("class HiddenKD(DistillationTrainer)"), "docs/trainer.md", "exec"), namespace)
    batch = DistillationCollator()(variable_length_examples(3, seed=4))
    student = load_model(tiny_dir["student"])
    losses = {}
    for chunk in (0, 8):  # the override returns plain outputs; the fused path takes them as well
        args = DistillationConfig(output_dir=str(tmp_path), loss_chunk_size=chunk, use_cpu=True, report_to="none")
        trainer = namespace["HiddenKD"](model=student, teacher_model=load_model(tiny_dir["teacher"]), args=args)
        plain = DistillationTrainer(model=student, teacher_model=load_model(tiny_dir["teacher"]), args=args)
        losses[chunk] = trainer.compute_loss(student, batch)
        assert losses[chunk].item() == pytest.approx(plain.compute_loss(student, batch).item() + 0.1 * 0.5, rel=1e-5)
    assert losses[8].item() == pytest.approx(losses[0].item(), rel=1e-5)


def test_generation_engine_override_snippet(tmp_path, tiny_dir, tokenizer):
    class Engine:  # stands in for vLLM: fixed completions, the second one cut by its EOS
        def generate(self, prompts, max_new_tokens):
            return [[5, 6, 1], [7] * max_new_tokens][: len(prompts)]

    namespace = {"DistillationTrainer": DistillationTrainer, "engine": Engine()}
    exec(compile(block_with("class EngineCompletions(DistillationTrainer)"), "docs/on-policy.md", "exec"), namespace)
    args = DistillationConfig(output_dir=str(tmp_path), lmbda=1.0, max_new_tokens=3, use_cpu=True, report_to="none")
    trainer = namespace["EngineCompletions"](
        model=load_model(tiny_dir["student"]),
        processing_class=tokenizer,
        teacher_model=load_model(tiny_dir["teacher"]),
        args=args,
    )
    rows = [
        {"input_ids": [9, 10, 11, 12], "labels": [-100, -100, 11, 12]},
        {"input_ids": [13, 14], "labels": [-100, 14]},
    ]
    batch = trainer.prepare_batch(DistillationCollator()(rows), 0)
    assert batch["input_ids"].tolist() == [[9, 10, 5, 6, 1], [13, 7, 7, 7, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 5, 6, 1], [-100, 7, 7, 7, -100]]


def test_architecture_page_divergence_snippet():
    """docs/architecture.md's divergence runs through the dense loss and equals its definition, computed here."""
    import hf_kd

    code = block_with("class PowerTVD(hf_kd.Divergence)")
    assert code in (README.parent / "docs" / "architecture.md").read_text()
    namespace = {}
    try:
        exec(compile(code, "docs/architecture.md", "exec"), namespace)
        g = torch.Generator().manual_seed(0)
        student, teacher = (
            torch.randn(4, 9, generator=g, dtype=torch.float64),
            torch.randn(4, 9, generator=g, dtype=torch.float64),
        )
        loss = hf_kd.distillation_loss(student, teacher, objective=namespace["objective"])
        expected = 0.5 * (teacher.softmax(-1) - student.softmax(-1)).pow(2).sum(-1).mean()
        assert abs(float(loss - expected)) < 1e-14
    finally:
        hf_kd.DIVERGENCES.pop("power_tvd", None)  # the page's example, not a divergence of the library

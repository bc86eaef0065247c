"""Several teachers routed one per example by the ``teacher_id`` column, and the per-teacher logs."""

from __future__ import annotations

import pytest
import torch
from conftest import load_model, save_tiny_llama, variable_length_examples
from test_trainer import make_args

from hf_kd import DistillationCollator, DistillationTrainer
from hf_kd.errors import SetupError

T = 2.0
LOSS = {"forward_kl": 0.5, "jsd": 0.5}


@pytest.fixture(scope="module")
def teachers(tiny_dir, tmp_path_factory):
    """Three teachers of one vocabulary: the tiny teacher and two others."""
    root = tmp_path_factory.mktemp("routing")
    return [
        tiny_dir["teacher"],
        save_tiny_llama(root / "b", vocab_size=40, seed=11, hidden=24),
        save_tiny_llama(root / "c", vocab_size=40, seed=12, hidden=40),
    ]


def examples(ids):
    rows = variable_length_examples(len(ids), seed=8, max_len=12)
    return [{**row, "teacher_id": i} for row, i in zip(rows, ids)]


def routed(tmp_path, teachers, chunk, names=None, **kwargs):
    specs = [{"name_or_path": path, **({"name": n} if names else {})} for path, n in zip(teachers, names or teachers)]
    return make_args(
        tmp_path,
        loss_type=LOSS,
        temperature=T,
        alpha=0.6,
        loss_chunk_size=chunk,
        teacher_kind="mixture",
        teacher_options={"teachers": specs, "routed": True},
        **kwargs,
    )


def terms_and_grads(trainer, student, batch):
    student.train()  # a training step's logs
    student.zero_grad()
    count = (batch["labels"][:, 1:] != -100).sum()
    trainer.accounting._window.clear()
    loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=count)
    loss.backward()
    logs = {k: float(v) for k, v in trainer.accounting._window.items()}
    return loss.detach(), [p.grad.clone() for p in student.parameters()], logs


@pytest.mark.parametrize("chunk", [0, 8])
def test_every_example_routed_to_teacher_2_is_teacher_2_alone(tmp_path, tiny_dir, teachers, chunk):
    batch = DistillationCollator()(examples([2, 2, 2, 2]))
    student = load_model(tiny_dir["student"])
    alone = make_args(tmp_path, loss_type=LOSS, temperature=T, alpha=0.6, loss_chunk_size=chunk)
    loss_a, grads_a, logs_a = terms_and_grads(
        DistillationTrainer(model=student, teacher_model=teachers[2], args=alone), student, batch
    )
    trainer = DistillationTrainer(model=student, args=routed(tmp_path, teachers, chunk))
    assert trainer.teacher.columns == ("teacher_id",)
    loss_b, grads_b, logs_b = terms_and_grads(trainer, student, batch)
    assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert logs_b["teacher/2/token_share"] == pytest.approx(1.0)
    assert logs_b["teacher/0/token_share"] == logs_b["teacher/1/token_share"] == 0.0
    assert logs_b["teacher/2/divergence"] == pytest.approx(logs_a["distill_loss"], rel=1e-6)


@pytest.mark.parametrize("chunk", [0, 8])
def test_mixed_routing_against_a_per_row_float64_reference(tmp_path, tiny_dir, teachers, chunk):
    """Each example's targets against its own teacher only, by name: the loss, the gradients and the per-teacher
    logs equal a float64 reference built row by row from the three models."""
    names = ["big", "small", "mid"]
    route = [2, 0, 1, 2]
    batch = DistillationCollator()(examples([names[i] for i in route]))
    assert batch["teacher_id"] == ["mid", "big", "small", "mid"]
    student = load_model(tiny_dir["student"])
    trainer = DistillationTrainer(model=student, args=routed(tmp_path, teachers, chunk, names=names))
    loss, grads, logs = terms_and_grads(trainer, student, batch)

    reference = load_model(tiny_dir["student"]).double()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        z = [load_model(path).double()(**inputs).logits[:, :-1] for path in teachers]  # position i predicts i + 1
    s = reference(**inputs).logits[:, :-1]
    keep = batch["labels"][:, 1:] != -100
    labels = batch["labels"][:, 1:]
    count = keep.sum()
    total = divergence_sum = 0
    per_teacher = {}
    for row, member in enumerate(route):  # one row at a time, each against its own teacher
        log_s, log_t = torch.log_softmax(s[row] / T, -1), torch.log_softmax(z[member][row] / T, -1)
        p_s, p_t = log_s.exp(), log_t.exp()
        log_m = torch.log(0.5 * p_t + 0.5 * p_s)
        forward = (p_t * (log_t - log_s)).sum(-1)
        jsd = 0.5 * (p_t * (log_t - log_m)).sum(-1) + 0.5 * (p_s * (log_s - log_m)).sum(-1)
        div = (T**2 * (0.5 * forward + 0.5 * jsd))[keep[row]].sum()
        ce = torch.nn.functional.cross_entropy(s[row][keep[row]], labels[row][keep[row]], reduction="sum")
        total = total + 0.6 * div + 0.4 * ce
        divergence_sum = divergence_sum + div
        name = names[member]
        per_teacher[name] = per_teacher.get(name, 0) + div.detach()
        per_teacher[f"{name} tokens"] = per_teacher.get(f"{name} tokens", 0) + keep[row].sum()
    (total / count).backward()
    assert float(loss) == pytest.approx(float(total / count), rel=1e-5)
    for ours, theirs in zip(grads, (p.grad for p in reference.parameters())):
        assert torch.allclose(ours.double(), theirs, rtol=1e-4, atol=1e-6)
    for name in names:
        share = float(per_teacher[f"{name} tokens"] / count)
        assert logs[f"teacher/{name}/token_share"] == pytest.approx(share, rel=1e-6)
        assert logs[f"teacher/{name}/divergence"] == pytest.approx(float(per_teacher[name] / count), rel=1e-5, abs=1e-7)
    # the accounting turns each sum into the teacher's mean per routed token
    from hf_kd.training.accounting import per_aligned_target

    shown = per_aligned_target(dict(logs))
    assert shown["teacher/big/divergence"] == pytest.approx(
        float(per_teacher["big"] / per_teacher["big tokens"]), rel=1e-5
    )
    unused = per_aligned_target({"teacher/x/divergence": 0.0, "teacher/x/token_share": 0.0})
    assert unused == {"teacher/x/token_share": 0.0}  # no token routed to it in the window: no mean to show


@pytest.mark.parametrize("chunk", [0, 8])
def test_mixed_teachers_log_each_ones_own_divergence(tmp_path, tiny_dir, teachers, chunk):
    """Weights: each member's logged divergence is the student's divergence against that member alone."""
    batch = DistillationCollator()(variable_length_examples(4, seed=8, max_len=12))
    student = load_model(tiny_dir["student"])
    options = {"teachers": [{"name_or_path": p} for p in teachers[:2]], "weights": [1, 3]}
    args = make_args(
        tmp_path, loss_type=LOSS, temperature=T, loss_chunk_size=chunk, teacher_kind="mixture", teacher_options=options
    )
    _, _, logs = terms_and_grads(DistillationTrainer(model=student, args=args), student, batch)
    for index, path in enumerate(teachers[:2]):
        alone = make_args(tmp_path, loss_type=LOSS, temperature=T, loss_chunk_size=chunk)
        _, _, own = terms_and_grads(DistillationTrainer(model=student, teacher_model=path, args=alone), student, batch)
        assert logs[f"teacher/{index}/divergence"] == pytest.approx(own["distill_loss"], rel=1e-5)
        assert f"teacher/{index}/token_share" not in logs


def test_bad_ids_are_refused_naming_the_column(tmp_path, tiny_dir, teachers):
    from datasets import Dataset

    student = load_model(tiny_dir["student"])
    args = routed(tmp_path, teachers[:2], 0, names=["a", "b"])
    for ids, problem in (([0, 5, 1, 0], "5 names no teacher"), (["a", "c", "a", "b"], "'c' names no teacher")):
        data = Dataset.from_list(examples(ids))
        with pytest.raises(SetupError, match=f"teacher_id: {problem}; use an index 0..1 or a member name"):
            DistillationTrainer(model=student, args=args, train_dataset=data)
    without = Dataset.from_list(variable_length_examples(4, seed=8))
    with pytest.raises(SetupError, match="teacher_id: routing between teachers reads each example's teacher_id"):
        DistillationTrainer(model=student, args=args, train_dataset=without)
    trainer = DistillationTrainer(model=student, args=args)  # no dataset to scan: the first batch says it
    with pytest.raises(SetupError, match="teacher_id: -1 names no teacher"):
        trainer.compute_loss(student, DistillationCollator()(examples([0, -1, 1, 0])))
    with pytest.raises(SetupError, match="reads each example's teacher_id column, which the data lacks"):
        trainer.compute_loss(student, DistillationCollator()(variable_length_examples(4, seed=8)))
    with pytest.raises(ValueError, match="one kind per dataset"):
        DistillationCollator()(examples([0, "a", 1, 0]))
    with pytest.raises(SetupError, match="weights or routed: true, not both"):
        DistillationTrainer(
            model=student,
            args=make_args(
                tmp_path,
                teacher_kind="mixture",
                teacher_options={
                    "teachers": [{"name_or_path": p} for p in teachers[:2]],
                    "routed": True,
                    "weights": [1, 1],
                },
            ),
        )


def test_the_column_reaches_the_teacher_and_never_the_forward(tmp_path, tiny_dir, teachers):
    """Trainer.train with remove_unused_columns (the default): the Trainer keeps teacher_id, the collator passes it,
    the student's and the teachers' forward never see it, and the per-teacher logs are written."""
    from datasets import Dataset

    student = load_model(tiny_dir["student"])
    seen = []
    student.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    data = Dataset.from_list(examples([0, 1, 1, 0, 1, 0, 0, 1]))
    trainer = DistillationTrainer(model=student, args=routed(tmp_path, teachers[:2], 8), train_dataset=data)
    routes = []
    run = trainer.teacher.run
    trainer.teacher.run = lambda inputs, *rest: routes.append(inputs["teacher_id"].tolist()) or run(inputs, *rest)
    history = trainer.train() and trainer.state.log_history
    assert routes and all(sorted(r) == [0, 0, 1, 1] for r in routes)
    assert seen and not any("teacher_id" in keys for keys in seen)
    logged = history[0]
    assert {"teacher/0/divergence", "teacher/1/divergence", "teacher/0/token_share"} <= set(logged)
    assert logged["teacher/0/token_share"] + logged["teacher/1/token_share"] == pytest.approx(1.0)


def test_routing_in_a_recipe(tmp_path, tiny_dir, capsys):
    """`teachers:` with names and `data.teacher_field`: trained through the CLI; check and the card name each
    teacher and the routing; an id that names no teacher is exit code 2 with one line."""
    from test_cli import prompt_completion_rows, write_jsonl, write_recipe

    from hf_kd.cli import COMPLETE_MARKER, main

    members = [
        {"name_or_path": tiny_dir["teacher"], "tokenizer": tiny_dir["tokenizer"], "name": "math"},
        {"name_or_path": tiny_dir["teacher"], "tokenizer": tiny_dir["tokenizer"], "name": "code"},
    ]
    rows = [{**row, "expert": ("math", "code")[i % 2]} for i, row in enumerate(prompt_completion_rows(12))]
    data = {"dataset": write_jsonl(tmp_path / "train.jsonl", rows), "teacher_field": "expert"}
    path = write_recipe(tmp_path / "recipe.yaml", tiny_dir, data, teacher_section=members, loss_chunk_size=8)
    assert main(["check", str(path)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "teacher math (1 of 2, routed by data.teacher_field expert)" in out
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / COMPLETE_MARKER).exists()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "routed by teacher_id" in card and "[math]" in card and "[code]" in card
    rows[3]["expert"] = "poetry"
    write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(["train", str(path), "--overwrite_output_dir"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "data.teacher_field: 'poetry' names no teacher" in err[-1]
    members[0]["weight"] = 2
    path = write_recipe(tmp_path / "recipe.yaml", tiny_dir, data, teacher_section=members, loss_chunk_size=8)
    assert main(["train", str(path)]) == 2
    assert "teachers[0].weight: data.teacher_field routes each example to one teacher" in capsys.readouterr().err


def test_on_policy_completions_keep_each_examples_teacher(tmp_path, tiny_dir, teachers):
    """Multi-teacher on-policy distillation: the student's completions replace the batch, each example keeps its
    teacher_id (one completion per example, in order) and is scored by that teacher."""
    rows = examples([1, 0, 1, 1])
    args = routed(tmp_path, teachers[:2], 0, max_new_tokens=4, lmbda=1.0, generation_kwargs={"do_sample": False})
    trainer = DistillationTrainer(model=load_model(tiny_dir["student"]), args=args)
    batch = trainer.prepare_batch(DistillationCollator()(rows), 0)
    assert batch["teacher_id"].tolist() == [1, 0, 1, 1]
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))


@pytest.mark.parametrize("routed", [False, True], ids=["weights", "routed"])
def test_every_per_teacher_key_is_logged_for_a_micro_batch_without_targets(routed):
    """Every process's logs must hold the same keys (they are all-reduced as one vector): a micro-batch whose targets
    are all masked runs no chunk, and still returns each teacher's keys, as 0 (the dense path too)."""
    from hf_kd.models.heads import LMHeadSpec
    from hf_kd.objective.losses import Objective
    from hf_kd.objective.signals import StudentHidden, TeacherHidden
    from hf_kd.teachers.mixing import TeacherMixture

    torch.manual_seed(0)
    heads = [LMHeadSpec(torch.randn(12, 6), None, None, None) for _ in range(3)]
    hidden = [torch.randn(2, 5, 6) for _ in range(3)]
    mixture = TeacherMixture(
        signals=(TeacherHidden(hidden[1], heads[1]), TeacherHidden(hidden[2], heads[2])),
        weights=(0.0, 0.0) if routed else (0.5, 0.5),
        names=("a", "b"),
        route=torch.tensor([0, 1]) if routed else None,
    )
    labels = torch.full((2, 5), -100)
    expected = {"teacher/a/divergence", "teacher/b/divergence"}
    expected |= {"teacher/a/token_share", "teacher/b/token_share"} if routed else set()
    objective = Objective(loss_type="forward_kl", alpha=1.0, temperature=1.0)
    fused = mixture.terms(StudentHidden(hidden[0], heads[0]), labels, objective, chunk_size=4)
    dense = mixture.terms(hidden[0] @ heads[0].weight.T, labels, objective)
    assert expected <= fused.keys() and fused.keys() == dense.keys()
    assert all(float(fused[key]) == 0 for key in expected)

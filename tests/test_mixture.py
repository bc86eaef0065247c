"""Several teachers at once: the per-token mixture of their distributions, on the dense and the fused path."""

from __future__ import annotations

import pytest
import torch
from conftest import load_model, variable_length_examples
from test_trainer import make_args

from hf_kd import DistillationCollator, DistillationTrainer
from hf_kd.errors import SetupError
from hf_kd.teachers import MixtureTeacher

T = 2.0


def loss_and_grads(trainer, student, batch):
    student.zero_grad()
    targets = (batch["labels"][:, 1:] != -100).sum()
    loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=targets)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in student.parameters()]


@pytest.fixture(scope="module")
def batch():
    return DistillationCollator()(variable_length_examples(4, seed=8, max_len=12))


@pytest.mark.parametrize("chunk", [0, 8])
def test_a_teacher_mixed_with_itself_is_that_teacher(tmp_path, tiny_dir, batch, chunk):
    results = []
    for teacher in ("alone", "mixture"):
        student = load_model(tiny_dir["student"])
        kwargs = {"teacher_kind": "mixture", "teacher_options": {"weights": [0.3, 0.7]}} if teacher == "mixture" else {}
        args = make_args(
            tmp_path,
            loss_type={"forward_kl": 0.5, "jsd": 0.5},
            temperature=T,
            alpha=0.6,
            loss_chunk_size=chunk,
            **kwargs,
        )
        source = [tiny_dir["teacher"], tiny_dir["teacher"]] if teacher == "mixture" else tiny_dir["teacher"]
        trainer = DistillationTrainer(model=student, teacher_model=source, args=args)
        results.append(loss_and_grads(trainer, student, batch))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk", [0, 8])
def test_the_mixture_of_two_teachers_against_a_float64_reference(tmp_path, tiny_dir, batch, chunk):
    """T^2 KL(m || p_s), m = 0.25 softmax(z_a / T) + 0.75 softmax(z_b / T): the exact per-token mixture of
    probabilities (not of logits), summed over the targets and divided by their count."""
    student = load_model(tiny_dir["student"])
    other = str(tmp_path / "other")
    from conftest import save_tiny_llama

    save_tiny_llama(other, vocab_size=40, seed=11, hidden=24)
    args = make_args(
        tmp_path,
        loss_type="forward_kl",
        temperature=T,
        loss_chunk_size=chunk,
        teacher_kind="mixture",
        teacher_options={
            "teachers": [{"name_or_path": tiny_dir["teacher"]}, {"name_or_path": other}],
            "weights": [1, 3],
        },
    )
    trainer = DistillationTrainer(model=student, args=args)
    assert isinstance(trainer.teacher, MixtureTeacher) and trainer.teacher.weights == (0.25, 0.75)
    loss, _ = loss_and_grads(trainer, student, batch)
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        z = [load_model(path)(**inputs).logits[:, :-1].double() for path in (tiny_dir["teacher"], other)]
        s = student(**inputs).logits[:, :-1].double()
    m = 0.25 * torch.softmax(z[0] / T, -1) + 0.75 * torch.softmax(z[1] / T, -1)
    per_token = T**2 * (m * (m.log() - torch.log_softmax(s / T, -1))).sum(-1)
    keep = batch["labels"][:, 1:] != -100
    assert float(loss) == pytest.approx(float(per_token[keep].sum() / keep.sum()), rel=1e-5)


def test_weight_zero_leaves_one_teacher_and_refusals(tmp_path, tiny_dir, tokenizer, batch):
    student = load_model(tiny_dir["student"])
    alone = DistillationTrainer(model=student, teacher_model=tiny_dir["teacher"], args=make_args(tmp_path))
    mixed_args = make_args(tmp_path, teacher_kind="mixture", teacher_options={"weights": [1, 0]})
    with pytest.raises(SetupError, match="different vocabularies"):  # a padded teacher distills over a prefix
        DistillationTrainer(
            model=student,
            teacher_model=[tiny_dir["teacher"], tiny_dir["teacher_padded"]],
            args=mixed_args,
            processing_class=tokenizer,
        )
    other = load_model(tiny_dir["teacher"])
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)  # another teacher, weighted 0: it changes nothing
    mixed = DistillationTrainer(model=student, teacher_model=[tiny_dir["teacher"], other], args=mixed_args)
    assert torch.allclose(loss_and_grads(alone, student, batch)[0], loss_and_grads(mixed, student, batch)[0])
    with pytest.raises(SetupError, match="mse compares raw logits"):
        DistillationTrainer(
            model=student,
            teacher_model=[tiny_dir["teacher"]] * 2,
            args=make_args(tmp_path, loss_type="mse", teacher_kind="mixture"),
        )
    with pytest.raises(SetupError, match="two teachers or more"):
        DistillationTrainer(model=student, teacher_model=[tiny_dir["teacher"]], args=mixed_args)


def test_several_teachers_in_a_recipe(tmp_path, tiny_dir, capsys):
    """`teachers:` in a recipe: a weighted mixture, trained through the CLI; the card names every teacher."""
    from test_cli import prompt_completion_rows, write_jsonl, write_recipe

    from hf_kd.cli import COMPLETE_MARKER, main

    members = [
        {"name_or_path": tiny_dir["teacher"], "tokenizer": tiny_dir["tokenizer"], "weight": 2},
        {"name_or_path": tiny_dir["teacher"], "tokenizer": tiny_dir["tokenizer"], "dtype": "float32"},
    ]
    data = {"dataset": write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(12))}
    path = write_recipe(tmp_path / "recipe.yaml", tiny_dir, data, teacher_section=members, loss_chunk_size=8)
    assert main(["check", str(path)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert f"teacher 1 of 2 (weight 0.667): {tiny_dir['teacher']}" in out and "teacher 2 of 2 (weight 0.333)" in out
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / COMPLETE_MARKER).exists()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"{tiny_dir['teacher']} (0.666667) + {tiny_dir['teacher']} (0.333333)" in card
    members[1]["weight"] = -1
    path = write_recipe(tmp_path / "recipe.yaml", tiny_dir, data, teacher_section=members, loss_chunk_size=8)
    assert main(["train", str(path)]) == 2
    assert "teachers[1].weight: must be a number >= 0" in capsys.readouterr().err


def test_every_members_head_decides_the_fused_loss_and_a_served_member_has_no_other_kind(tmp_path, tiny_dir, caplog):
    """A member whose head cannot be fused turns the fused loss off (it was checked for the trainer's one teacher
    only); a member section with both url and another kind is refused, not silently served."""
    student = load_model(tiny_dir["student"])
    odd = load_model(tiny_dir["teacher"])
    odd.config.model_type = "not_a_known_head"  # lm_head_spec cannot vouch for its logits
    args = make_args(tmp_path, loss_chunk_size=8, teacher_kind="mixture")
    trainer = DistillationTrainer(model=student, teacher_model=[tiny_dir["teacher"], odd], args=args)
    assert not trainer.use_fused_loss and "not known to compute logits" in caplog.text
    options = {"teachers": [{"name_or_path": tiny_dir["teacher"]}, {"url": "http://127.0.0.1:1", "kind": "model"}]}
    with pytest.raises(SetupError, match=r"teachers\[1\] has url and kind 'model'"):
        DistillationTrainer(model=student, args=make_args(tmp_path, teacher_kind="mixture", teacher_options=options))

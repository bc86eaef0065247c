"""Faults stop cleanly: a NaN teacher or student, masked (-inf) teacher logits, left padding, inputs that cannot train."""

import math

import pytest
import torch
from conftest import load_model, variable_length_examples
from datasets import Dataset
from test_trainer import make_args, state_hash

from hf_kd import LOSS_TYPES, DistillationCollator, DistillationTrainer, distillation_loss
from hf_kd.training.batch import Batch
from hf_kd.training.faults import NonFiniteError

KW = dict(temperature=2.0, alpha=0.7)


def poisoned(path, row=5):
    model = load_model(path)
    with torch.no_grad():
        model.lm_head.weight[row, 3] = float("nan")
    return model


@pytest.mark.parametrize("chunk", [0, 5], ids=["full_logits", "fused"])
@pytest.mark.parametrize("who", ["teacher", "student"])
def test_a_nan_model_stops_training_before_the_update(tmp_path, tiny_dir, chunk, who):
    student = poisoned(tiny_dir["student"]) if who == "student" else load_model(tiny_dir["student"])
    teacher = poisoned(tiny_dir["teacher"]) if who == "teacher" else load_model(tiny_dir["teacher"])
    before = state_hash(student)
    args = make_args(tmp_path, loss_chunk_size=chunk, max_steps=3, save_strategy="steps", save_steps=1, **KW)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(variable_length_examples(8, seed=2)),
    )
    with pytest.raises(NonFiniteError, match=rf"^step 1: the {who} \(.*\) .*NaN.*no update was applied") as info:
        trainer.train()
    assert "\n" not in str(info.value)
    assert state_hash(student) == before  # the optimizer never applied the NaN step
    assert not (tmp_path / "out" / "checkpoint-1").exists()  # nothing poisoned was saved


def test_a_nan_teacher_stops_evaluation(tmp_path, tiny_dir):
    trainer = DistillationTrainer(
        model=load_model(tiny_dir["student"]),
        teacher_model=poisoned(tiny_dir["teacher"]),
        args=make_args(tmp_path, **KW),
    )
    with pytest.raises(NonFiniteError, match="^evaluation: the teacher"):
        trainer.evaluate(Dataset.from_list(variable_length_examples(4, seed=2)))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_teacher_row_shows_in_the_value(loss_type, bad):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    teacher[2, 4] = bad
    loss = distillation_loss(student, teacher, loss_type=loss_type)
    assert torch.isnan(loss) or torch.isinf(loss)  # not the value of the other rows, silently


def reference(student, teacher, loss_type, temperature):
    """float64, from the definitions, with -inf teacher logits meaning p_t = 0 (README: masked tokens)."""
    s, t = student.double(), teacher.double()
    log_ps, log_pt = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    ps, pt = log_ps.exp(), log_pt.exp()
    t2 = temperature**2
    if loss_type == "forward_kl":
        return t2 * sum((pt[i][pt[i] > 0] * (log_pt[i] - log_ps[i])[pt[i] > 0]).sum() for i in range(len(s))) / len(s)
    if loss_type == "reverse_kl":
        floor = math.log(torch.finfo(torch.float64).tiny)
        return t2 * (ps * (log_ps - log_pt.clamp_min(floor))).sum(-1).mean()
    if loss_type == "mse":
        masked = torch.isinf(t)
        return torch.stack([((s[i] - t[i])[~masked[i]] ** 2).mean() for i in range(len(s))]).mean()
    if loss_type == "tvd":
        return t2 * 0.5 * (pt - ps).abs().sum(-1).mean()
    raise AssertionError(loss_type)


@pytest.mark.parametrize(
    "loss_type", ["forward_kl", "reverse_kl", "mse", "tvd", "jsd", "skew_forward_kl", "skew_reverse_kl"]
)
def test_masked_teacher_logits_have_a_defined_finite_loss(loss_type):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 9, generator=g, dtype=torch.float64)
    teacher[:, 2] = -math.inf  # a token the teacher never produces
    teacher[1, 5] = -math.inf
    loss = distillation_loss(student, teacher, loss_type=loss_type, temperature=1.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    if loss_type in ("forward_kl", "reverse_kl", "mse", "tvd"):
        torch.testing.assert_close(loss, reference(student.detach(), teacher, loss_type, 1.5), rtol=1e-12, atol=1e-12)
    if loss_type == "reverse_kl":  # mass on a masked token is penalized: the gradient pushes it down
        assert (student.grad[:, 2] > 0).all()


def left_padded(batch):
    """The same rows padded on the left (as DataCollatorForLanguageModeling with padding_side='left' does)."""
    out = {key: torch.empty_like(value) for key, value in batch.items()}
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
            out[key][row] = fill
            out[key][row, -n:] = batch[key][row, :n]
    return out


@pytest.mark.parametrize("chunk", [0, 5], ids=["full_logits", "fused"])
def test_left_padding_gives_the_unpadded_loss(tmp_path, tiny_dir, chunk):
    rows = variable_length_examples(4, seed=3, min_len=3, max_len=14)
    for row in rows:
        row["labels"] = list(row["input_ids"])  # every token a label: the one after a left pad must not count
    student = load_model(tiny_dir["student"])
    trainer = DistillationTrainer(
        model=student,
        teacher_model=load_model(tiny_dir["teacher"]),
        args=make_args(tmp_path, loss_chunk_size=chunk, **KW),
    )
    right = DistillationCollator()(rows)
    left = left_padded(right)
    count = lambda batch: Batch.of(batch, trainer.task_spec).count  # noqa: E731 (what get_batch_samples counts)
    assert count(left) == count(right) == sum(len(r["input_ids"]) - 1 for r in rows)
    one_by_one = []
    for row in rows:
        _, distill, _ = distillation_loss(
            student(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1],
            trainer.teacher_model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1],
            torch.tensor(row["labels"][1:]),
            return_components=True,
            **KW,
        )
        one_by_one.append(distill.item() * (len(row["input_ids"]) - 1))
    expected = sum(one_by_one) / (sum(len(r["input_ids"]) for r in rows) - len(rows))
    for batch in (right, left):
        terms = trainer.distillation_terms(
            trainer.student_forward(student, batch), trainer.teacher_forward(batch), trainer.target_labels(batch)
        )
        assert terms["distill_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_inputs_that_cannot_train_are_refused(tmp_path, tiny_dir):
    rows = variable_length_examples(3, seed=1)
    prompt_only = Dataset.from_list([{"input_ids": r["input_ids"], "labels": [-100] * len(r["labels"])} for r in rows])
    with pytest.raises(ValueError, match="^train_dataset: no trainable tokens: all 3 examples"):
        DistillationTrainer(
            model=load_model(tiny_dir["student"]),
            teacher_model=load_model(tiny_dir["teacher"]),
            args=make_args(tmp_path),
            train_dataset=prompt_only,
        )
    with pytest.raises(ValueError, match="^label_smoothing_factor: is not applied by the distillation loss"):
        DistillationTrainer(
            model=load_model(tiny_dir["student"]),
            teacher_model=load_model(tiny_dir["teacher"]),
            args=make_args(tmp_path, label_smoothing_factor=0.1),
        )


def test_an_image_processor_gets_the_default_collator(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    def vit(hidden, seed):
        torch.manual_seed(seed)
        return ViTForImageClassification(
            ViTConfig(
                image_size=8,
                patch_size=4,
                num_channels=3,
                hidden_size=hidden,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=hidden,
                num_labels=4,
            )
        )

    g = torch.Generator().manual_seed(1)
    rows = [{"pixel_values": torch.randn(3, 8, 8, generator=g).tolist(), "labels": i % 4} for i in range(4)]
    trainer = DistillationTrainer(
        model=vit(16, 6),
        teacher_model=vit(32, 5),
        train_dataset=Dataset.from_list(rows),
        processing_class=ViTImageProcessor(size={"height": 8, "width": 8}),
        args=make_args(tmp_path, max_steps=1, **KW),
    )
    trainer.train()  # used to crash in DataCollatorWithPadding(image_processor)
    assert trainer.state.global_step == 1


def test_nan_teacher_with_alpha_0_trains_on_the_ce_and_unlabeled_nan_blames_neither(tmp_path, tiny_dir):
    student = load_model(tiny_dir["student"])
    before = state_hash(student)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=poisoned(tiny_dir["teacher"]),
        args=make_args(tmp_path, alpha=0.0, loss_chunk_size=0),
        train_dataset=Dataset.from_list(variable_length_examples(4, seed=2)),
    )
    trainer.train()  # the divergence is only logged: the CE update is valid
    assert state_hash(student) != before
    from hf_kd.training.faults import FaultGuard

    guard = FaultGuard(lambda t: t, "t", "s")
    guard.record({"loss": torch.tensor(float("nan")), "distill_loss": torch.tensor(float("nan")), "ce_loss": None}, 1.0)
    with pytest.raises(NonFiniteError, match="the teacher t or the student s"):
        guard.check("step 1")


def test_skew_reverse_kl_at_lambda_0_with_a_masked_teacher_is_reverse_kl():
    g = torch.Generator().manual_seed(3)
    student, teacher = (
        torch.randn(4, 7, generator=g, dtype=torch.float64),
        torch.randn(4, 7, generator=g, dtype=torch.float64),
    )
    teacher[:, 1] = -math.inf
    skew = distillation_loss(student, teacher, loss_type="skew_reverse_kl", skew_lambda=0.0)
    torch.testing.assert_close(skew, distillation_loss(student, teacher, loss_type="reverse_kl"), rtol=1e-12, atol=0)


def test_streamed_training_data_trains(tmp_path, tiny_dir):
    rows = variable_length_examples(8, seed=2)
    streamed = Dataset.from_list(rows).to_iterable_dataset()
    trainer = DistillationTrainer(
        model=load_model(tiny_dir["student"]),
        teacher_model=load_model(tiny_dir["teacher"]),
        args=make_args(tmp_path, max_steps=2),
        train_dataset=streamed,
    )
    trainer.train()
    assert trainer.state.global_step == 2

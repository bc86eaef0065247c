"""Token accounting through the trainer: logged components, evaluation and prediction sums, batch rewrites, GA scaling."""

import pytest
import torch
from conftest import load_model, variable_length_examples
from datasets import Dataset
from test_trainer import make_args

from hf_kd import DistillationCollator, DistillationTrainer, distillation_loss
from hf_kd.training.accounting import reduce_sums

KW = dict(loss_type={"forward_kl": 0.6, "reverse_kl": 0.4}, temperature=2.0, alpha=0.7)


def trained(tmp_path, tiny_dir, dataset, trainer_class=DistillationTrainer, resume=None, **overrides):
    args = make_args(tmp_path, **{**KW, "per_device_train_batch_size": 2, "learning_rate": 0.3, **overrides})
    trainer = trainer_class(
        model=load_model(tiny_dir["student"]),
        teacher_model=load_model(tiny_dir["teacher"]),
        args=args,
        train_dataset=dataset,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def train_logs(trainer):
    return {r["step"]: r for r in trainer.state.log_history if "loss" in r}


def test_components_are_window_means_after_resume_and_the_run_mean_at_the_end(tmp_path, tiny_dir):
    data = Dataset.from_list(variable_length_examples(16, seed=21))
    every_step = train_logs(trained(tmp_path / "every", tiny_dir, data, max_steps=5, logging_steps=1))
    windows = trained(
        tmp_path / "windows", tiny_dir, data, max_steps=5, logging_steps=2, save_strategy="steps", save_steps=2
    )
    logs = train_logs(windows)
    for step in (2, 4):  # each window: the mean of its own steps
        expected = (every_step[step - 1]["distill_loss"] + every_step[step]["distill_loss"]) / 2
        assert logs[step]["distill_loss"] == pytest.approx(expected, rel=1e-5)
    # the end of training reports every step of the run, step 5 (after the last log) included
    summary = windows.state.log_history[-1]
    for name in ("distill_loss", "ce_loss"):
        assert summary[f"train_{name}"] == pytest.approx(sum(r[name] for r in every_step.values()) / 5, rel=1e-5)

    # resumed at step 2: the first window (steps 3-4) is divided by its 2 steps, not by global_step 4
    resumed = trained(
        tmp_path / "resumed",
        tiny_dir,
        data,
        max_steps=5,
        logging_steps=2,
        resume=str(tmp_path / "windows" / "out" / "checkpoint-2"),
    )
    assert train_logs(resumed)[4]["distill_loss"] == pytest.approx(logs[4]["distill_loss"], rel=1e-5)
    summary = resumed.state.log_history[-1]
    expected = sum(every_step[s]["distill_loss"] for s in (3, 4, 5)) / 3  # the steps this run trained
    assert summary["train_distill_loss"] == pytest.approx(expected, rel=1e-5)


def by_hand(student, teacher, rows):
    """Token-weighted eval loss and components over ``rows``, example by example (a second code path)."""
    totals = torch.zeros(3, dtype=torch.float64)
    count = 0
    for row in rows:
        one = DistillationCollator()([row])
        with torch.no_grad():
            s, t = student(input_ids=one["input_ids"]).logits, teacher(input_ids=one["input_ids"]).logits
        labels = one["labels"][:, 1:]
        n = int((labels != -100).sum())
        parts = distillation_loss(s[:, :-1], t[:, :-1], labels, return_components=True, **KW)
        totals += torch.tensor([p.item() for p in parts], dtype=torch.float64) * n
        count += n
    return (totals / count).tolist()


@pytest.mark.parametrize("chunk", [0, 5], ids=["full_logits", "fused"])
def test_eval_loss_is_the_token_weighted_objective_and_predict_leaves_nothing(tmp_path, tiny_dir, chunk):
    rows = variable_length_examples(7, seed=5, min_len=3, max_len=14)  # batches of 3, 3, 1: unequal token counts
    student, teacher = load_model(tiny_dir["student"]), load_model(tiny_dir["teacher"])
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, per_device_eval_batch_size=3, loss_chunk_size=chunk, **KW),
    )
    loss, distill, ce = by_hand(student, teacher, rows)
    first = trainer.evaluate(Dataset.from_list(rows))
    assert first["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert first["eval_loss"] == pytest.approx(0.7 * first["eval_distill_loss"] + 0.3 * first["eval_ce_loss"], rel=1e-5)
    assert (first["eval_distill_loss"], first["eval_ce_loss"]) == pytest.approx((distill, ce), rel=1e-5)

    predicted = trainer.predict(Dataset.from_list(rows[:2])).metrics  # another set, reported as test_*
    assert predicted["test_loss"] == pytest.approx(by_hand(student, teacher, rows[:2])[0], rel=1e-5)
    assert "test_distill_loss" in predicted and "test_top1_agreement" in predicted
    trainer.compute_loss(student.eval(), DistillationCollator()(rows[:1]))  # a stray eval-mode call
    again = trainer.evaluate(Dataset.from_list(rows))
    for key in ("eval_loss", "eval_distill_loss", "eval_ce_loss", "eval_top1_agreement", "eval_teacher_kl"):
        assert again[key] == pytest.approx(first[key], rel=1e-9), key


@pytest.mark.parametrize("chunk", [0, 5], ids=["full_logits", "fused"])
def test_compute_metrics_and_predict_get_the_plain_trainers_logits(tmp_path, tiny_dir, chunk):
    rows = variable_length_examples(5, seed=6)
    student = load_model(tiny_dir["student"])
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions)
        return {"rows": float(len(prediction.predictions))}

    trainer = DistillationTrainer(
        model=student,
        teacher_model=load_model(tiny_dir["teacher"]),
        args=make_args(tmp_path, loss_chunk_size=chunk, per_device_eval_batch_size=5),
        compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate(Dataset.from_list(rows))
    batch = DistillationCollator()(rows)
    with torch.no_grad():
        expected = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert metrics["eval_rows"] == 5 and len(seen) == 1
    assert seen[0].shape == tuple(expected.shape)  # [B, S, V], not the fused path's [B, 1, V] (+ hidden states)
    torch.testing.assert_close(torch.as_tensor(seen[0]), expected, rtol=1e-5, atol=1e-5)
    predictions = trainer.predict(Dataset.from_list(rows)).predictions
    torch.testing.assert_close(torch.as_tensor(predictions), expected, rtol=1e-5, atol=1e-5)


class TruncatingTrainer(DistillationTrainer):
    """Rewrites each micro-batch before the loss (as on-policy generation does): only the first 4 targets count."""

    def prepare_batch(self, inputs, index):
        return {**inputs, "labels": truncate(inputs["labels"])}


def truncate(labels, keep=5):
    labels = labels.clone()
    labels[:, keep:] = -100
    return labels


@pytest.mark.parametrize("chunk", [0, 5], ids=["full_logits", "fused"])
def test_a_rewritten_batch_is_counted_as_rewritten(tmp_path, tiny_dir, chunk):
    """Batch 1 x GA 4 with rewritten batches makes the same update as one batch of 4 rewritten by hand."""
    rows = variable_length_examples(4, seed=3, min_len=6, max_len=14)
    rewritten = [{**r, "labels": truncate(torch.tensor([r["labels"]]))[0].tolist()} for r in rows]
    ga = trained(
        tmp_path / "ga",
        tiny_dir,
        Dataset.from_list(rows),
        TruncatingTrainer,
        loss_chunk_size=chunk,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
    )
    whole = trained(
        tmp_path / "whole", tiny_dir, Dataset.from_list(rewritten), loss_chunk_size=chunk, per_device_train_batch_size=4
    )
    assert (
        int(ga.tokens_trained)
        == int(whole.tokens_trained)
        == sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rewritten)
    )
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(ga.model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


class OlderTransformersTrainer(DistillationTrainer):
    """transformers releases before loss_is_scaled_for_ga ignore the attribute, as if it were unset."""

    loss_is_scaled_for_ga = None


def test_gradient_accumulation_is_exact_where_transformers_ignores_loss_is_scaled_for_ga(tmp_path, tiny_dir):
    rows = variable_length_examples(4, seed=3)
    weights = {}
    for name, bs, ga in (("b4ga1", 4, 1), ("b1ga4", 1, 4)):
        student = load_model(tiny_dir["student"])
        student.accepts_loss_kwargs = False  # a student whose forward takes no num_items_in_batch
        args = make_args(tmp_path / name, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, **KW)
        trainer = OlderTransformersTrainer(
            model=student,
            teacher_model=load_model(tiny_dir["teacher"]),
            args=args,
            train_dataset=Dataset.from_list(rows),
        )
        trainer.train()
        weights[name] = student.state_dict()
    for key, value in weights["b4ga1"].items():
        torch.testing.assert_close(weights["b1ga4"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_summed_metrics_keep_their_shapes_whatever_their_names():
    sums = {"a_bin_count": torch.tensor(3.0), "count": torch.tensor([1.0, 2.0]), "kl": torch.tensor([[4.0]])}
    totals = reduce_sums(sums, lambda flat: flat * 2, torch.device("cpu"))  # a 2-process sum of equal halves
    assert totals == {"a_bin_count": 6.0, "count": [2.0, 4.0], "kl": [[8.0]]}


def test_throughput_counts_the_time_spent_preparing_the_batch(tmp_path, tiny_dir):
    """A window's tokens per second is over its whole wall time: a step whose batch takes 0.25 s to prepare (as
    generating completions does, before the step's targets are counted) cannot report more than its tokens / 0.25 s."""
    import time

    class Slow(DistillationTrainer):
        def prepare_batch(self, inputs, index):
            time.sleep(0.25)
            return super().prepare_batch(inputs, index)

    rows = [{"input_ids": [(3 * i + j) % 37 + 3 for j in range(10)]} for i in range(12)]  # 9 targets each
    trainer = Slow(
        model=load_model(tiny_dir["student"]),
        teacher_model=load_model(tiny_dir["teacher"]),
        args=make_args(tmp_path, max_steps=3, logging_steps=1),
        train_dataset=Dataset.from_list(rows),
    )
    trainer.train()
    rates = [log["target_tokens_per_second"] for log in trainer.state.log_history if "target_tokens_per_second" in log]
    assert len(rates) == 3 and all(0 < rate <= 4 * 9 / 0.25 for rate in rates)


def test_a_run_shorter_than_logging_steps_logs_its_window_and_the_card_its_losses(tmp_path, tiny_dir):
    from hf_kd.training.card import final_losses

    rows = [{"input_ids": [(3 * i + j) % 37 + 3 for j in range(10)]} for i in range(12)]
    trainer = DistillationTrainer(
        model=load_model(tiny_dir["student"]),
        teacher_model=load_model(tiny_dir["teacher"]),
        args=make_args(tmp_path, max_steps=3, logging_steps=500, alpha=0.5),
        train_dataset=Dataset.from_list(rows),
    )
    trainer.train()
    step_logs = [log for log in trainer.state.log_history if "loss" in log and "train_runtime" not in log]
    assert [log["step"] for log in step_logs] == [3]  # the final partial window: steps 1-3
    losses = final_losses(trainer.state.log_history)
    assert {"loss", "distill_loss", "ce_loss"} <= set(losses) and all(v > 0 for v in losses.values())

import copy
import math

import pytest
import torch
from conftest import load_model, variable_length_examples
from datasets import Dataset
from test_classification import bert
from test_trainer import make_args
from transformers import BertForSequenceClassification

from hf_kd import DistillationTrainer
from hf_kd.objective.metrics import CALIBRATION_BINS, agreement_sums, finalize_metrics


def reference_metrics(s, t, labels, classification):
    """From the definitions, example by example, in float64."""
    rows = [(s[i].double(), t[i].double(), int(labels[i])) for i in range(len(labels)) if labels[i] != -100]
    n = len(rows)
    agree = sum(int(a.argmax() == b.argmax()) for a, b, _ in rows) / n
    kl = sum(float((b.softmax(-1) * (b.log_softmax(-1) - a.log_softmax(-1))).sum()) for a, b, _ in rows) / n
    out = {"top1_agreement": agree, "teacher_kl": kl}
    for role, idx in (("student", 0), ("teacher", 1)):
        nll = sum(-float(r[idx].log_softmax(-1)[r[2]]) for r in rows) / n
        if not classification:
            out[f"{role}_perplexity"] = math.exp(nll)
            continue
        out[f"{role}_accuracy"] = sum(int(r[idx].argmax() == r[2]) for r in rows) / n
        ece = 0.0
        for b in range(CALIBRATION_BINS):
            lo, hi = b / CALIBRATION_BINS, (b + 1) / CALIBRATION_BINS
            members = [r for r in rows if lo < float(r[idx].softmax(-1).max()) <= hi]
            if members:
                acc = sum(int(r[idx].argmax() == r[2]) for r in members) / len(members)
                conf = sum(float(r[idx].softmax(-1).max()) for r in members) / len(members)
                ece += len(members) / n * abs(acc - conf)
        out[f"{role}_ece"] = ece
    return out


@pytest.mark.parametrize("classification", [False, True])
def test_sums_match_definitions_and_respect_the_mask(classification):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(40, 6, generator=g) * 2, torch.randn(40, 6, generator=g) * 2
    labels = torch.randint(0, 6, (40,), generator=g)
    labels[::3] = -100
    got = finalize_metrics(
        {k: v.tolist() for k, v in agreement_sums(s, t, labels, calibration=classification).items()},
        language_model=not classification,
    )
    expected = reference_metrics(s, t, labels, classification)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    s2 = s.clone()
    s2[labels == -100] = torch.randn(int((labels == -100).sum()), 6) * 50  # masked rows must not matter
    again = agreement_sums(s2, t, labels, calibration=classification)
    assert all(torch.equal(v, agreement_sums(s, t, labels, calibration=classification)[k]) for k, v in again.items())


@pytest.mark.parametrize("chunk", [0, 5])
def test_evaluate_logs_teacher_agreement_for_lms(tmp_path, tiny_dir, chunk):
    student, teacher = load_model(tiny_dir["student"]), load_model(tiny_dir["teacher"])
    rows = variable_length_examples(7, seed=4)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        eval_dataset=Dataset.from_list(rows),
        args=make_args(tmp_path, loss_chunk_size=chunk, per_device_eval_batch_size=3),
    )
    metrics = trainer.evaluate()
    s_all, t_all, l_all = [], [], []
    for r in rows:
        ids = torch.tensor([r["input_ids"]])
        with torch.no_grad():
            s_all.append(student(input_ids=ids).logits[0, :-1])
            t_all.append(teacher(input_ids=ids).logits[0, :-1])
        l_all.append(torch.tensor(r["labels"][1:]))
    expected = reference_metrics(torch.cat(s_all), torch.cat(t_all), torch.cat(l_all), classification=False)
    for key, value in expected.items():
        assert metrics[f"eval_{key}"] == pytest.approx(value, rel=1e-4), key
    assert metrics["eval_student_perplexity"] == pytest.approx(math.exp(metrics["eval_ce_loss"]), rel=1e-4)


def test_copy_of_the_teacher_agrees_perfectly(tmp_path, tiny_dir):
    teacher = load_model(tiny_dir["teacher"])
    trainer = DistillationTrainer(
        model=copy.deepcopy(teacher),
        teacher_model=teacher,
        args=make_args(tmp_path),
        eval_dataset=Dataset.from_list(variable_length_examples(5)),
    )
    metrics = trainer.evaluate()
    assert metrics["eval_top1_agreement"] == 1.0
    assert metrics["eval_teacher_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval_student_perplexity"] == pytest.approx(metrics["eval_teacher_perplexity"], rel=1e-6)


def test_classifier_metrics_include_accuracy_and_ece(tmp_path):
    teacher = bert(BertForSequenceClassification, 48, seed=1)
    student = bert(BertForSequenceClassification, 32, seed=2)
    g = torch.Generator().manual_seed(2)
    rows = [
        {
            "input_ids": torch.randint(3, 40, (6,), generator=g).tolist(),
            "attention_mask": [1] * 6,
            "labels": int(torch.randint(0, 3, (1,), generator=g)),
        }
        for _ in range(10)
    ]
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path), eval_dataset=Dataset.from_list(rows)
    )
    metrics = trainer.evaluate()
    ids = torch.tensor([r["input_ids"] for r in rows])
    with torch.no_grad():
        s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    expected = reference_metrics(s, t, torch.tensor([r["labels"] for r in rows]), classification=True)
    for key, value in expected.items():
        assert metrics[f"eval_{key}"] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    same = DistillationTrainer(
        model=copy.deepcopy(teacher),
        teacher_model=teacher,
        args=make_args(tmp_path / "c"),
        eval_dataset=Dataset.from_list(rows),
    ).evaluate()
    assert same["eval_top1_agreement"] == 1.0 and same["eval_student_ece"] == pytest.approx(same["eval_teacher_ece"])

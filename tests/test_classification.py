"""Per-example and per-token logits: no causal shift, same loss and knobs."""

import pytest
import torch
from conftest import save_tokenizer
from datasets import Dataset
from test_trainer import make_args
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    ViTConfig,
    ViTForImageClassification,
)

from hf_kd import DistillationTrainer, distillation_loss

KW = dict(loss_type="forward_kl", temperature=3.0, alpha=0.6)


def bert(cls, hidden, seed, num_labels=3):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return cls(config)


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    bert(BertForSequenceClassification, 48, seed=1).save_pretrained(root / "teacher")
    bert(BertForSequenceClassification, 32, seed=2).save_pretrained(root / "student")
    return root, AutoTokenizer.from_pretrained(save_tokenizer(root / "tok"))


def texts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = [f"w{i}" for i in range(37)]
    rows = []
    for _ in range(n):
        length = int(torch.randint(2, 9, (1,), generator=g))
        rows.append(
            {
                "text": " ".join(words[int(i)] for i in torch.randint(0, 37, (length,), generator=g)),
                "label": int(torch.randint(0, 3, (1,), generator=g)),
            }
        )
    return rows


def test_sequence_classification_loss_by_hand(tmp_path, saved_pair):
    root, tok = saved_pair
    student = BertForSequenceClassification.from_pretrained(root / "student")
    args = make_args(tmp_path, teacher_model_name_or_path=str(root / "teacher"), **KW)
    trainer = DistillationTrainer(model=student, args=args, processing_class=tok)
    assert trainer.task == "classification" and not trainer.use_fused_loss
    assert type(trainer.teacher_model).__name__ == "BertForSequenceClassification"  # loaded with the student's task
    rows = texts(5)
    batch = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    batch["labels"] = torch.tensor([r["label"] for r in rows])
    ours = trainer.compute_loss(student, dict(batch))
    s = student(**{k: v for k, v in batch.items() if k != "labels"}).logits  # [5, 3]
    with torch.no_grad():
        t = trainer.teacher_model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    # float64 reference from the definition: alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE, mean over examples
    s64, t64, T = s.double(), t.double(), 3.0
    p_t = torch.softmax(t64 / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s64 / T, -1))).sum(-1)
    ce = -torch.log_softmax(s64, -1)[torch.arange(5), batch["labels"]]
    expected = (0.6 * T**2 * kl + 0.4 * ce).mean()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


def test_sequence_classification_trains_with_and_without_labels(tmp_path, saved_pair):
    root, tok = saved_pair
    rows = texts(8, seed=1)
    labeled = Dataset.from_list(rows).map(lambda ex: tok(ex["text"]), remove_columns=["text"])
    for name, data, alpha in (("labeled", labeled, 0.5), ("unlabeled", labeled.remove_columns("label"), 1.0)):
        student = BertForSequenceClassification.from_pretrained(root / "student")
        before = student.classifier.weight.clone()
        args = make_args(
            tmp_path / name, max_steps=2, learning_rate=0.5, alpha=alpha, temperature=2.0, per_device_train_batch_size=4
        )
        trainer = DistillationTrainer(
            model=student, teacher_model=str(root / "teacher"), args=args, train_dataset=data, processing_class=tok
        )
        trainer.train()
        logs = [r for r in trainer.state.log_history if "loss" in r]
        assert len(logs) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
        assert not torch.equal(before, student.classifier.weight)
        assert ("ce_loss" in logs[0]) == (name == "labeled")


def test_token_classification_is_not_shifted(tmp_path):
    teacher = bert(BertForTokenClassification, 48, seed=3, num_labels=5)
    student = bert(BertForTokenClassification, 32, seed=4, num_labels=5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, **KW))
    assert trainer.task == "token_classification"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (2, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    labels = torch.randint(0, 5, (2, 6), generator=g).masked_fill(mask == 0, -100)
    labels[0, 0] = -100  # e.g. [CLS]
    ours = trainer.compute_loss(student, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    s = student(input_ids=ids, attention_mask=mask).logits
    t = teacher(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, distillation_loss(s, t, labels, **KW))  # same positions, no shift
    shifted = distillation_loss(s[:, :-1], t[:, :-1], labels[:, 1:], **KW)
    assert not torch.allclose(ours, shifted)


def test_image_classifier(tmp_path):
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

    teacher, student = vit(32, 5), vit(16, 6)
    teacher.save_pretrained(tmp_path / "vit_teacher")  # by path: loaded as the ViTForImageClassification it was
    g = torch.Generator().manual_seed(1)
    rows = [{"pixel_values": torch.randn(3, 8, 8, generator=g).tolist(), "labels": i % 4} for i in range(8)]
    trainer = DistillationTrainer(
        model=student,
        teacher_model=str(tmp_path / "vit_teacher"),
        train_dataset=Dataset.from_list(rows),
        args=make_args(tmp_path, max_steps=2, **KW),
    )
    assert type(trainer.teacher_model).__name__ == "ViTForImageClassification"
    assert trainer.task == "classification"
    batch = trainer.data_collator(rows[:4])
    ours = trainer.compute_loss(student, batch)
    expected = distillation_loss(
        student(pixel_values=batch["pixel_values"]).logits,
        teacher(pixel_values=batch["pixel_values"]).logits,
        batch["labels"],
        **KW,
    )
    torch.testing.assert_close(ours, expected)
    trainer.train()


def test_label_sets_must_match(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        DistillationTrainer(
            model=bert(BertForSequenceClassification, 32, 1, num_labels=3),
            teacher_model=bert(BertForSequenceClassification, 32, 2, num_labels=4),
            args=make_args(tmp_path),
        )


def test_a_classifier_builds_without_a_fused_loss_warning(tmp_path, saved_pair, caplog):
    """The default loss_chunk_size is a causal-LM knob: a classifier takes full logits without a warning about it."""
    import logging

    root, tokenizer = saved_pair
    student = BertForSequenceClassification.from_pretrained(root / "student")
    with caplog.at_level(logging.WARNING, logger="hf_kd"):
        trainer = DistillationTrainer(
            model=student,
            teacher_model=str(root / "teacher"),
            processing_class=tokenizer,
            args=make_args(tmp_path, **KW),
        )
    assert trainer.args.loss_chunk_size and not trainer.use_fused_loss
    assert not [r for r in caplog.records if "loss_chunk_size" in r.getMessage()]

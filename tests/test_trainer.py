import hashlib

import pytest
import torch
from conftest import load_model, variable_length_examples
from datasets import Dataset
from safetensors.torch import load_file

from hf_kd import DistillationCollator, DistillationConfig, DistillationTrainer, distillation_loss


def make_args(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping: the hand-computed update below does not clip either
        weight_decay=0.0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    base.update(overrides)
    return DistillationConfig(**base)


def state_hash(model):
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def hand_sgd_step(student, teacher, batch, lr, **loss_kwargs):
    """One SGD step on the whole padded batch at once: a second code path for the trainer's update."""
    student = student.train()
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # logits at position i predict token i + 1
    loss = distillation_loss(s_logits[:, :-1], t_logits[:, :-1], batch["labels"][:, 1:], **loss_kwargs)
    loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            p -= lr * p.grad
    return loss.item()


LOSS_KW = dict(loss_type={"forward_kl": 0.6, "reverse_kl": 0.4}, temperature=2.0, alpha=0.7)


@pytest.fixture(scope="module")
def four_examples():
    rows = variable_length_examples(4, seed=3, min_len=3, max_len=14)
    assert len({len(r["input_ids"]) for r in rows}) > 2  # genuinely variable length
    return rows


@pytest.mark.parametrize("chunk", [0, 5], ids=["full_logits", "fused"])
def test_gradient_accumulation_is_exact(tmp_path, tiny_dir, four_examples, chunk):
    ds = Dataset.from_list(four_examples)
    weights = {}
    for name, bs, ga in (("b4ga1", 4, 1), ("b1ga4", 1, 4), ("b2ga2", 2, 2)):
        student = load_model(tiny_dir["student"])
        args = make_args(
            tmp_path / name,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            loss_chunk_size=chunk,
            **LOSS_KW,
        )
        trainer = DistillationTrainer(
            model=student, teacher_model=load_model(tiny_dir["teacher"]), args=args, train_dataset=ds
        )
        assert trainer.use_fused_loss == bool(chunk)
        trainer.train()
        weights[name] = {k: v.clone() for k, v in student.state_dict().items()}
        weights[name + "_loss"] = trainer.state.log_history[0]["loss"]

    # independent path: the whole batch in one forward, loss by distillation_loss, SGD by hand
    reference = load_model(tiny_dir["student"])
    batch = DistillationCollator()(four_examples)
    ref_loss = hand_sgd_step(reference, load_model(tiny_dir["teacher"]), batch, lr=0.5, **LOSS_KW)
    initial = load_model(tiny_dir["student"]).state_dict()
    for name in ("b4ga1", "b1ga4", "b2ga2"):
        assert weights[name + "_loss"] == pytest.approx(ref_loss, rel=1e-5)
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(weights[name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")

    # the test can fail: the common per-micro-batch mean (mean of 4 per-example means) gives another update
    naive = load_model(tiny_dir["student"])
    teacher = load_model(tiny_dir["teacher"])
    for row in four_examples:
        one = DistillationCollator()([row])
        s = naive(input_ids=one["input_ids"]).logits
        with torch.no_grad():
            t = teacher(input_ids=one["input_ids"]).logits
        (distillation_loss(s[:, :-1], t[:, :-1], one["labels"][:, 1:], **LOSS_KW) / 4).backward()
    key = "model.embed_tokens.weight"
    naive_step = initial[key] - 0.5 * dict(naive.named_parameters())[key].grad
    assert not torch.allclose(naive_step, reference.state_dict()[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 4, 1024])
def test_compute_loss_masks_like_the_model_cross_entropy(tmp_path, tiny_dir, four_examples, chunk):
    """alpha=0 leaves only the CE: it must equal the model's own shifted, masked cross-entropy."""
    student = load_model(tiny_dir["student"])
    trainer = DistillationTrainer(
        model=student,
        teacher_model=load_model(tiny_dir["teacher"]),
        args=make_args(tmp_path, alpha=0.0, loss_chunk_size=chunk),
    )
    batch = DistillationCollator()(four_examples)
    ours = trainer.compute_loss(student, batch)
    reference = student(**batch).loss  # transformers' ForCausalLMLoss: shift + ignore -100
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def test_teacher_frozen_unchanged_and_not_saved(tmp_path, tiny_dir):
    teacher = load_model(tiny_dir["teacher"])
    before = state_hash(teacher)
    args = make_args(tmp_path, max_steps=3, learning_rate=1e-2, optim="adamw_torch", max_grad_norm=1.0)
    student = load_model(tiny_dir["student"])
    student_before = state_hash(student)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(variable_length_examples(12))
    )
    teacher.train()  # e.g. a user callback toggled it: the trainer must switch it back to eval every step
    trainer.train()
    assert state_hash(teacher) == before
    assert state_hash(student) != student_before  # the student did train
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    trainer.save_model()
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert set(saved) == set(student.state_dict())  # no teacher tensors in the checkpoint
    assert saved["model.embed_tokens.weight"].shape[1] == 32  # the student's hidden size, not the teacher's 48


def test_teacher_from_path_with_init_kwargs(tmp_path, tiny_dir):
    args = make_args(
        tmp_path, teacher_model_name_or_path=tiny_dir["teacher"], teacher_model_init_kwargs={"dtype": "float64"}
    )
    trainer = DistillationTrainer(model=load_model(tiny_dir["student"]), args=args)
    assert next(trainer.teacher_model.parameters()).dtype == torch.float64
    assert not trainer.teacher_model.training


def test_missing_labels_are_input_ids_with_padding_masked(tmp_path, tiny_dir, four_examples):
    rows = [{"input_ids": r["input_ids"]} for r in four_examples]
    student, teacher = load_model(tiny_dir["student"]), load_model(tiny_dir["teacher"])
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, alpha=0.5))
    batch = DistillationCollator(pad_token_id=7)(rows)
    del batch["labels"]
    ours = trainer.compute_loss(student, batch)
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss_sum, count = 0.0, 0
    for row, r in enumerate(rows):  # per example, no padding involved at all
        n = len(r["input_ids"])
        ids = torch.tensor(r["input_ids"])
        loss_sum = loss_sum + distillation_loss(s[row, : n - 1], t[row, : n - 1], ids[1:], alpha=0.5) * (n - 1)
        count += n - 1
    torch.testing.assert_close(ours, loss_sum / count, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 7])
def test_padded_vocabularies_are_aligned(tmp_path, tiny_dir, tokenizer, four_examples, caplog, chunk):
    student, teacher = load_model(tiny_dir["student_padded"]), load_model(tiny_dir["teacher_padded"])  # 44 vs 48
    with caplog.at_level("WARNING", logger="hf_kd.training.trainer"):
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=make_args(tmp_path, loss_chunk_size=chunk),
            processing_class=tokenizer,
        )
    assert trainer.vocab_size == 40 + 4  # min(44, 48): the tokenizer's 40 tokens fit in both
    assert "shared first 44" in caplog.text
    batch = DistillationCollator()(four_examples)
    ours = trainer.compute_loss(student, batch)
    s = student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1, :44]
    t = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1, :44]
    torch.testing.assert_close(ours, distillation_loss(s, t, batch["labels"][:, 1:]), rtol=1e-6, atol=1e-7)


def test_incompatible_vocabularies_fail_before_training(tmp_path, tiny_dir, tokenizer):
    with pytest.raises(ValueError, match="tokenizer has 40 tokens"):  # teacher has only 32 rows
        DistillationTrainer(
            model=load_model(tiny_dir["student"]),
            teacher_model=load_model(tiny_dir["teacher_small"]),
            args=make_args(tmp_path),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="processing_class"):
        DistillationTrainer(
            model=load_model(tiny_dir["student_padded"]),
            teacher_model=load_model(tiny_dir["teacher_padded"]),
            args=make_args(tmp_path),
        )


def test_no_teacher_is_a_clear_error(tmp_path, tiny_dir):
    with pytest.raises(ValueError, match="teacher"):
        DistillationTrainer(model=load_model(tiny_dir["student"]), args=make_args(tmp_path))


def test_components_are_logged_for_train_and_eval(tmp_path, tiny_dir):
    train = Dataset.from_list(variable_length_examples(8, seed=1))
    eval_rows = variable_length_examples(6, seed=2)
    student, teacher = load_model(tiny_dir["student"]), load_model(tiny_dir["teacher"])
    args = make_args(tmp_path, max_steps=2, alpha=0.25, temperature=2.0, learning_rate=0.0)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=train, eval_dataset=Dataset.from_list(eval_rows)
    )
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(0.25 * first["distill_loss"] + 0.75 * first["ce_loss"], rel=1e-4)
    metrics = trainer.evaluate()
    # token-weighted over the whole eval set, computed example by example here
    d_sum = ce_sum = count = 0.0
    for r in eval_rows:
        ids = torch.tensor([r["input_ids"]])
        with torch.no_grad():
            s, t = student(input_ids=ids).logits[0, :-1], teacher(input_ids=ids).logits[0, :-1]
        labels = torch.tensor(r["labels"][1:])
        n = int((labels != -100).sum())
        _, d, ce = distillation_loss(s, t, labels, temperature=2.0, alpha=0.25, return_components=True)
        d_sum, ce_sum, count = d_sum + d.item() * n, ce_sum + ce.item() * n, count + n
    assert metrics["eval_distill_loss"] == pytest.approx(d_sum / count, rel=1e-4)
    assert metrics["eval_ce_loss"] == pytest.approx(ce_sum / count, rel=1e-4)
    assert trainer.state.log_history[-1]["eval_distill_loss"] == metrics["eval_distill_loss"]


class HiddenStateTrainer(DistillationTrainer):
    """A user extension: add a hidden-state term without copying compute_loss."""

    def distillation_terms(self, student_outputs, teacher_outputs, labels, num_items_in_batch=None):
        terms = super().distillation_terms(student_outputs, teacher_outputs, labels, num_items_in_batch)
        terms["hidden_loss"] = student_outputs.logits.new_tensor(0.125)
        terms["loss"] = terms["loss"] + terms["hidden_loss"]
        return terms


def test_subclass_adds_a_logged_term(tmp_path, tiny_dir, four_examples):
    student = load_model(tiny_dir["student"])
    trainer = HiddenStateTrainer(
        model=student,
        teacher_model=load_model(tiny_dir["teacher"]),
        args=make_args(tmp_path, learning_rate=0.0),
        train_dataset=Dataset.from_list(four_examples),
    )
    plain = DistillationTrainer(model=student, teacher_model=load_model(tiny_dir["teacher"]), args=make_args(tmp_path))
    batch = DistillationCollator()(four_examples)
    assert trainer.compute_loss(student, batch).item() == pytest.approx(
        plain.compute_loss(student, batch).item() + 0.125
    )
    trainer.train()
    assert trainer.state.log_history[0]["hidden_loss"] == pytest.approx(0.125)


class RawTeacherTrainer(DistillationTrainer):
    """A teacher_forward override that returns the model's outputs (full logits, no final hidden state)."""

    def teacher_forward(self, inputs):
        with torch.no_grad():
            return self.teacher_model(**{k: v for k, v in inputs.items() if k != "labels"}, output_hidden_states=True)


def test_overridden_teacher_forward_with_full_logits(tmp_path, tiny_dir, four_examples):
    """The override knows nothing of the fused path's final hidden states: both paths take its full logits."""
    batch = DistillationCollator()(four_examples)
    student = load_model(tiny_dir["student"])
    plain = DistillationTrainer(
        model=student,
        teacher_model=load_model(tiny_dir["teacher"]),
        args=make_args(tmp_path, loss_chunk_size=0, **LOSS_KW),
    )
    expected = plain.compute_loss(student, batch)
    for chunk in (5, 0):
        raw = RawTeacherTrainer(
            model=student,
            teacher_model=load_model(tiny_dir["teacher"]),
            args=make_args(tmp_path, loss_chunk_size=chunk, **LOSS_KW),
        )
        assert raw.use_fused_loss == bool(chunk)
        torch.testing.assert_close(raw.compute_loss(student, batch), expected, rtol=1e-5, atol=1e-6)


def test_collator_pads_by_position():
    batch = DistillationCollator(pad_token_id=1)([{"input_ids": [5, 1, 6]}, {"input_ids": [7], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[5, 1, 6], [7, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 1, 6], [-100, -100, -100]]  # the real token 1 stays a target
    with pytest.raises(ValueError, match="labels"):
        DistillationCollator()([{"input_ids": [1, 2], "labels": [1]}])


def test_fused_and_full_logits_give_the_same_training(tmp_path, tiny_dir):
    """Three optimizer steps with the chunked loss on and off: same logged losses, same student weights."""
    ds = Dataset.from_list(variable_length_examples(12, seed=11))
    runs = {}
    for chunk in (0, 6):
        student = load_model(tiny_dir["student"])
        args = make_args(
            tmp_path / str(chunk),
            max_steps=3,
            loss_chunk_size=chunk,  # SGD: Adam's
            learning_rate=0.5,
            max_grad_norm=1.0,  # sign-like steps would amplify float32 rounding loss_type={"jsd": 0.5, "mse": 0.5}, alpha=0.8,
            temperature=1.5,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
        )
        trainer = DistillationTrainer(
            model=student, teacher_model=load_model(tiny_dir["teacher"]), args=args, train_dataset=ds
        )
        trainer.train()
        runs[chunk] = (student.state_dict(), [r for r in trainer.state.log_history if "loss" in r])
    (w0, logs0), (w6, logs6) = runs[0], runs[6]
    for a, b in zip(logs0, logs6, strict=True):
        for key in ("loss", "distill_loss", "ce_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    for key, value in w0.items():
        torch.testing.assert_close(w6[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_fused_student_forward_does_not_build_full_logits(tmp_path, tiny_dir, four_examples):
    student = load_model(tiny_dir["student"])
    trainer = DistillationTrainer(
        model=student, teacher_model=load_model(tiny_dir["teacher"]), args=make_args(tmp_path, loss_chunk_size=8)
    )
    batch = DistillationCollator()(four_examples)
    outputs = trainer.student_forward(student, batch)
    assert outputs.logits.shape[1] == 1  # last position only
    assert outputs["final_hidden_state"].shape == (*batch["input_ids"].shape, 32)


def test_a_hub_teacher_on_a_machine_without_network_fails_at_once_in_one_line(tmp_path, tiny_dir, monkeypatch):
    """The Python API, as the CLI: a teacher named by a Hub id that is not cached, with no network, is refused in
    one line naming it (not after a minute of Hub retries)."""
    import socket
    import time

    from hf_kd.errors import SetupError
    from hf_kd.models import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache

    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    hub.hub_reachable.cache_clear()
    try:
        started = time.perf_counter()
        with pytest.raises(
            SetupError,
            match=r"teacher_model_name_or_path: cannot load 'some-org/no-such-teacher'.*"
            r"unreachable",
        ):
            DistillationTrainer(
                model=load_model(tiny_dir["student"]),
                teacher_model="some-org/no-such-teacher",
                args=make_args(tmp_path),
            )
        assert time.perf_counter() - started < 10
    finally:
        hub.hub_reachable.cache_clear()

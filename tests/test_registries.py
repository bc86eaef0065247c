"""The two plug-in points, proven from outside the package: a divergence with a parameter of its own, and a teacher
kind, each defined and registered in this module only (no other file edited), used through every path."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import load_model
from test_cli import prompt_completion_rows, write_jsonl, write_recipe
from test_cross_tokenizer import permuted_wordlevel
from test_trainer import make_args
from transformers import AutoTokenizer

import hf_kd
from hf_kd import DistillationCollator, DistillationTrainer, Divergence, Teacher, register_divergence, register_teacher
from hf_kd.objective.signals import TeacherLogits, TeacherTopK

# ---- a divergence of the test's own: the alpha-beta divergence ------------------------------------------------------


@register_divergence
@dataclass(frozen=True)
class AlphaBeta(Divergence):
    """Cichocki & Amari's alpha-beta divergence of the teacher p from the student q:
    -1 / (a b) * sum_v (p^a q^b - a / (a + b) p^(a + b) - b / (a + b) q^(a + b)), for a, b, a + b != 0."""

    name: ClassVar[str] = "alpha_beta"
    a: float = 0.5
    b: float = 0.5

    def __post_init__(self):
        if self.a == 0 or self.b == 0 or self.a + self.b == 0:
            raise ValueError("alpha_beta: a, b and a + b must be nonzero")

    def per_row(self, log_p_s, log_p_t, student, teacher):
        a, b = self.a, self.b
        p, q = log_p_t.exp(), log_p_s.exp()
        mixed = (a * log_p_t + b * log_p_s).exp()
        return -(mixed - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum(-1) / (a * b)


A, B, T = 0.7, 0.4, 2.0
PARAMS = {"alpha_beta": {"a": A, "b": B}}


def reference(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """T^2 * D_AB(softmax(t / T) || softmax(s / T)) summed over the target rows, over their count (float64)."""
    keep = labels.reshape(-1) != -100
    s = student.reshape(-1, student.shape[-1])[keep].double()
    t = teacher.reshape(-1, teacher.shape[-1])[keep].double()
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    terms = p**A * q**B - A / (A + B) * p ** (A + B) - B / (A + B) * q ** (A + B)
    return T**2 * (-terms.sum(-1) / (A * B)).sum() / keep.sum()


def example(seed=0, rows=3, positions=5, vocab=11):
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(rows, positions, vocab, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(rows, positions, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows, positions), generator=g)
    labels[0, :2] = -100  # a prompt
    return student, teacher, labels


def grad_of(value, tensor):
    return torch.autograd.grad(value, tensor, retain_graph=True)[0]


def test_a_registered_divergence_runs_through_the_dense_and_cached_paths():
    student, teacher, labels = example()
    expected = reference(student, teacher, labels)
    objective = hf_kd.Objective("alpha_beta", temperature=T, divergence_params=PARAMS)
    dense = hf_kd.distillation_loss(student, teacher, labels, objective=objective)
    keyword = hf_kd.distillation_loss(
        student, teacher, labels, loss_type="alpha_beta", temperature=T, divergence_params=PARAMS
    )
    assert abs(float((dense - expected).detach())) < 1e-12 and abs(float((keyword - expected).detach())) < 1e-12
    assert torch.allclose(grad_of(dense, student), grad_of(expected, student), rtol=1e-10, atol=1e-13)
    # a top-k teacher cache with k = V holds the whole distribution: the cached path is exact
    top = torch.log_softmax(teacher, -1).topk(teacher.shape[-1])
    tail = torch.full(labels.shape, -torch.inf, dtype=torch.float64)
    cached = hf_kd.sparse_distillation_loss(student, top.indices, top.values, tail, labels, objective=objective)
    assert abs(float((cached - expected).detach())) < 1e-10
    assert torch.allclose(grad_of(cached, student), grad_of(expected, student), rtol=1e-8, atol=1e-11)


def test_a_registered_divergence_runs_through_the_fused_path():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden, t_weight = (
        torch.randn(2, 6, 12, generator=g, dtype=torch.float64),
        torch.randn(13, 12, generator=g, dtype=torch.float64),
    )
    labels = torch.randint(0, 13, (2, 6), generator=g)
    labels[1, 4:] = -100
    fused = hf_kd.fused_distillation_loss(
        hidden,
        weight,
        t_hidden,
        t_weight,
        labels,
        chunk_size=4,
        loss_type="alpha_beta",
        temperature=T,
        divergence_params=PARAMS,
    )
    expected = reference(hidden @ weight.T, t_hidden @ t_weight.T, labels)
    assert abs(float((fused - expected).detach())) < 1e-12
    for tensor in (hidden, weight):
        assert torch.allclose(grad_of(fused, tensor), grad_of(expected, tensor), rtol=1e-9, atol=1e-12)


def test_a_registered_divergence_runs_through_the_cross_tokenizer_path(tmp_path, tokenizer):
    """A teacher tokenizer that is the student's with its ids shuffled: the cross-tokenizer loss projects the teacher
    back onto the student's vocabulary, so its value is the dense reference on the unpermuted logits."""
    from hf_kd.teachers.cross_tokenizer.alignment import align_batch
    from hf_kd.teachers.cross_tokenizer.loss import cross_tokenizer_terms
    from hf_kd.teachers.cross_tokenizer.vocabulary import shared_vocabulary

    perm_dir, new_id_of = permuted_wordlevel(tmp_path / "perm", seed=5)
    teacher_tok = AutoTokenizer.from_pretrained(perm_dir)
    rows = [tokenizer(t)["input_ids"] for t in ("w3 w5 w7 w9 w2", "w4 w4 w10 w11 w12")]
    batch = DistillationCollator(pad_token_id=0)([{"input_ids": r, "labels": [-100, -100] + r[2:]} for r in rows])
    labels = batch["labels"][:, 1:]
    student, teacher, _ = example(seed=2, rows=2, positions=labels.shape[1], vocab=len(tokenizer))
    alignment = align_batch(
        batch["input_ids"],
        batch["attention_mask"],
        labels,
        tokenizer,
        teacher_tok,
        shared_vocabulary(tokenizer, teacher_tok),
    )
    permuted = torch.empty_like(teacher)
    permuted[..., new_id_of] = teacher  # the teacher's logit of old id i sits at its new id
    objective = hf_kd.Objective("alpha_beta", temperature=T, divergence_params=PARAMS)
    terms = cross_tokenizer_terms(
        student, TeacherLogits(permuted), alignment, shared_vocabulary(tokenizer, teacher_tok), labels, objective
    )
    expected = reference(student, teacher, labels)
    assert float(terms["aligned_fraction"]) == pytest.approx(1.0)
    assert abs(float((terms["loss"] - expected).detach())) < 1e-10
    assert torch.allclose(grad_of(terms["loss"], student), grad_of(expected, student), rtol=1e-8, atol=1e-11)


def test_divergence_params_are_checked_and_reach_the_config(tmp_path):
    with pytest.raises(ValueError, match="alpha_beta has no parameter 'gamma'"):
        hf_kd.Objective("alpha_beta", divergence_params={"alpha_beta": {"gamma": 1.0}})
    with pytest.raises(ValueError, match="a, b and a \\+ b must be nonzero"):
        hf_kd.Objective("alpha_beta", divergence_params={"alpha_beta": {"a": 1.0, "b": -1.0}})
    with pytest.raises(ValueError, match="registered already"):
        register_divergence(type("Other", (AlphaBeta,), {}))
    args = make_args(tmp_path, loss_type="alpha_beta", divergence_params=json.dumps(PARAMS))  # JSON: the command line
    assert args.objective.divergences["alpha_beta"] == AlphaBeta(a=A, b=B)
    assert hf_kd.Objective("jsd", jsd_beta=0.3).divergences["jsd"].beta == 0.3  # the classic knob still sets it
    assert hf_kd.Objective("jsd", jsd_beta=0.3, divergence_params={"jsd": {"beta": 0.9}}).divergences["jsd"].beta == 0.9


# ---- a teacher kind of the test's own: top-k log-probabilities from a Python callable ---------------------------------


def bigram_logits(input_ids: torch.Tensor, vocab: int, seed: int) -> torch.Tensor:
    """A fixed bigram "teacher": the logits after token i are row i of a seeded random table."""
    table = 4 * torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))
    return table[input_ids]


@register_teacher
class CallableTopK(Teacher):
    """Top-k log-probabilities computed by a Python callable ``(input_ids [B, S]) -> logits [B, S, V]``."""

    kind = "callable_topk"
    built_with: ClassVar[list[dict]] = []  # the options each build received (what the test checks)

    def __init__(self, logits_fn, k: int):
        self.logits_fn, self.k, self.name = logits_fn, k, "bigram"

    @classmethod
    def check_setup(cls, trainer, source) -> None:
        if not trainer.objective.on_buckets():
            raise hf_kd.config.SetupError("loss_type", "a top-k teacher defines bucket divergences only")

    @classmethod
    def build(cls, trainer, source) -> Teacher:
        options = dict(trainer.args.teacher_options or {})
        cls.built_with.append(options)
        vocab, seed = trainer.model.config.vocab_size, options["seed"]
        return cls(lambda ids: bigram_logits(ids, vocab, seed), options["k"])

    def run(self, inputs, forward, targets):
        log_probs = torch.log_softmax(self.logits_fn(inputs["input_ids"])[:, :-1], -1)  # position i predicts i + 1
        top = log_probs.topk(self.k)
        tail = torch.log1p(-top.values.exp().sum(-1).clamp_max(1.0))
        if self.k == log_probs.shape[-1]:  # the whole distribution: the rest is empty, not float32's rounding error
            tail = torch.full_like(tail, -torch.inf)
        return TeacherTopK(top.indices, top.values, tail)


def test_a_teacher_kind_of_ones_own_from_python(tmp_path, tiny_dir, tokenizer):
    """Given as an object, the kind's signal is what the loss sees: with k = V it equals the dense loss against the
    callable's logits, computed here."""
    student = load_model(tiny_dir["student"])
    teacher = CallableTopK(lambda ids: bigram_logits(ids, 40, seed=7), k=40)
    args = make_args(tmp_path, loss_type="forward_kl", temperature=1.0, alpha=0.5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer)
    assert trainer.teacher is teacher
    rows = [tokenizer(t)["input_ids"] for t in ("w3 w5 w7 w9 w2 <eos>", "w4 w4 w10")]
    batch = DistillationCollator(pad_token_id=0)([{"input_ids": r, "labels": [-100] + r[1:]} for r in rows])
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    expected = hf_kd.distillation_loss(
        logits, bigram_logits(batch["input_ids"], 40, 7)[:, :-1], batch["labels"][:, 1:], alpha=0.5
    )
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)


def test_a_teacher_kind_of_ones_own_from_a_recipe(tmp_path, tiny_dir, capsys):
    from hf_kd.cli import COMPLETE_MARKER, main

    section = {"name_or_path": "bigram", "kind": "test_registries:callable_topk", "options": {"k": 8, "seed": 3}}
    data = {"dataset": write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(12))}
    path = write_recipe(tmp_path / "recipe.yaml", tiny_dir, data, teacher_section=section)
    assert main(["check", str(path)]) == 0, capsys.readouterr().out
    assert "teacher kind test_registries:callable_topk" in capsys.readouterr().out
    CallableTopK.built_with.clear()
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    assert CallableTopK.built_with == [{"k": 8, "seed": 3}]
    assert (tmp_path / "out" / COMPLETE_MARKER).exists()
    assert "| teacher kind | callable_topk |" in (tmp_path / "out" / "README.md").read_text()
    path = write_recipe(
        tmp_path / "recipe.yaml", tiny_dir, data, teacher_section={**section, "kind": "test_registries:no_such_kind"}
    )
    assert main(["train", str(path), "--output_dir", str(tmp_path / "out2")]) == 2
    assert "teacher.kind: unknown teacher kind 'no_such_kind'" in capsys.readouterr().err


def test_old_module_paths_still_import_the_moved_modules():
    import hf_kd.fused
    import hf_kd.losses
    import hf_kd.trainer
    from hf_kd.cache import build_teacher_cache

    from hf_kd.objective import fused, losses
    from hf_kd.training import trainer

    assert hf_kd.losses is losses and hf_kd.fused is fused and hf_kd.trainer is trainer
    assert build_teacher_cache is hf_kd.build_teacher_cache
    for old, new in hf_kd.MOVED.items():
        assert __import__(old, fromlist=["_"]) is __import__(new, fromlist=["_"])

"""On-policy from a weak student: the lmbda schedule (off-policy warm-up, then a ramp) and the health of the student's
own samples in the logs (entropy, the teacher's mass on the student's top-k, truncated and repeating completions)."""

import math

import pytest
import torch
from conftest import load_model
from datasets import Dataset
from test_onpolicy import KW, expected_batch, greedy, rows  # noqa: F401 (rows: a fixture)
from test_onpolicy import eos as eos  # noqa: F401 (a fixture)
from test_trainer import make_args

from hf_kd import DistillationTrainer
from hf_kd.models.heads import LMHeadSpec
from hf_kd.objective.metrics import HEALTH_TOP_K, health_sums
from hf_kd.objective.signals import StudentHidden, TeacherHidden, TeacherTopK
from hf_kd.objective.terms import sample_health
from hf_kd.training.generation import completion_stats


def test_lmbda_schedule_is_warm_up_then_a_linear_ramp(tmp_path):
    args = make_args(tmp_path, lmbda=0.6, lmbda_warmup_steps=3, lmbda_ramp_steps=4)
    expected = [0, 0, 0, 0.15, 0.3, 0.45, 0.6, 0.6, 0.6]  # written out: 0.6 * (r + 1) / 4 for r = 0..3
    assert [args.lmbda_at(step) for step in range(9)] == pytest.approx(expected)
    assert not args.every_batch_generated  # the warm-up trains on the dataset's completions: they must be kept
    assert make_args(tmp_path, lmbda=1.0).every_batch_generated
    assert make_args(tmp_path, lmbda=0.4, lmbda_ramp_steps=2).lmbda_at(0) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="lmbda_warmup_steps must be an int >= 0"):
        make_args(tmp_path, lmbda=1.0, lmbda_warmup_steps=-1)


def test_warm_up_steps_train_off_policy_then_every_batch_is_generated(tmp_path, tiny_dir, rows, eos):  # noqa: F811
    trainer = DistillationTrainer(
        model=load_model(tiny_dir["student"]),
        teacher_model=load_model(tiny_dir["teacher"]),
        train_dataset=Dataset.from_list(rows[:4]),
        args=make_args(tmp_path, max_steps=4, **greedy(eos, lmbda=1.0, lmbda_warmup_steps=2), **KW),
    )
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["generated_fraction"] for row in logs] == [0.0, 0.0, 1.0, 1.0]
    assert all("onpolicy_student_entropy" not in row for row in logs[:2])  # health only on the student's samples
    assert all("onpolicy_student_entropy" in row for row in logs[2:])


def test_completion_stats_count_truncation_and_repeated_ngrams():
    # row 0: 7 targets ending in EOS 9, no 4-gram twice; row 1: 8 targets (= max_new_tokens), no EOS, "1 2 3 4" twice
    labels = torch.tensor(
        [
            [-100, -100, 5, 6, 7, 8, 5, 6, 9, -100],
            [-100, 1, 2, 3, 4, 1, 2, 3, 4, -100],
        ]
    )
    labels = torch.cat([torch.full((2, 1), -100), labels], 1)  # labels[:, 0] is never a target
    stats = completion_stats({"labels": labels}, eos=[9], max_new_tokens=8)
    # row 0: 4-grams 5678 6785 7856 8569 (4, none repeated); row 1: 1234 2341 3412 4123 1234 (5, one repeated)
    assert stats == {
        "completions": 2.0,
        "tokens": 15.0,
        "ended": 1.0,
        "truncated": 1.0,
        "ngrams": 9.0,
        "repeated_ngrams": 1.0,
    }


def test_health_sums_equal_a_float64_reference_and_chunking_changes_nothing():
    torch.manual_seed(0)
    n, hidden, vocab = 11, 8, 30
    s_hidden, t_hidden = torch.randn(1, n, hidden), torch.randn(1, n, hidden)
    s_head, t_head = torch.nn.Linear(hidden, vocab, bias=False), torch.nn.Linear(hidden, vocab, bias=False)
    labels = torch.randint(0, vocab, (1, n))
    labels[0, [2, 7]] = -100
    keep = labels[0] != -100
    s = (s_hidden[0] @ s_head.weight.T).double()[keep]
    t = (t_hidden[0] @ t_head.weight.T).double()[keep]
    p_s, p_t = s.softmax(-1), t.softmax(-1)
    entropy = -(p_s * p_s.log()).sum()
    top = s.argsort(-1, descending=True)[:, :HEALTH_TOP_K]
    mass = sum(p_t[i, top[i]].sum() for i in range(len(s)))
    for chunk in (None, 3):
        sums = sample_health(
            StudentHidden(s_hidden, LMHeadSpec(s_head.weight, None, None, None)),
            TeacherHidden(t_hidden, LMHeadSpec(t_head.weight, None, None, None)),
            labels,
            chunk_size=chunk,
        )
        assert sums["count"].item() == keep.sum().item()
        assert sums["entropy"].item() == pytest.approx(entropy.item(), rel=1e-6)
        assert sums["teacher_mass"].item() == pytest.approx(mass.item(), rel=1e-6)
    uniform = health_sums(torch.zeros(2, vocab), None)  # the entropy of a uniform row is log V; no teacher, no mass
    assert uniform["entropy"].item() == pytest.approx(2 * math.log(vocab)) and "teacher_mass" not in uniform
    topk = TeacherTopK(torch.zeros(1, n, 2, dtype=torch.long), torch.zeros(1, n, 2), torch.zeros(1, n))
    assert sample_health((s_hidden @ s_head.weight.T).detach(), topk, labels).keys() == {"count", "entropy"}


def test_logged_health_is_the_students_entropy_and_teacher_mass_on_its_own_samples(tmp_path, tiny_dir, rows, eos):  # noqa: F811
    student, teacher = load_model(tiny_dir["student"]), load_model(tiny_dir["teacher"])
    batch = expected_batch(load_model(tiny_dir["student"]), rows[:4], eos)  # the initial student's greedy completions
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        train_dataset=Dataset.from_list(rows[:4]),
        args=make_args(tmp_path, **greedy(eos, lmbda=1.0), **KW),
    )
    reference = load_model(tiny_dir["student"]).double()
    trainer.train()
    with torch.no_grad():  # by hand, in float64, on the targets of the batch the step trained on
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s = reference(**inputs).logits[:, :-1]
        t = teacher.double()(**inputs).logits[:, :-1]
    keep = batch["labels"][:, 1:] != -100
    log_p = s[keep].log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1).mean()
    top = s[keep].topk(HEALTH_TOP_K, -1).indices
    mass = t[keep].softmax(-1).gather(-1, top).sum(-1).mean()
    logged = trainer.state.log_history[0]
    assert logged["onpolicy_student_entropy"] == pytest.approx(entropy.item(), rel=1e-5)
    assert logged[f"onpolicy_teacher_mass_on_student_top{HEALTH_TOP_K}"] == pytest.approx(mass.item(), rel=1e-5)
    lengths = keep.sum(-1)
    assert logged["completion_truncated_fraction"] == pytest.approx((lengths == 6).float().mean().item())
    assert 0 <= logged["completion_repeated_4gram_fraction"] <= 1


def test_a_schedule_without_on_policy_batches_is_refused(tmp_path):
    for name in ("lmbda_warmup_steps", "lmbda_ramp_steps"):
        with pytest.raises(ValueError, match=f"{name}=5 schedules on-policy batches, but lmbda is 0"):
            make_args(tmp_path, **{name: 5})


@pytest.mark.parametrize(
    "schedule, warned",
    [({"lmbda": 1.0}, False), ({"lmbda": 0.5}, True), ({"lmbda": 1.0, "lmbda_warmup_steps": 2}, True)],
    ids=["on-policy", "mixed", "warm-up"],
)
def test_the_sampled_estimator_warns_when_some_batches_are_not_the_students_samples(
    tmp_path, tiny_dir, caplog, schedule, warned
):
    caplog.set_level("WARNING", logger="hf_kd.training.preflight")
    DistillationTrainer(
        model=load_model(tiny_dir["student"]),
        teacher_model=load_model(tiny_dir["teacher"]),
        args=make_args(tmp_path, loss_type="reverse_kl_sampled", **schedule),
    )
    assert any("unbiased on the student's own samples only" in r.message for r in caplog.records) == warned

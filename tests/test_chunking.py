"""Tests for the chunk driver (hf_kd.objective.fused.fused_objective, hf_kd.objective.chunking) with a teacher that hands over full logits.

A ``teacher_forward`` override may return plain full logits while the student stays fused: the driver then reads
the chunk's rows of ``TeacherLogits.logits``. The reference is :func:`hf_kd.distillation_loss` on the student's
explicitly built logits ``hidden @ W.T + b`` and the same teacher logits, differentiated with autograd.
"""

import pytest
import torch

import hf_kd.objective.fused as fused
from hf_kd import distillation_loss
from hf_kd.models.heads import LMHeadSpec
from hf_kd.objective.losses import Objective
from hf_kd.objective.signals import StudentHidden, TeacherHidden, TeacherLogits, TeacherTopK

N, H, V = 23, 6, 17  # N = 23 is prime: chunk_size 4 leaves a ragged last chunk
MASKED = [0, 5, 6, 7, 8, 9]  # a prompt-like run among them; dropped before the rows are chunked
NUM_ITEMS = 29  # e.g. the valid positions of the whole optimizer step, not just these 17
TOL = dict(rtol=1e-10, atol=1e-12)
OBJECTIVES = {  # name -> Objective keyword arguments (T != 1 and an asymmetric jsd_beta where it matters)
    "forward_kl_T1": dict(loss_type="forward_kl"),  # the closed form, T = 1 (one buffer for KL and CE)
    "forward_kl_T2.5": dict(loss_type="forward_kl", temperature=2.5),  # the closed form, T != 1
    "jsd": dict(loss_type="jsd", temperature=2.0, jsd_beta=0.3),
    "mse": dict(loss_type="mse"),
    "reverse_kl": dict(loss_type="reverse_kl", temperature=2.0),
    "mixture": dict(loss_type={"forward_kl": 0.5, "jsd": 0.2, "mse": 0.3}, temperature=2.0, jsd_beta=0.3),
}


def make(seed=0, v_t=V, shape=(N,)):
    """Student hidden/weight/bias (leaves with gradients), teacher logits ``[*shape, v_t]`` and masked labels."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (0.8 * torch.randn(V, H, generator=g, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = 2.0 * torch.randn(*shape, v_t, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[MASKED] = -100
    return hidden, weight, bias, teacher, labels.reshape(shape)


def driver(hidden, weight, bias, teacher, labels, objective, **kwargs):
    student = StudentHidden(hidden, LMHeadSpec(weight, bias, softcap=None, logit_scale=None))
    return fused.fused_objective(student, TeacherLogits(teacher), labels, objective, **kwargs)


@pytest.mark.parametrize("alpha", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_teacher_logits_match_distillation_loss(monkeypatch, name, alpha):
    """Value, both components and the gradients w.r.t. student hidden, weight and bias, in float64."""
    closed_form_calls = []
    original = fused._forward_kl_closed_form
    monkeypatch.setattr(fused, "_forward_kl_closed_form", lambda *a: closed_form_calls.append(1) or original(*a))
    hidden, weight, bias, teacher, labels = make()
    objective = Objective(alpha=alpha, **OBJECTIVES[name])

    expected = distillation_loss(
        hidden @ weight.T + bias,
        teacher,
        labels,
        **objective.loss_kwargs(),
        num_items_in_batch=NUM_ITEMS,
        return_components=True,
    )
    actual = driver(
        hidden,
        weight,
        bias,
        teacher,
        labels,
        objective,
        num_items_in_batch=NUM_ITEMS,
        chunk_size=4,
        return_components=True,
    )

    assert bool(closed_form_calls) == name.startswith("forward_kl")  # a dense logits teacher takes the closed form
    assert actual[0].requires_grad and not actual[1].requires_grad and not actual[2].requires_grad
    for got, want in zip(actual, expected):
        assert got.dtype == torch.float64 and got.dim() == 0
        torch.testing.assert_close(got, want.detach(), **TOL)
    want_grads = torch.autograd.grad(expected[0], (hidden, weight, bias))
    got_grads = torch.autograd.grad(actual[0], (hidden, weight, bias))
    for label, got, want in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        torch.testing.assert_close(got, want, **TOL, msg=label)
    assert torch.all(got_grads[0][MASKED] == 0)  # masked rows never reached the matmul
    assert actual[1].item() > 0 and actual[2].item() > 0


def test_teacher_logits_with_batch_dims_and_a_padded_vocabulary():
    """``[B, T, V_t]`` logits wider than the shared vocabulary: the driver reads their first ``vocab_size`` columns."""
    hidden, weight, bias, teacher, labels = make(seed=1, v_t=V + 4, shape=(4, 6))
    objective = Objective(loss_type="jsd", temperature=2.0, alpha=0.5)
    expected = distillation_loss(hidden @ weight.T + bias, teacher[..., :V], labels, **objective.loss_kwargs())
    got = driver(hidden, weight, bias, teacher, labels, objective, chunk_size=5, vocab_size=V)
    torch.testing.assert_close(got, expected, **TOL)
    for a, b in zip(torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(expected, (hidden, weight))):
        torch.testing.assert_close(a, b, **TOL)


def test_teacher_logits_equal_the_hidden_teacher_they_come_from():
    """The same teacher handed over as hidden states + head, or as the logits that head makes: the same loss."""
    hidden, weight, bias, _, labels = make(seed=2)
    g = torch.Generator().manual_seed(3)
    t_hidden, t_weight = (torch.randn(*shape, 10, generator=g, dtype=torch.float64) for shape in ((N,), (V,)))
    t_head = LMHeadSpec(t_weight, None, softcap=4.0, logit_scale=0.7)
    student = StudentHidden(hidden, LMHeadSpec(weight, bias, softcap=None, logit_scale=None))
    for loss_type in ("forward_kl", "tvd"):  # the closed form and the autograd divergence
        objective = Objective(loss_type=loss_type, temperature=1.5, alpha=0.4)
        from_hidden = fused.fused_objective(student, TeacherHidden(t_hidden, t_head), labels, objective, chunk_size=4)
        from_logits = driver(hidden, weight, bias, t_head.logits(t_hidden), labels, objective, chunk_size=4)
        torch.testing.assert_close(from_logits, from_hidden, rtol=1e-12, atol=0)


def test_teacher_logits_get_no_gradient_and_evaluation_needs_no_graph():
    hidden, weight, bias, teacher, labels = make(seed=4)
    teacher.requires_grad_()
    objective = Objective(loss_type="reverse_kl", alpha=0.5)
    total = driver(hidden, weight, bias, teacher, labels, objective, chunk_size=4)
    total.backward()
    assert teacher.grad is None and hidden.grad is not None
    with torch.no_grad():
        evaluated = driver(hidden, weight, bias, teacher, labels, objective, chunk_size=4)
    assert not evaluated.requires_grad
    torch.testing.assert_close(evaluated, total.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.update(teacher=d["teacher"][:-1]), "student_hidden .* and teacher_logits .* same positions"),
        (lambda d: d.update(teacher=d["teacher"][:, :-2]), "teacher_logits 15: .* pass vocab_size=15"),
        (lambda d: d.update(teacher=d["teacher"].long()), "teacher_logits .* must be floating point"),
    ],
    ids=["positions", "vocab", "dtype"],
)
def test_teacher_logits_errors_name_the_argument(change, match):
    inputs = dict(zip(("hidden", "weight", "bias", "teacher", "labels"), make()))
    change(inputs)
    with pytest.raises(ValueError, match=match):
        driver(**inputs, objective=Objective())


def test_top_k_teacher_refuses_mse_through_the_driver():
    hidden, weight, bias, teacher, labels = make()
    top = teacher.log_softmax(-1).topk(3)
    cached = TeacherTopK(top.indices, top.values, torch.zeros(N, dtype=torch.float64))
    student = StudentHidden(hidden, LMHeadSpec(weight, bias, softcap=None, logit_scale=None))
    with pytest.raises(ValueError, match="'mse' compares raw teacher logits"):
        fused.fused_objective(student, cached, labels, Objective(loss_type="mse"))


@pytest.mark.parametrize("masked", [True, False], ids=["masked rows", "every row"])
def test_the_callers_teacher_logits_are_never_overwritten(masked):
    """The closed form overwrites its chunk buffers in place: float64 teacher logits (the chunks' dtype, so a view
    would do) must be copied into them, whether the kept rows are gathered or sliced."""
    hidden, weight, bias, teacher, labels = make(seed=5)
    before = teacher.clone()
    objective = Objective(loss_type="forward_kl", temperature=2.0, alpha=1.0)
    driver(hidden, weight, bias, teacher, labels if masked else None, objective, chunk_size=4).backward()
    assert torch.equal(teacher, before)


def test_the_driver_serves_the_cross_tokenizer_loss_from_logits_and_from_hidden_states(tmp_path, monkeypatch):
    """The cross-tokenizer loss runs through the same driver with the student as full logits (the identity head) or as
    hidden states + head: the same terms, and the logits' gradient, pushed through the head by the chain rule here,
    is the hidden states', weight's and bias's gradient. Prompt rows are masked and the chunks are ragged, so a row
    of the logits path read or written at the wrong place shows up."""
    from test_cross_tokenizer import STUDENT_MERGES, TEACHER_MERGES, byte_level_tokenizer
    from transformers import AutoTokenizer

    import hf_kd.objective.chunking as chunking
    from hf_kd.teachers.cross_tokenizer.alignment import align_batch
    from hf_kd.teachers.cross_tokenizer.loss import CrossTokenizerWeights, cross_tokenizer_terms
    from hf_kd.teachers.cross_tokenizer.vocabulary import shared_vocabulary

    heads = []  # the student's head in every driver call: None for logits
    original = chunking.run
    monkeypatch.setattr(
        "hf_kd.teachers.cross_tokenizer.loss.run",
        lambda student, *a, **k: heads.append(student.head) or original(student, *a, **k),
    )
    student_tok = AutoTokenizer.from_pretrained(byte_level_tokenizer(tmp_path / "s", STUDENT_MERGES))
    teacher_tok = AutoTokenizer.from_pretrained(byte_level_tokenizer(tmp_path / "t", TEACHER_MERGES))
    shared = shared_vocabulary(student_tok, teacher_tok)
    ids = student_tok("ab cdab abcd a cd", add_special_tokens=False)["input_ids"] + [student_tok.eos_token_id]
    labels = torch.tensor([[-100, -100, *ids[3:]]])  # a prompt: its rows get no gradient
    alignment = align_batch(torch.tensor([ids]), None, labels, student_tok, teacher_tok, shared)
    g = torch.Generator().manual_seed(6)
    v_s, n_t = len(student_tok), alignment.teacher_inputs["input_ids"].shape[1] - 1
    hidden = torch.randn(1, len(ids) - 1, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v_s, H, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v_s, generator=g, dtype=torch.float64, requires_grad=True)
    t_head = LMHeadSpec(torch.randn(len(teacher_tok), 5, generator=g, dtype=torch.float64), None, None, None)
    teacher = TeacherHidden(torch.randn(1, n_t, 5, generator=g, dtype=torch.float64), t_head)
    logits = (hidden @ weight.T + bias).detach().requires_grad_()
    before = logits.detach().clone()
    objective = Objective("forward_kl", temperature=2.0, alpha=0.6)
    kwargs = dict(weights=CrossTokenizerWeights(0.8, 0.5), num_items_in_batch=NUM_ITEMS, chunk_size=4)

    from_logits = cross_tokenizer_terms(logits, teacher, alignment, shared, labels, objective, **kwargs)
    student = StudentHidden(hidden, LMHeadSpec(weight, bias, softcap=None, logit_scale=None))
    from_hidden = cross_tokenizer_terms(student, teacher, alignment, shared, labels, objective, **kwargs)

    assert heads[0] is None and heads[1] is not None  # both went through the one driver
    assert alignment.pairs.shape[1] and alignment.span_starts.shape[1]  # exact, span and ULD terms all present
    for name in ("loss", "distill_loss", "ce_loss", "aligned_fraction", "shared_mass"):
        torch.testing.assert_close(from_logits[name], from_hidden[name], rtol=1e-12, atol=0, msg=name)
    assert from_hidden["shared_mass"].item() > 0 and from_hidden["distill_loss"].item() > 0
    (d_logits,) = torch.autograd.grad(from_logits["loss"], logits)
    d_hidden, d_weight, d_bias = torch.autograd.grad(from_hidden["loss"], (hidden, weight, bias))
    assert torch.equal(logits.detach(), before)  # the driver reads logits into its buffers, never writes them
    assert not d_logits[0, :2].any() and d_logits[0, 2:].abs().sum(-1).min() > 0  # prompt rows 0, every target not
    torch.testing.assert_close(d_hidden, d_logits @ weight.detach(), **TOL)  # d(hidden) = d(logits) @ W
    torch.testing.assert_close(d_weight, d_logits[0].T @ hidden.detach()[0], **TOL)  # d(W) = d(logits).T @ hidden
    torch.testing.assert_close(d_bias, d_logits.sum((0, 1)), **TOL)

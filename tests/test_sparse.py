"""Tests for hf_kd.objective.sparse: the top-k (bucketed) distillation loss.

The reference below is written from the definitions in float64, one position at a time: the teacher's k most likely
ids by probability, a "rest" bucket holding the sum of every other probability (summed explicitly, not as 1 - top),
temperature as bucket ** (1 / T) renormalized, and KL / JSD / TVD from their formulas. With k = V the loss must be the
dense hf_kd.distillation_loss, values and gradients.
"""

import math

import pytest
import torch

from hf_kd import distillation_loss
from hf_kd.objective.sparse import SPARSE_LOSS_TYPES, sparse_distillation_loss

V, K = 13, 4
BETA, LAMBDA = 0.3, 0.2


def _cached(teacher_logits, k):
    """What a cache stores for these teacher logits: top-k ids and T=1 log-probs, log of the remaining mass."""
    log_p = torch.log_softmax(teacher_logits, -1)
    top, ids = log_p.topk(k, dim=-1)
    tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, top, tail


def _reference(name, s, t, k, temperature):
    """One position's bucketed divergence from the definitions (float64 logits s, t of shape [V])."""
    pt, ps = torch.softmax(t, -1), torch.softmax(s, -1)
    ids = sorted(range(V), key=lambda i: -pt[i].item())[:k]
    rest = [i for i in range(V) if i not in ids]
    bt = torch.stack([pt[i] for i in ids] + [sum((pt[i] for i in rest), torch.tensor(0.0, dtype=torch.float64))])
    bs = torch.stack([ps[i] for i in ids] + [sum((ps[i] for i in rest), torch.tensor(0.0, dtype=torch.float64))])
    bt, bs = bt ** (1 / temperature), bs ** (1 / temperature)
    bt, bs = bt / bt.sum(), bs / bs.sum()
    kl = lambda p, q: (p * torch.log(p / q)).sum()  # noqa: E731
    if name == "forward_kl":
        d = kl(bt, bs)
    elif name == "reverse_kl":
        d = kl(bs, bt)
    elif name == "jsd":
        m = BETA * bt + (1 - BETA) * bs
        d = BETA * kl(bt, m) + (1 - BETA) * kl(bs, m)
    elif name == "skew_forward_kl":
        d = kl(bt, LAMBDA * bt + (1 - LAMBDA) * bs)
    elif name == "skew_reverse_kl":
        d = kl(bs, LAMBDA * bs + (1 - LAMBDA) * bt)
    elif name == "tvd":
        d = 0.5 * (bt - bs).abs().sum()
    return d * temperature**2


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    student = (2 * torch.randn(2, 5, V, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(2, 5, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, :2] = -100  # a prompt
    labels[1, 4] = -100  # padding
    return student, teacher, labels


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name", SPARSE_LOSS_TYPES)
def test_k_equal_to_vocab_is_the_dense_loss(batch, name, temperature):
    student, teacher, labels = batch
    knobs = dict(
        loss_type=name, temperature=temperature, alpha=0.7, jsd_beta=BETA, skew_lambda=LAMBDA, num_items_in_batch=11
    )
    sparse = sparse_distillation_loss(student, *_cached(teacher, V), labels, **knobs)
    (sparse_grad,) = torch.autograd.grad(sparse, student)
    dense = distillation_loss(student, teacher, labels, **knobs)
    (dense_grad,) = torch.autograd.grad(dense, student)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(sparse_grad).all()
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", SPARSE_LOSS_TYPES)
def test_top_k_matches_the_bucket_reference(batch, name, temperature):
    student, teacher, labels = batch
    total, divergence, ce = sparse_distillation_loss(
        student,
        *_cached(teacher, K),
        labels,
        loss_type=name,
        temperature=temperature,
        alpha=0.6,
        jsd_beta=BETA,
        skew_lambda=LAMBDA,
        num_items_in_batch=20,
        return_components=True,
    )
    d_sum = ce_sum = 0.0
    for b in range(2):
        for i in range(5):
            if labels[b, i] == -100:
                continue
            d_sum += _reference(name, student[b, i].detach(), teacher[b, i], K, temperature).item()
            ce_sum += -torch.log_softmax(student[b, i].detach(), -1)[labels[b, i]].item()
    assert divergence.item() == pytest.approx(d_sum / 20, rel=1e-10)  # divided by num_items_in_batch, not by 7
    assert ce.item() == pytest.approx(ce_sum / 20, rel=1e-10)
    assert total.item() == pytest.approx(0.6 * d_sum / 20 + 0.4 * ce_sum / 20, rel=1e-10)
    # the test can fail: the dense loss on the same logits is a different number when k < V
    dense = distillation_loss(
        student,
        teacher,
        labels,
        loss_type=name,
        temperature=temperature,
        alpha=0.6,
        jsd_beta=BETA,
        skew_lambda=LAMBDA,
        num_items_in_batch=20,
    )
    assert not math.isclose(total.item(), dense.item(), rel_tol=1e-4)


def test_bucketed_forward_kl_lower_bounds_the_dense_one(batch):
    """Merging outcomes never increases a KL (data processing): at T = 1 the k-bucket KL <= the full KL."""
    student, teacher, labels = batch
    for k in (1, 3, 7, 12):
        sparse = sparse_distillation_loss(student, *_cached(teacher, k), labels)
        assert sparse.item() <= distillation_loss(student, teacher, labels).item() + 1e-12


@pytest.mark.parametrize("name", SPARSE_LOSS_TYPES)
def test_student_equal_to_teacher_gives_zero_at_any_temperature(batch, name):
    _, teacher, labels = batch
    loss = sparse_distillation_loss(teacher, *_cached(teacher, K), labels, loss_type=name, temperature=3.0)
    assert abs(loss.item()) < 1e-12


def test_fully_masked_batch_is_zero_with_finite_gradients(batch):
    student, teacher, labels = batch
    loss = sparse_distillation_loss(student, *_cached(teacher, V), torch.full_like(labels, -100), alpha=0.5)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_float32_inputs_and_a_minus_inf_tail(batch):
    """Caches store float32 and -inf for an empty tail; the student may be bf16: computed in float32, finite."""
    student, teacher, labels = batch
    ids, top, tail = _cached(teacher.float(), V)
    assert torch.isinf(tail).all()
    s = student.detach().to(torch.bfloat16).requires_grad_()
    loss = sparse_distillation_loss(s, ids.int(), top, tail, labels, loss_type="jsd", temperature=2.0)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(s.grad.float()).all()
    dense = distillation_loss(s.detach(), teacher.float(), labels, loss_type="jsd", temperature=2.0)
    assert loss.item() == pytest.approx(dense.item(), rel=1e-5)


def test_refusals(batch):
    student, teacher, labels = batch
    cached = _cached(teacher, K)
    with pytest.raises(ValueError, match="mse.*raw teacher logits"):
        sparse_distillation_loss(student, *cached, labels, loss_type={"forward_kl": 0.5, "mse": 0.5})
    with pytest.raises(ValueError, match="topk_ids"):
        sparse_distillation_loss(student, cached[0][:, :3], *cached[1:], labels)
    with pytest.raises(ValueError, match="needs labels"):
        sparse_distillation_loss(student, *cached, None, alpha=0.5)
    with pytest.raises(ValueError, match=r"in \[0, 13\)"):
        sparse_distillation_loss(student, cached[0] + V, *cached[1:], labels)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_fused_sparse_equals_sparse_on_full_logits(chunk_size, alpha):
    """The chunked path (hidden @ W.T per chunk) gives the full-logit sparse loss: value and every gradient."""
    from hf_kd import fused_sparse_distillation_loss

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ids, top, tail = _cached(3 * torch.randn(2, 5, V, generator=g, dtype=torch.float64), K)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, :3] = -100
    knobs = dict(loss_type={"forward_kl": 0.7, "jsd": 0.3}, temperature=2.0, alpha=alpha, num_items_in_batch=11)
    expected = sparse_distillation_loss(hidden @ weight.T, ids, top, tail, labels, **knobs)
    want = torch.autograd.grad(expected, (hidden, weight))
    got = fused_sparse_distillation_loss(hidden, weight, ids, top, tail, labels, chunk_size=chunk_size, **knobs)
    grads = torch.autograd.grad(got, (hidden, weight))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert expected.item() > 0

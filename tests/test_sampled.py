"""reverse_kl_sampled: the sampled-token estimator of KL(p_s || p_t), against its expectation (exact and sampled),
and on a top-k teacher (the dense path, the sparse loss, the fused loss)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_kd import distillation_loss, fused_sparse_distillation_loss, sparse_distillation_loss
from hf_kd.objective.losses import Objective

N, V = 5, 7


def logits(seed: int, rows: int = N, vocab: int = V, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def estimator_at(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, temperature: float):
    """The estimator's value [N] at tokens y [N] and its gradient w.r.t. the student's logits [N, V] (rows are
    independent: one backward of the sum gives each row's own)."""
    leaf = student.clone().requires_grad_(True)
    value = Objective("reverse_kl_sampled", temperature).divergence(leaf, teacher, y)
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad


def exact(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """T^2 KL(p_s || p_t) per row from the definition, and its gradient w.r.t. the student's logits."""
    leaf = student.clone().requires_grad_(True)
    log_s, log_t = torch.log_softmax(leaf / temperature, -1), torch.log_softmax(teacher / temperature, -1)
    value = temperature**2 * (log_s.exp() * (log_s - log_t)).sum(-1)
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_its_expectation_over_every_token_is_the_exact_kl_and_gradient(temperature):
    """sum_y p_s(y) * estimator(y) over the whole vocabulary (no sampling): the exact reverse KL and its gradient, to
    float64 rounding (the score function's mean sum_y p_s(y) grad log p_s(y) is 0)."""
    student, teacher = logits(0), logits(1)
    p_s = torch.softmax(student / temperature, -1)
    mean_value, mean_grad = torch.zeros(N, dtype=torch.float64), torch.zeros(N, V, dtype=torch.float64)
    for token in range(V):
        value, grad = estimator_at(student, teacher, torch.full((N,), token), temperature)
        mean_value += p_s[:, token] * value
        mean_grad += p_s[:, token, None] * grad
    kl, kl_grad = exact(student, teacher, temperature)
    assert torch.allclose(mean_value, kl, rtol=1e-12, atol=1e-13)
    assert torch.allclose(mean_grad, kl_grad, rtol=1e-10, atol=1e-12)


def test_the_mean_over_sampled_tokens_converges_to_the_kl_and_gradient():
    """y ~ p_s, 40000 draws per row (seeded): the sample means are within 5 standard errors (the draws' own standard
    deviation / sqrt(40000)) of the exact value and of every gradient entry."""
    draws = 40_000
    student, teacher = logits(2), logits(3)
    p_s = torch.softmax(student, -1)
    y = torch.multinomial(p_s, draws, replacement=True, generator=torch.Generator().manual_seed(4))  # [N, draws]
    values, grads = [], []
    for token in range(V):  # the estimator at each token once; the draws pick among them
        value, grad = estimator_at(student, teacher, torch.full((N,), token), 1.0)
        values.append(value)
        grads.append(grad)
    values, grads = torch.stack(values, -1), torch.stack(grads, 1)  # [N, V] and [N, V(token), V(logit)]
    sampled_values = values.gather(1, y)  # [N, draws]
    sampled_grads = grads[torch.arange(N)[:, None], y]  # [N, draws, V]
    kl, kl_grad = exact(student, teacher, 1.0)
    error = sampled_values.std(1) / math.sqrt(draws)
    assert ((sampled_values.mean(1) - kl).abs() <= 5 * error).all()
    grad_error = sampled_grads.std(1) / math.sqrt(draws)
    assert ((sampled_grads.mean(1) - kl_grad).abs() <= 5 * grad_error + 1e-12).all()
    assert (error < 0.05).all()  # a meaningful bound: the standard error is small against the KL values
    assert (kl > 0.1).all()


def test_on_a_full_top_k_it_is_the_dense_estimator():
    """k = V (nothing in the tail): the sparse and the fused sparse losses give the dense loss's value and
    gradients, CE included."""
    student, teacher = logits(5, rows=12), logits(6, rows=12)
    labels = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(7))
    labels[3] = -100
    log_t = torch.log_softmax(teacher, -1)
    top, ids = log_t.topk(V, -1)
    kwargs = dict(loss_type="reverse_kl_sampled", alpha=0.7, temperature=1.5)
    leaf = student.clone().requires_grad_(True)
    dense = distillation_loss(leaf, teacher, labels, **kwargs)
    (dense_grad,) = torch.autograd.grad(dense, leaf)
    leaf = student.clone().requires_grad_(True)
    tail = torch.full((12,), -math.inf, dtype=torch.float64)
    sparse = sparse_distillation_loss(leaf, ids, top, tail, labels, **kwargs)
    (sparse_grad,) = torch.autograd.grad(sparse, leaf)
    assert torch.allclose(dense, sparse, rtol=1e-12) and torch.allclose(dense_grad, sparse_grad, atol=1e-12)
    weight = torch.diag(torch.ones(V, dtype=torch.float64))
    hidden = student.clone().requires_grad_(True)
    fused = fused_sparse_distillation_loss(hidden, weight, ids, top, tail, labels, chunk_size=5, **kwargs)
    (fused_grad,) = torch.autograd.grad(fused, hidden)
    assert torch.allclose(dense, fused, rtol=1e-12) and torch.allclose(dense_grad, fused_grad, atol=1e-12)


def test_a_token_outside_the_top_k_reads_the_tail_spread_uniformly():
    """k < V: per position r = log p_s(y) - log p_t(y), log p_t(y) = the top-k log-prob of y, or tail - log(V - k)
    outside it; gradient r * grad log p_s(y) -- a reference written token by token, on the sparse and fused paths."""
    k, rows = 3, 9
    student, teacher = logits(8, rows=rows), logits(9, rows=rows)
    log_t = torch.log_softmax(teacher, -1)
    top, ids = log_t.topk(k, -1)
    tail = torch.log1p(-top.exp().sum(-1))
    labels = torch.randint(0, V, (rows,), generator=torch.Generator().manual_seed(10))
    labels[0], labels[1] = ids[0, 1], ids[1, 2]  # some inside the top-k, most outside
    leaf = student.clone().requires_grad_(True)
    log_s = torch.log_softmax(leaf, -1)
    reference = 0
    for row in range(rows):
        y = int(labels[row])
        where = (ids[row] == y).nonzero()
        log_ty = top[row, where[0, 0]] if len(where) else tail[row] - math.log(V - k)
        r = (log_s[row, y] - log_ty).detach()
        reference = reference + r + r * (log_s[row, y] - log_s[row, y].detach())
    reference = reference / rows
    (reference_grad,) = torch.autograd.grad(reference, leaf)
    for path in ("sparse", "fused"):
        leaf = student.clone().requires_grad_(True)
        if path == "sparse":
            loss = sparse_distillation_loss(leaf, ids, top, tail, labels, loss_type="reverse_kl_sampled")
        else:
            weight = torch.eye(V, dtype=torch.float64)
            loss = fused_sparse_distillation_loss(
                leaf, weight, ids, top, tail, labels, loss_type="reverse_kl_sampled", chunk_size=4
            )
        (grad,) = torch.autograd.grad(loss, leaf)
        assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-12), path
        assert torch.allclose(grad, reference_grad, atol=1e-12), path


def test_refusals():
    student, teacher = logits(11), logits(12)
    top, ids = torch.log_softmax(teacher, -1).topk(3, -1)
    tail = torch.log1p(-top.exp().sum(-1))
    with pytest.raises(ValueError, match="reads the token sampled at each position"):
        distillation_loss(student, teacher, None, loss_type="reverse_kl_sampled")
    with pytest.raises(ValueError, match="reads the token sampled at each position"):
        fused_sparse_distillation_loss(
            student, torch.eye(V, dtype=torch.float64), ids, top, tail, None, loss_type="reverse_kl_sampled"
        )
    with pytest.raises(ValueError, match="splits the tail bucket at the sampled token"):
        labels = torch.zeros(N, dtype=torch.long)
        sparse_distillation_loss(student, ids, top, tail, labels, loss_type={"reverse_kl_sampled": 1, "jsd": 1})


def test_an_out_of_range_sampled_id_is_the_one_line_error_on_the_dense_and_fused_paths():
    """The estimator gathers at the label ids: an id past the vocabulary is refused by name, not an IndexError."""
    from hf_kd.models.heads import LMHeadSpec
    from hf_kd.objective.fused import fused_objective
    from hf_kd.objective.losses import distillation_loss
    from hf_kd.objective.signals import StudentHidden, TeacherLogits

    torch.manual_seed(0)
    hidden, weight, teacher = torch.randn(1, 3, 4), torch.randn(6, 4), torch.randn(1, 3, 6)
    labels = torch.tensor([[1, 9, -100]])  # 9 >= V = 6
    with pytest.raises(ValueError, match=r"labels: ids must be in \[0, 6\)"):
        distillation_loss(hidden @ weight.T, teacher, labels, loss_type="reverse_kl_sampled")
    with pytest.raises(ValueError, match=r"labels: ids must be in \[0, 6\)"):
        fused_objective(
            StudentHidden(hidden, LMHeadSpec(weight, None, None, None)),
            TeacherLogits(teacher),
            labels,
            Objective(loss_type="reverse_kl_sampled"),
        )

"""Tests for hf_kd.objective.losses.distillation_loss against an independent float64 reference.

The reference below is written from the definitions, one position at a time: softmax as exp(z - max) / sum, KL as
sum p * log(p / q), mixtures formed explicitly, CE as -log softmax(student)[label]. It shares no code with the
library, so an argument-order, mixture-weight, temperature or normalization slip shows up as a value mismatch.
"""

import math

import pytest
import torch

from hf_kd import distillation_loss

SINGLE_TYPES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "mse"]
TEMPERATURES = [0.5, 1.0, 2.0, 4.0]
V = 13  # small odd vocab: fast, and no accidental symmetry

# rtol/atol per input dtype: float64 inputs must reproduce the reference almost exactly; float32 to rounding.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=2e-6)}


# ---------------------------------------------------------------- reference (float64, from the definitions)


def _probs(x, temperature):
    """softmax(x / T) of one position's logits [V], by hand."""
    z = x / temperature
    e = torch.exp(z - z.max())
    return e / e.sum()


def _kl(p, q):
    """KL(p || q) = sum_i p_i log(p_i / q_i) for strictly positive p, q."""
    return (p * torch.log(p / q)).sum()


def _divergence(name, s, t, temperature, scale, beta, lam):
    """One position's divergence between student logits s [V] and teacher logits t [V]."""
    if name == "mse":  # raw logits: no temperature, no T^2
        return ((s - t) ** 2).sum() / s.numel()
    ps, pt = _probs(s, temperature), _probs(t, temperature)
    if name == "forward_kl":
        d = _kl(pt, ps)
    elif name == "reverse_kl":
        d = _kl(ps, pt)
    elif name == "jsd":
        m = beta * pt + (1 - beta) * ps
        d = beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
    elif name == "skew_forward_kl":
        d = _kl(pt, lam * pt + (1 - lam) * ps)
    elif name == "skew_reverse_kl":
        d = _kl(ps, lam * ps + (1 - lam) * pt)
    elif name == "tvd":
        d = 0.5 * (pt - ps).abs().sum()
    else:
        raise AssertionError(name)
    return d * temperature**2 if scale else d


def reference(
    student,
    teacher,
    labels=None,
    loss_type="forward_kl",
    temperature=1.0,
    alpha=1.0,
    ignore_index=-100,
    num_items_in_batch=None,
    jsd_beta=0.5,
    skew_lambda=0.1,
    scale_by_temperature=True,
):
    """(total, divergence, ce) in float64; ce is None without labels. Differentiable w.r.t. student."""
    vocab = student.shape[-1]
    s_rows = student.to(torch.float64).reshape(-1, vocab)
    t_rows = teacher.to(torch.float64).reshape(-1, vocab)
    label_list = None if labels is None else labels.reshape(-1).tolist()
    weights = loss_type if isinstance(loss_type, dict) else {loss_type: 1.0}
    div_sum = torch.zeros((), dtype=torch.float64)
    ce_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    for i in range(s_rows.shape[0]):
        if label_list is not None and label_list[i] == ignore_index:
            continue
        count += 1
        for name, w in weights.items():
            div_sum = div_sum + w * _divergence(
                name, s_rows[i], t_rows[i], temperature, scale_by_temperature, jsd_beta, skew_lambda
            )
        if label_list is not None:
            ce_sum = ce_sum - torch.log(_probs(s_rows[i], 1.0)[label_list[i]])  # CE always at T = 1
    denom = float(num_items_in_batch) if num_items_in_batch is not None else max(count, 1)
    div = div_sum / denom
    ce = None if labels is None else ce_sum / denom
    total = div if ce is None else alpha * div + (1 - alpha) * ce
    return total, div, ce


def make_inputs(shape=(2, 5), seed=0, dtype=torch.float32, scale=2.0, ignore_index=-100, mask_frac=0.3):
    """Random student/teacher logits [*shape, V] and labels [*shape] with some positions set to ignore_index.

    The first position is always masked and the second always valid, so every case exercises the mask.
    """
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(*shape, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(*shape, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, V, shape, generator=g)
    if 0 <= ignore_index < V:  # a custom in-vocab ignore_index: keep it out of the valid labels
        labels[labels == ignore_index] = (ignore_index + 1) % V
    labels[torch.rand(shape, generator=g) < mask_frac] = ignore_index
    labels.view(-1)[0] = ignore_index
    labels.view(-1)[1] = (ignore_index + 2) % V if 0 <= ignore_index < V else 2
    return student, teacher, labels


def assert_close(actual, expected, dtype=torch.float64, **overrides):
    tol = dict(TOL.get(dtype, TOL[torch.float32]), **overrides)
    torch.testing.assert_close(actual.to(torch.float64), expected.detach().to(torch.float64), **tol)


# ---------------------------------------------------------------- values against the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale_by_temperature", [True, False])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("loss_type", SINGLE_TYPES)
def test_every_type_matches_reference(loss_type, temperature, scale_by_temperature, dtype):
    student, teacher, labels = make_inputs(dtype=dtype, seed=1)
    kwargs = dict(
        loss_type=loss_type,
        temperature=temperature,
        scale_by_temperature=scale_by_temperature,
        jsd_beta=0.3,
        skew_lambda=0.25,
    )  # asymmetric beta/lambda: argument order matters
    loss = distillation_loss(student, teacher, labels, **kwargs)
    expected, _, _ = reference(student, teacher, labels, **kwargs)
    assert loss.dim() == 0
    assert loss.dtype == dtype
    assert_close(loss, expected, dtype)


@pytest.mark.parametrize("shape", [(2, 5), (7,)], ids=["BSV", "NV"])
@pytest.mark.parametrize("loss_type", SINGLE_TYPES)
def test_shapes_3d_and_2d(loss_type, shape):
    student, teacher, labels = make_inputs(shape=shape, seed=2, dtype=torch.float64)
    loss = distillation_loss(student, teacher, labels, loss_type=loss_type, temperature=2.0)
    expected, _, _ = reference(student, teacher, labels, loss_type=loss_type, temperature=2.0)
    assert_close(loss, expected)
    # flattening [B, S, V] -> [B*S, V] must not change anything
    flat = distillation_loss(
        student.reshape(-1, V), teacher.reshape(-1, V), labels.reshape(-1), loss_type=loss_type, temperature=2.0
    )
    assert_close(flat, expected)


@pytest.mark.parametrize("ignore_index", [-100, -1, 5])
@pytest.mark.parametrize("loss_type", ["forward_kl", "jsd", "mse"])
def test_mask_with_ignore_index(loss_type, ignore_index):
    student, teacher, labels = make_inputs(seed=3, dtype=torch.float64, ignore_index=ignore_index, mask_frac=0.5)
    kwargs = dict(loss_type=loss_type, alpha=0.3, ignore_index=ignore_index, temperature=2.0)
    loss = distillation_loss(student, teacher, labels, **kwargs)
    expected, _, _ = reference(student, teacher, labels, **kwargs)
    assert_close(loss, expected)
    # Masked positions must not matter at all: scrambling their logits leaves the loss unchanged.
    masked = labels == ignore_index
    student2, teacher2 = student.clone(), teacher.clone()
    student2[masked] = 50.0 * torch.randn(
        student2[masked].shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64
    )
    teacher2[masked] = -student2[masked]
    assert_close(distillation_loss(student2, teacher2, labels, **kwargs), expected)


def test_labels_none_counts_every_position():
    student, teacher, labels = make_inputs(seed=4, dtype=torch.float64)
    loss = distillation_loss(student, teacher, None, loss_type="reverse_kl", temperature=2.0)
    expected, _, _ = reference(student, teacher, None, loss_type="reverse_kl", temperature=2.0)
    assert_close(loss, expected)
    all_valid = distillation_loss(student, teacher, torch.zeros_like(labels), loss_type="reverse_kl", temperature=2.0)
    assert_close(all_valid, expected)
    masked = distillation_loss(student, teacher, labels, loss_type="reverse_kl", temperature=2.0)
    assert not torch.isclose(masked, loss)  # the mask really removed positions in this sample


@pytest.mark.parametrize(
    "weights",
    [
        {"forward_kl": 0.5, "reverse_kl": 0.5},
        {"forward_kl": 0.7, "mse": 2.0},
        {"jsd": 1.0, "tvd": 0.25, "skew_reverse_kl": 3.0},
        {"skew_forward_kl": 0.0, "reverse_kl": 1.5},
    ],
    ids=lambda w: "+".join(w),
)
def test_mixture_is_weighted_sum(weights):
    student, teacher, labels = make_inputs(seed=5, dtype=torch.float64)
    common = dict(temperature=2.0, jsd_beta=0.3, skew_lambda=0.25)
    mixed = distillation_loss(student, teacher, labels, loss_type=weights, **common)
    singles = sum(
        w * distillation_loss(student, teacher, labels, loss_type=name, **common) for name, w in weights.items()
    )
    assert_close(mixed, singles)
    assert_close(mixed, reference(student, teacher, labels, loss_type=weights, **common)[0])
    # With alpha < 1 the CE term is added once, not once per mixture entry.
    with_ce = distillation_loss(student, teacher, labels, loss_type=weights, alpha=0.3, **common)
    assert_close(with_ce, reference(student, teacher, labels, loss_type=weights, alpha=0.3, **common)[0])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "mse"])
def test_alpha_mixes_in_cross_entropy(loss_type, temperature, alpha):
    student, teacher, labels = make_inputs(seed=6, dtype=torch.float64)
    kwargs = dict(loss_type=loss_type, temperature=temperature, alpha=alpha)
    loss = distillation_loss(student, teacher, labels, **kwargs)
    assert_close(loss, reference(student, teacher, labels, **kwargs)[0])
    if alpha == 0.0:  # pure CE at T = 1, exactly torch's token-mean cross entropy
        ce = torch.nn.functional.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
        assert_close(loss, ce)


@pytest.mark.parametrize("num_items", [3, 11, torch.tensor(11), torch.tensor(7.0)], ids=["3", "11", "t11", "t7f"])
@pytest.mark.parametrize("loss_type", ["forward_kl", "tvd"])
def test_num_items_in_batch(loss_type, num_items):
    student, teacher, labels = make_inputs(seed=7, dtype=torch.float64)
    kwargs = dict(loss_type=loss_type, alpha=0.3, temperature=2.0)
    loss = distillation_loss(student, teacher, labels, num_items_in_batch=num_items, **kwargs)
    expected, _, _ = reference(student, teacher, labels, num_items_in_batch=num_items, **kwargs)
    assert_close(loss, expected)
    # Same sum, different divisor: loss * num_items equals the per-position mean times the valid count.
    mean = distillation_loss(student, teacher, labels, **kwargs)
    n_valid = int((labels != -100).sum())
    assert_close(loss * float(num_items), mean * n_valid)


@pytest.mark.parametrize("num_items", [None, 4])
@pytest.mark.parametrize("loss_type", SINGLE_TYPES)
def test_all_masked_is_zero_with_finite_gradient(loss_type, num_items):
    student, teacher, labels = make_inputs(seed=8)
    student.requires_grad_(True)
    labels = torch.full_like(labels, -100)
    loss = distillation_loss(student, teacher, labels, loss_type=loss_type, alpha=0.3, num_items_in_batch=num_items)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.equal(grad, torch.zeros_like(student))


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", SINGLE_TYPES)
def test_low_precision_inputs_computed_in_float32(loss_type, in_dtype):
    student, teacher, labels = make_inputs(seed=9, dtype=in_dtype)
    kwargs = dict(loss_type=loss_type, temperature=2.0, alpha=0.3)
    loss = distillation_loss(student, teacher, labels, **kwargs)
    assert loss.dtype == torch.float32
    # Reference on the exact low-precision values, upcast: only float32 rounding may separate them.
    expected, _, _ = reference(student.double(), teacher.double(), labels, **kwargs)
    assert_close(loss, expected, torch.float32)


@pytest.mark.parametrize("loss_type", SINGLE_TYPES)
def test_float64_stays_float64(loss_type):
    student, teacher, labels = make_inputs(seed=10, dtype=torch.float64)
    total, div, ce = distillation_loss(student, teacher, labels, loss_type=loss_type, alpha=0.3, return_components=True)
    assert total.dtype == div.dtype == ce.dtype == torch.float64


@pytest.mark.parametrize("loss_type", SINGLE_TYPES)
def test_large_logits_stay_finite(loss_type):
    # Logits spanning ~+-90 at T = 0.5: many probabilities underflow float32; the loss must not become inf/nan.
    student, teacher, labels = make_inputs(seed=11, scale=30.0)
    kwargs = dict(loss_type=loss_type, temperature=0.5, alpha=0.3)
    loss = distillation_loss(student, teacher, labels, **kwargs)
    assert torch.isfinite(loss)
    expected, _, _ = reference(student, teacher, labels, **kwargs)
    assert_close(loss, expected, torch.float32, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- properties of the divergences


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints_are_zero(beta, dtype):
    student, teacher, labels = make_inputs(seed=12, dtype=dtype)
    loss = distillation_loss(student, teacher, labels, loss_type="jsd", jsd_beta=beta, temperature=2.0)
    assert abs(loss.item()) < 1e-6
    # and not identically zero in between
    mid = distillation_loss(student, teacher, labels, loss_type="jsd", jsd_beta=0.5, temperature=2.0)
    assert mid.item() > 1e-2


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss_type="jsd", jsd_beta=0.0),
        dict(loss_type="jsd", jsd_beta=1.0),
        dict(loss_type="skew_forward_kl", skew_lambda=1.0),
        dict(loss_type="skew_reverse_kl", skew_lambda=1.0),
    ],
    ids=["jsd-beta0", "jsd-beta1", "skew_fwd-lambda1", "skew_rev-lambda1"],
)
def test_zero_divergence_settings_still_backpropagate(kwargs):
    # These settings are accepted and make the divergence identically 0; a Trainer still calls backward on the loss,
    # so it must come with a graph and an all-zero, finite gradient (not "does not require grad").
    student, teacher, labels = make_inputs(seed=12)
    student.requires_grad_(True)
    loss = distillation_loss(student, teacher, labels, temperature=2.0, **kwargs)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all()
    assert grad.abs().max().item() < 1e-6


def test_swapping_student_and_teacher():
    s, t, labels = make_inputs(seed=13, dtype=torch.float64)

    def loss(a, b, loss_type, **kw):
        return distillation_loss(a, b, labels, loss_type=loss_type, temperature=2.0, **kw)

    assert_close(loss(s, t, "jsd", jsd_beta=0.5), loss(t, s, "jsd", jsd_beta=0.5))
    assert_close(loss(s, t, "jsd", jsd_beta=0.3), loss(t, s, "jsd", jsd_beta=0.7))
    assert_close(loss(s, t, "forward_kl"), loss(t, s, "reverse_kl"))
    assert_close(loss(s, t, "skew_forward_kl", skew_lambda=0.25), loss(t, s, "skew_reverse_kl", skew_lambda=0.25))
    assert_close(loss(s, t, "tvd"), loss(t, s, "tvd"))
    # forward and reverse KL genuinely differ on this sample, so the identities above are not vacuous
    assert abs(loss(s, t, "forward_kl").item() - loss(s, t, "reverse_kl").item()) > 1e-3
    assert abs(loss(s, t, "jsd", jsd_beta=0.3).item() - loss(s, t, "jsd", jsd_beta=0.7).item()) > 1e-4


def test_skew_lambda_endpoints():
    s, t, labels = make_inputs(seed=14, dtype=torch.float64)
    kw = dict(temperature=2.0)
    assert_close(
        distillation_loss(s, t, labels, loss_type="skew_forward_kl", skew_lambda=0.0, **kw),
        distillation_loss(s, t, labels, loss_type="forward_kl", **kw),
    )
    assert_close(
        distillation_loss(s, t, labels, loss_type="skew_reverse_kl", skew_lambda=0.0, **kw),
        distillation_loss(s, t, labels, loss_type="reverse_kl", **kw),
    )
    for name in ["skew_forward_kl", "skew_reverse_kl"]:
        assert abs(distillation_loss(s, t, labels, loss_type=name, skew_lambda=1.0, **kw).item()) < 1e-12


def test_high_temperature_limit_of_forward_kl_is_half_mse():
    # For zero-mean logits, T^2 * KL(softmax(t/T) || softmax(s/T)) -> mean((s - t)^2) / 2 as T -> inf.
    s, t, _ = make_inputs(shape=(6,), seed=15, dtype=torch.float64, scale=3.0)
    s, t = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    mse = distillation_loss(s, t, loss_type="mse")

    def ratio(temperature):
        return (distillation_loss(s, t, loss_type="forward_kl", temperature=temperature) / mse).item()

    assert abs(ratio(1000.0) - 0.5) < 1e-2
    assert abs(ratio(100.0) - 0.5) < 5e-2
    assert abs(ratio(1.0) - 0.5) > 0.1
    # mse itself ignores temperature and the T^2 factor
    assert_close(distillation_loss(s, t, loss_type="mse", temperature=4.0), mse)
    assert_close(distillation_loss(s, t, loss_type="mse", temperature=4.0, scale_by_temperature=False), mse)


# ---------------------------------------------------------------- gradients and components


@pytest.mark.parametrize("loss_type", SINGLE_TYPES + [{"forward_kl": 0.5, "jsd": 0.5, "mse": 0.1}])
def test_gradient_matches_reference(loss_type):
    student, teacher, labels = make_inputs(seed=16, dtype=torch.float64)
    student.requires_grad_(True)
    kwargs = dict(loss_type=loss_type, temperature=2.0, alpha=0.3, jsd_beta=0.3, skew_lambda=0.25)
    (grad,) = torch.autograd.grad(distillation_loss(student, teacher, labels, **kwargs), student)
    (expected,) = torch.autograd.grad(reference(student, teacher, labels, **kwargs)[0], student)
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-12)
    assert grad[labels == -100].abs().max().item() == 0.0  # masked positions get no gradient


@pytest.mark.parametrize("num_items", [None, 9])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("loss_type", ["forward_kl", "skew_reverse_kl", {"reverse_kl": 0.6, "tvd": 0.4}])
def test_return_components(loss_type, alpha, num_items):
    student, teacher, labels = make_inputs(seed=17, dtype=torch.float64)
    kwargs = dict(loss_type=loss_type, alpha=alpha, temperature=2.0, num_items_in_batch=num_items)
    total, div, ce = distillation_loss(student, teacher, labels, return_components=True, **kwargs)
    ref_total, ref_div, ref_ce = reference(student, teacher, labels, **kwargs)
    assert_close(total, ref_total)
    assert_close(div, ref_div)
    assert_close(ce, ref_ce)
    assert_close(total, alpha * div + (1 - alpha) * ce)
    assert_close(distillation_loss(student, teacher, labels, **kwargs), total)


def test_return_components_without_labels():
    student, teacher, _ = make_inputs(seed=18, dtype=torch.float64)
    total, div, ce = distillation_loss(student, teacher, None, loss_type="jsd", return_components=True)
    assert ce is None
    assert_close(total, div)
    assert_close(div, reference(student, teacher, None, loss_type="jsd")[1])


# ---------------------------------------------------------------- argument errors


def _call(**overrides):
    student, teacher, labels = make_inputs(seed=19)
    kwargs = dict(student_logits=student, teacher_logits=teacher, labels=labels)
    kwargs.update(overrides)
    return lambda: distillation_loss(**kwargs)


_LABELS = make_inputs(seed=20)[2]  # [2, 5], for the wrong-shape cases


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(loss_type="kl"), "loss_type"),
        (dict(loss_type={"forward_kl": 1.0, "bogus": 1.0}), "loss_type"),
        (dict(loss_type={"forward_kl": 1.0, "reverse_kl": -0.5}), "loss_type"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=1.1), "alpha"),
        (dict(teacher_logits=torch.zeros(2, 5, V + 1)), "student_logits|teacher_logits"),
        (dict(teacher_logits=torch.zeros(2, 4, V)), "student_logits|teacher_logits"),
        (dict(labels=_LABELS[:, :4]), "labels"),
        (dict(labels=_LABELS.reshape(-1)), "labels"),
        (dict(labels=None, alpha=0.5), "labels|alpha"),
        (dict(loss_type="jsd", jsd_beta=-0.1), "jsd_beta"),
        (dict(loss_type="jsd", jsd_beta=1.5), "jsd_beta"),
        (dict(loss_type="skew_forward_kl", skew_lambda=-0.1), "skew_lambda"),
        (dict(loss_type="skew_reverse_kl", skew_lambda=1.1), "skew_lambda"),
    ],
    ids=lambda x: None if isinstance(x, dict) else x,
)
def test_invalid_arguments_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(**overrides)()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(alpha=0.0),
        dict(alpha=1.0),
        dict(loss_type="jsd", jsd_beta=1.0),
        dict(loss_type="skew_forward_kl", skew_lambda=1.0),
        dict(loss_type={"forward_kl": 0.0, "tvd": 1.0}),
    ],
)
def test_boundary_arguments_are_accepted(overrides):
    assert math.isfinite(_call(**overrides)().item())

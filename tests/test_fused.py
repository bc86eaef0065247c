"""Tests for hf_kd.objective.fused: the chunked lm_head + loss against distillation_loss on explicitly built full logits.

The reference builds ``softcap(scale * (hidden @ W.T + bias))[:, :vocab]`` for both models, runs
:func:`hf_kd.distillation_loss` on it and differentiates with autograd; the fused path never sees those logits. Any
slip in chunking, masking, normalization, the logit recipe or the stored gradients shows up as a mismatch.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

from hf_kd import distillation_loss
from hf_kd.objective.fused import LMHeadSpec, fused_distillation_loss, lm_head_spec

LOSS_TYPES = [
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "mse",
    {"forward_kl": 0.5, "tvd": 0.2, "mse": 0.3},
]
N, H_S, H_T, V = 23, 6, 10, 17  # N = 23 is prime: chunk sizes 4 and 8 leave a ragged last chunk
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
HYPER = dict(temperature=2.0, jsd_beta=0.3, skew_lambda=0.25)  # T != 1 and asymmetric beta/lambda


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: OpenMP wake-ups on a busy 2-core machine cost ~100x the arithmetic (0.3 s vs 3 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(dtype=torch.float64, n=N, v_s=V, v_t=V, bias=False, seed=0, masked=(0, 5, 6)):
    """Student/teacher hidden states and heads; labels with the positions in ``masked`` at -100."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    inputs = dict(
        student_hidden=rand(n, H_S).requires_grad_(),
        student_weight=rand(v_s, H_S, scale=0.8).requires_grad_(),
        teacher_hidden=rand(n, H_T).requires_grad_(),  # must never receive a gradient
        teacher_weight=rand(v_t, H_T, scale=0.8).requires_grad_(),
        labels=torch.randint(0, V, (n,), generator=g),  # within the shared vocab when cut
    )
    inputs["labels"][list(masked)] = -100
    if bias:
        inputs["student_bias"] = rand(v_s).requires_grad_()
        inputs["teacher_bias"] = rand(v_t)
    return inputs


def full_logits(hidden, weight, bias=None, logit_scale=None, softcap=None, vocab_size=None):
    """The logits a model would produce, built the obvious way (the [N, V] tensor the fused path avoids)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits if vocab_size is None else logits[:, :vocab_size]


def reference(inputs, *, upcast=False, **kwargs):
    """distillation_loss on full logits. ``upcast``: compute in float32 from low-precision inputs."""
    get = (lambda name: None if inputs.get(name) is None else inputs[name].float()) if upcast else inputs.get
    logit_kwargs = {
        side: {k: kwargs.pop(f"{side}_{k}", None) for k in ("logit_scale", "softcap")}
        for side in ("student", "teacher")
    }
    vocab_size = kwargs.pop("vocab_size", None)
    kwargs.pop("chunk_size", None)
    student = full_logits(
        get("student_hidden"),
        get("student_weight"),
        get("student_bias"),
        vocab_size=vocab_size,
        **logit_kwargs["student"],
    )
    teacher = full_logits(
        get("teacher_hidden"),
        get("teacher_weight"),
        get("teacher_bias"),
        vocab_size=vocab_size,
        **logit_kwargs["teacher"],
    )
    return distillation_loss(student, teacher, inputs["labels"], **kwargs)


def fused(inputs, **kwargs):
    return fused_distillation_loss(
        inputs["student_hidden"],
        inputs["student_weight"],
        inputs["teacher_hidden"],
        inputs["teacher_weight"],
        inputs["labels"],
        student_bias=inputs.get("student_bias"),
        teacher_bias=inputs.get("teacher_bias"),
        **kwargs,
    )


def student_grads(loss, inputs):
    names = [n for n in ("student_hidden", "student_weight", "student_bias") if n in inputs]
    return dict(zip(names, torch.autograd.grad(loss, [inputs[n] for n in names])))


def assert_matches(inputs, dtype=torch.float64, **kwargs):
    """Fused == reference in value, components and every student gradient; returns the fused components."""
    expected = reference(inputs, return_components=True, **kwargs)
    actual = fused(inputs, return_components=True, **kwargs)
    assert actual[0].requires_grad and not any(c is not None and c.requires_grad for c in actual[1:])
    for got, want in zip(actual, expected):
        if want is None:
            assert got is None
        else:
            assert got.dtype == want.dtype and got.dim() == 0
            torch.testing.assert_close(got, want.detach(), **TOL[dtype])
    want_grads, got_grads = student_grads(expected[0], inputs), student_grads(actual[0], inputs)
    for name in want_grads:
        assert got_grads[name].dtype == inputs[name].dtype
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOL[dtype], msg=name)
    return actual


# ---------------------------------------------------------------- values and gradients against full logits


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("loss_type", LOSS_TYPES, ids=lambda t: t if isinstance(t, str) else "mixture")
def test_every_loss_type_and_alpha(loss_type, alpha, dtype):
    assert_matches(make(dtype), dtype, loss_type=loss_type, alpha=alpha, chunk_size=8, **HYPER)


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 23, 1024], ids=lambda c: f"chunk{c}")
def test_chunk_sizes(chunk_size):
    """Ragged last chunk (4, 8), one row per chunk (1), exactly N (23), N < chunk_size (1024)."""
    inputs = make()
    total, _, _ = assert_matches(inputs, chunk_size=chunk_size, loss_type="jsd", alpha=0.5, **HYPER)
    baseline = fused(make(), chunk_size=5, loss_type="jsd", alpha=0.5, **HYPER)
    assert total.item() == pytest.approx(baseline.item(), rel=1e-12)  # chunking does not change the value


def test_all_masked_chunks_are_skipped():
    """Whole chunks of -100 (rows 0-7 and 16-22 with chunk 8): their rows get exactly zero gradient."""
    masked = list(range(8)) + list(range(16, N))
    inputs = make(masked=masked)
    assert_matches(inputs, chunk_size=8, alpha=0.5, **HYPER)
    d_hidden = student_grads(fused(inputs, chunk_size=8, alpha=0.5), inputs)["student_hidden"]
    assert torch.all(d_hidden[masked] == 0) and torch.all(d_hidden[8:16].abs().sum(-1) > 0)


def test_every_position_masked_gives_zero():
    inputs = make(masked=range(N))
    total, divergence, ce = assert_matches(inputs, alpha=0.5)
    assert total.item() == divergence.item() == ce.item() == 0.0


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch(as_tensor):
    count = 57  # e.g. the valid positions of the whole optimizer step, not just this micro-batch
    num_items = torch.tensor(count) if as_tensor else count
    total, _, _ = assert_matches(make(), chunk_size=8, alpha=0.5, num_items_in_batch=num_items, **HYPER)
    per_batch = fused(make(), chunk_size=8, alpha=0.5, **HYPER)
    assert total.item() == pytest.approx(per_batch.item() * (N - 3) / count, rel=1e-12)


def test_labels_none_counts_every_position():
    inputs = make()
    inputs["labels"] = None
    total, divergence, ce = assert_matches(inputs, chunk_size=8, loss_type="reverse_kl", **HYPER)
    assert ce is None
    with_mask = fused(make(), chunk_size=8, loss_type="reverse_kl", **HYPER)
    assert total.item() != pytest.approx(with_mask.item())  # the masked rows count here


def test_softcap_bias_and_logit_scale():
    inputs = make(bias=True)
    knobs = dict(student_softcap=2.5, teacher_softcap=4.0, student_logit_scale=0.7, teacher_logit_scale=1.3)
    total, _, _ = assert_matches(inputs, chunk_size=8, alpha=0.5, **knobs, **HYPER)
    # the knobs matter at these magnitudes: dropping any of them changes the loss
    for name in knobs:
        partial = {k: v for k, v in knobs.items() if k != name}
        assert fused(inputs, alpha=0.5, **partial, **HYPER).item() != pytest.approx(total.item(), rel=1e-3)


def test_bias_gradient_reaches_only_the_student():
    inputs = make(bias=True)
    fused(inputs, chunk_size=8, alpha=0.5).backward()
    assert inputs["student_bias"].grad is not None and inputs["student_bias"].grad.abs().sum() > 0
    for name in ("teacher_hidden", "teacher_weight"):
        assert inputs[name].grad is None


def test_vocab_size_cuts_padded_vocabularies():
    """Student 21 rows, teacher 19, shared 17: the padded student rows get exactly zero weight gradient."""
    inputs = make(v_s=21, v_t=19, bias=True)
    assert_matches(inputs, chunk_size=8, alpha=0.5, vocab_size=V, **HYPER)
    grads = student_grads(fused(inputs, chunk_size=8, alpha=0.5, vocab_size=V), inputs)
    assert torch.all(grads["student_weight"][V:] == 0) and torch.all(grads["student_bias"][V:] == 0)
    assert grads["student_weight"][:V].abs().sum(-1).min() > 0


def test_hidden_with_batch_dims_matches_flat():
    inputs = make(n=24)
    flat = fused(inputs, chunk_size=5, alpha=0.5, **HYPER)
    shaped = {k: v.reshape(4, 6, -1) if k.endswith("hidden") else v for k, v in inputs.items()}
    shaped["labels"] = inputs["labels"].reshape(4, 6)
    torch.testing.assert_close(fused(shaped, chunk_size=5, alpha=0.5, **HYPER), flat, rtol=1e-12, atol=0)


def test_frozen_lm_head_and_no_grad():
    inputs = make()
    inputs["student_weight"].requires_grad_(False)  # e.g. LoRA elsewhere, lm_head frozen
    expected = reference(inputs, alpha=0.5, **HYPER)
    total = fused(inputs, chunk_size=8, alpha=0.5, **HYPER)
    torch.testing.assert_close(total, expected, **TOL[torch.float64])
    (want,), (got,) = (
        torch.autograd.grad(expected, [inputs["student_hidden"]]),
        torch.autograd.grad(total, [inputs["student_hidden"]]),
    )
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    with torch.no_grad():  # evaluation: same value, no graph
        evaluated = fused(inputs, chunk_size=8, alpha=0.5, **HYPER)
    assert not evaluated.requires_grad
    torch.testing.assert_close(evaluated, expected.detach(), **TOL[torch.float64])


def test_backward_scales_by_the_incoming_gradient():
    inputs = make()
    want = student_grads(reference(inputs, alpha=0.5) * 3.0, inputs)
    got = student_grads(fused(inputs, chunk_size=8, alpha=0.5) * 3.0, inputs)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL[torch.float64])


def test_bfloat16_inputs_give_the_float32_loss_of_the_bf16_values():
    inputs = make(torch.bfloat16, bias=True)
    kwargs = dict(chunk_size=8, alpha=0.5, student_softcap=3.0, **HYPER)
    total, divergence, ce = fused(inputs, return_components=True, **kwargs)
    expected = reference(inputs, upcast=True, return_components=True, **kwargs)
    assert total.dtype == torch.float32
    for got, want in zip((total, divergence, ce), expected):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    got_grads = student_grads(total, inputs)
    upcast = {
        k: v.detach().float().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in inputs.items()
    }
    want_grads = student_grads(reference(upcast, **kwargs), upcast)
    for name, got in got_grads.items():
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want_grads[name], rtol=1e-2, atol=1e-4, msg=name)  # one bf16 rounding


def test_autocast_runs_the_head_in_bf16_and_stays_close():
    """Under autocast the head's GEMMs take bf16 inputs (tests/test_mixed_precision.py holds them to the budget);
    the softmax and divergence math stay float32, so the loss moves by ~1e-4, not more."""
    inputs = make(torch.float32)
    expected = fused(inputs, chunk_size=8, alpha=0.5, **HYPER)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = fused(inputs, chunk_size=8, alpha=0.5, **HYPER)
    torch.testing.assert_close(under_autocast, expected, rtol=1e-3, atol=0)
    assert not torch.equal(under_autocast, expected)  # autocast reached the GEMMs


# ---------------------------------------------------------------- errors


def test_errors_shared_with_distillation_loss_read_the_same():
    inputs = make()
    inputs["labels"] = None
    with pytest.raises(ValueError, match="needs labels") as fused_error:
        fused(inputs, alpha=0.5)
    with pytest.raises(ValueError) as core_error:
        reference(inputs, alpha=0.5)
    assert str(fused_error.value) == str(core_error.value)
    inputs = make()
    inputs["labels"][3] = V  # out of the vocabulary
    with pytest.raises(ValueError, match=r"ids must be in \[0, 17\)") as fused_error:
        fused(inputs, alpha=0.5)
    with pytest.raises(ValueError) as core_error:
        reference(inputs, alpha=0.5)
    assert str(fused_error.value) == str(core_error.value)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.update(labels=d["labels"][:-1]), r"labels \(22,\) must match student_hidden"),
        (lambda d: d.update(teacher_hidden=d["teacher_hidden"][:-1]), "student_hidden .* and teacher_hidden"),
        (lambda d: d.update(student_weight=d["student_weight"][:, :-1]), r"student_weight \(17, 5\) .* \[vocab, 6\]"),
        (lambda d: d.update(teacher_weight=d["teacher_weight"][:, :-1]), r"teacher_weight \(17, 9\) .* \[vocab, 10\]"),
        (lambda d: d.update(teacher_weight=d["teacher_weight"][:-2]), "pass vocab_size=15"),
        (lambda d: d.update(student_bias=torch.zeros(V - 1, dtype=torch.float64)), r"student_bias \(16,\)"),
    ],
    ids=["labels-rows", "hidden-rows", "student-H", "teacher-H", "vocab", "bias"],
)
def test_shape_errors_name_the_argument(change, match):
    inputs = make()
    change(inputs)
    with pytest.raises(ValueError, match=match):
        fused(inputs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="kl"), "loss_type: unknown loss 'kl'"),
        (dict(temperature=0.0), "temperature must be"),
        (dict(alpha=1.5), "alpha must be in"),
        (dict(chunk_size=0), "chunk_size must be a positive int"),
        (dict(student_softcap=0.0), "student_softcap must be"),
        (dict(teacher_logit_scale=float("nan")), "teacher_logit_scale must be"),
        (dict(vocab_size=V + 1), r"vocab_size must be an int in \[1, 17\]"),
    ],
)
def test_knob_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fused(make(), **kwargs)


# ---------------------------------------------------------------- real models: lm_head_spec + hidden states


def tiny_model(kind, hidden, seed):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=40,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    if kind == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=False)
    elif kind == "gemma2":
        config = Gemma2Config(**common, head_dim=8, final_logit_softcapping=30.0, sliding_window=16)
    else:
        config = CohereConfig(**common, logit_scale=0.25)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    with torch.no_grad():  # logits of magnitude ~30, so that the softcap and the logit scale really act
        model.get_output_embeddings().weight.mul_(40.0)
    return model


@pytest.mark.parametrize("kind", ["llama", "gemma2", "cohere"])
def test_fused_on_model_hidden_states_matches_model_logits(kind):
    student, teacher = tiny_model(kind, 32, seed=1), tiny_model(kind, 48, seed=2)
    ids = torch.randint(2, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids[:, 1:].clone()  # logits at position i predict the token at i + 1
    labels[:, :3] = -100  # a prompt

    # Unfused: the model's own logits, dropping the last position (it predicts past the sequence).
    s_full = student(ids).logits
    s_logits = s_full[:, :-1]
    with torch.no_grad():
        t_logits = teacher(ids).logits[:, :-1]
    expected = distillation_loss(s_logits, t_logits, labels, alpha=0.5, temperature=2.0)
    expected_grads = torch.autograd.grad(expected, list(student.parameters()))

    # Fused: the post-norm last hidden state, no full logits (zero positions kept), the head from lm_head_spec.
    no_logits = torch.empty(0, dtype=torch.long)
    s_out = student(ids, output_hidden_states=-1, logits_to_keep=no_logits)
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=-1, logits_to_keep=no_logits)
    assert s_out.logits.shape == (2, 0, 40)
    (s_spec, reason), (t_spec, _) = lm_head_spec(student), lm_head_spec(teacher)
    assert reason == "" and s_spec.weight is student.lm_head.weight
    assert (s_spec.softcap, s_spec.logit_scale) == {
        "llama": (None, None),
        "gemma2": (30.0, None),
        "cohere": (None, 0.25),
    }[kind]
    loss = fused_distillation_loss(
        s_out.hidden_states[-1][:, :-1],
        s_spec.weight,
        t_out.hidden_states[-1][:, :-1],
        t_spec.weight,
        labels,
        alpha=0.5,
        temperature=2.0,
        chunk_size=4,
        student_bias=s_spec.bias,
        teacher_bias=t_spec.bias,
        student_softcap=s_spec.softcap,
        teacher_softcap=t_spec.softcap,
        student_logit_scale=s_spec.logit_scale,
        teacher_logit_scale=t_spec.logit_scale,
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # the spec reproduces the model's own logits (evaluation metrics use it chunk by chunk), cut to a vocab prefix
    torch.testing.assert_close(
        s_spec.logits(s_out.hidden_states[-1][0], vocab_size=37), s_full[0, :, :37].detach(), rtol=1e-5, atol=1e-5
    )
    for (name, _), got, want in zip(
        student.named_parameters(), torch.autograd.grad(loss, list(student.parameters())), expected_grads
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    if kind != "llama":  # the head's extra step matters: leaving it out gives another loss
        plain = fused_distillation_loss(
            s_out.hidden_states[-1][:, :-1],
            s_spec.weight,
            t_out.hidden_states[-1][:, :-1],
            t_spec.weight,
            labels,
            alpha=0.5,
            temperature=2.0,
        )
        assert plain.item() != pytest.approx(expected.item(), rel=1e-3)


def test_lm_head_spec_falls_back_with_a_reason():
    from peft import LoraConfig, get_peft_model

    student = tiny_model("llama", 32, seed=1)
    adapted = get_peft_model(student, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    spec, reason = lm_head_spec(adapted)
    assert spec is None and "PEFT adapter" in reason

    plain_head = get_peft_model(tiny_model("llama", 32, seed=1), LoraConfig(r=2, target_modules=["q_proj"]))
    spec, reason = lm_head_spec(plain_head)
    assert isinstance(spec, LMHeadSpec) and reason == ""
    assert spec.weight is plain_head.get_base_model().lm_head.weight

    torch.manual_seed(0)  # Granite divides its logits by logits_scaling: not a head the fused path may assume
    granite = AutoModelForCausalLM.from_config(
        GraniteConfig(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            logits_scaling=8.0,
        )
    )
    spec, reason = lm_head_spec(granite)
    assert spec is None and "'granite'" in reason


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("alpha", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("scale", [True, False])
def test_forward_kl_closed_form_equals_autograd(monkeypatch, temperature, alpha, scale):
    """The closed-form gradient of forward KL (+ CE) against the autograd path it replaces, in float64."""
    import hf_kd.objective.fused as fused

    g = torch.Generator().manual_seed(3)
    s_hidden = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    s_weight = torch.randn(17, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden, t_weight = (
        torch.randn(13, 6, generator=g, dtype=torch.float64),
        torch.randn(17, 6, generator=g, dtype=torch.float64),
    )
    labels = torch.randint(0, 17, (13,), generator=g)
    labels[:4] = -100
    kw = dict(
        loss_type={"forward_kl": 0.7},
        temperature=temperature,
        alpha=alpha,
        scale_by_temperature=scale,
        chunk_size=4,
        return_components=True,
        num_items_in_batch=7,
    )

    def run():
        out = fused.fused_distillation_loss(s_hidden, s_weight, t_hidden, t_weight, labels, **kw)
        return out, torch.autograd.grad(out[0], (s_hidden, s_weight), allow_unused=True)

    calls = []
    original = fused._forward_kl_closed_form
    monkeypatch.setattr(fused, "_forward_kl_closed_form", lambda *a: calls.append(1) or original(*a))
    (total, div, ce), grads = run()
    assert calls  # the closed form really ran
    monkeypatch.setattr(fused, "_closed_form_applies", lambda plan: False)
    (ref_total, ref_div, ref_ce), ref_grads = run()
    for got, want in ((total, ref_total), (div, ref_div), (ce, ref_ce), *zip(grads, ref_grads)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert div.item() > 0 and ce.item() > 0


def test_forward_kl_closed_form_with_minus_inf_teacher_logits():
    """A teacher logit of -inf (p_t = 0 there) contributes 0, as in distillation_loss, not nan."""
    from hf_kd import fused_distillation_loss

    g = torch.Generator().manual_seed(4)
    s_hidden = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    s_weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden, t_weight = (
        torch.randn(9, 6, generator=g, dtype=torch.float64),
        torch.randn(11, 6, generator=g, dtype=torch.float64),
    )
    t_bias = torch.zeros(11, dtype=torch.float64)
    t_bias[[2, 7]] = float("-inf")  # two ids the teacher rules out
    labels = torch.randint(0, 11, (9,), generator=g)
    kw = dict(loss_type="forward_kl", temperature=2.0, alpha=0.6)
    want = distillation_loss(s_hidden @ s_weight.T, t_hidden @ t_weight.T + t_bias, labels, **kw)
    want_grads = torch.autograd.grad(want, (s_hidden, s_weight))
    got = fused_distillation_loss(
        s_hidden, s_weight, t_hidden, t_weight, labels, teacher_bias=t_bias, chunk_size=4, **kw
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (s_hidden, s_weight)), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(got)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_closed_form_in_float32_matches_the_log_softmax_formula(monkeypatch, temperature):
    """float32 at a vocabulary of thousands: the closed form (one softmax per model, log-sum-exps read off the
    softmax, its buffers overwritten) against the autograd path on log-probabilities, ``p_t * (log p_t - log p_s)``
    as distillation_loss computes it: loss to 1e-5, d(weight) to 1e-7. (A teacher close to its student is
    test_trainer's padded-vocabulary case: KL ~0.016 per token, matched to 1e-7.)"""
    import hf_kd.objective.fused as fused_module

    g = torch.Generator().manual_seed(5)
    n, h, v = 70, 16, 5003
    s_hidden = torch.randn(n, h, generator=g, requires_grad=True)
    s_weight = torch.randn(v, h, generator=g).mul_(0.6).requires_grad_()  # logits of std ~2.4, as trained models'
    t_hidden, t_weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g).mul_(0.8)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::9] = -100
    kw = dict(alpha=0.5, temperature=temperature, chunk_size=16, return_components=True)

    def run():
        out = fused_distillation_loss(s_hidden, s_weight, t_hidden, t_weight, labels, **kw)
        return out, torch.autograd.grad(out[0], (s_hidden, s_weight))

    (total, div, ce), (d_hidden, d_weight) = run()
    monkeypatch.setattr(fused_module, "_closed_form_applies", lambda plan: False)
    (ref_total, ref_div, ref_ce), (ref_hidden, ref_weight) = run()
    for got, want in ((total, ref_total), (div, ref_div), (ce, ref_ce)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(d_weight, ref_weight, rtol=0, atol=1e-7)
    torch.testing.assert_close(d_hidden, ref_hidden, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "temperature, names",
    [
        (1.0, {"student", "teacher", "teacher_softmax"}),
        (2.0, {"student", "teacher", "teacher_softmax", "student_softmax"}),  # the CE's softmax at T = 1 besides
    ],
)
def test_every_chunk_reuses_the_calls_buffers(monkeypatch, temperature, names):
    """The closed form works in a few [chunk, V] buffers allocated once per call, whatever the number of chunks."""
    import hf_kd.objective.chunking as chunking

    pointers = {}
    original = chunking.Scratch.__call__

    def spy(self, name, rows, dtype=None):
        buffer = original(self, name, rows, dtype)
        pointers.setdefault(name, set()).add(buffer.data_ptr())
        return buffer

    monkeypatch.setattr(chunking.Scratch, "__call__", spy)
    fused(make(), chunk_size=4, alpha=0.5, temperature=temperature).backward()  # 20 rows: 5 chunks, the last ragged
    assert set(pointers) == names and all(len(seen) == 1 for seen in pointers.values()), pointers

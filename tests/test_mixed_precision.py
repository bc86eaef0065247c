"""The fused loss under autocast over float32 master weights (the Trainer's ``bf16=True``): the head GEMMs in bf16,
d(weight) accumulated and the softmax/divergence math in float32, no float32 copy of the weight.

The numerics budget is against the float32 reference (the same call outside autocast), at logit standard deviation
~10 (sharp teachers): the loss within 1e-3 relative, the student's gradients within 2.5% on CPU (norm of the error /
norm of the reference). What is left of the error is the rounding of the GEMMs' inputs to bf16, which no output
precision recovers: the path adds next to nothing to it (:func:`test_the_error_is_that_of_bf16_inputs`).
"""

import contextlib
import tempfile

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_kd import fused_distillation_loss

CASES = [("forward_kl", 1.0), ("reverse_kl", 1.0), ("jsd", 1.0), ("forward_kl", 0.5)]  # alpha 0.5: the CE mix
IDS = ["forward_kl", "reverse_kl", "jsd", "ce_mix"]
aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.mm.out, aten.addmm.default, aten.addmm.out, aten.addmm_.default}


def sharp_pair(device="cpu", n=512, h=256, v=8192, std=10.0, agreement=0.8, seed=0) -> dict:
    """A student and a teacher reading the same hidden states, whose logits have standard deviation ~``std`` and
    correlate ``agreement`` (a student partway to its teacher); 10% of the positions masked. float32."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale  # noqa: E731
    hidden, weight, other = rand(n, h), rand(v, h, scale=std / h**0.5), rand(v, h, scale=std / h**0.5)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::10] = -100
    x = {
        "student_hidden": hidden,
        "student_weight": weight,
        "teacher_hidden": hidden,
        "teacher_weight": agreement * weight + (1 - agreement**2) ** 0.5 * other,
        "labels": labels,
    }
    return {k: t.to(device) for k, t in x.items()}


def loss_and_grads(x: dict, autocast: str | None = None, **kwargs):
    """The fused loss of ``x`` and the student's (hidden, weight) gradients, under ``autocast``'s bf16 autocast
    (a device type) or none."""
    hidden, weight = x["student_hidden"].clone().requires_grad_(), x["student_weight"].clone().requires_grad_()
    with torch.autocast(autocast or "cpu", torch.bfloat16, enabled=autocast is not None):
        loss = fused_distillation_loss(hidden, weight, x["teacher_hidden"], x["teacher_weight"], x["labels"], **kwargs)
    grads = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), grads


def errors(got, want) -> tuple[float, float, float]:
    """(loss relative error, d(hidden) and d(weight) norm of the error / norm of the reference)."""
    (loss, grads), (ref, ref_grads) = got, want
    return (
        abs(loss - ref).item() / abs(ref).item(),
        *(((a.float() - b).norm() / b.norm()).item() for a, b in zip(grads, ref_grads)),
    )


def rounded(x: dict) -> dict:
    """``x`` with both sides' hidden states and weights rounded to bf16 (kept float32)."""
    return {k: t.bfloat16().float() if t.is_floating_point() else t for k, t in x.items()}


@pytest.mark.parametrize("loss_type,alpha", CASES, ids=IDS)
def test_autocast_on_cpu_is_within_budget(loss_type, alpha):
    """Measured (seed 0, N=512, H=256, V=8192): loss 1e-5..7e-4, gradients 0.8% (CE mix) to 1.5% (reverse KL, JSD)."""
    x = sharp_pair()
    want = loss_and_grads(x, loss_type=loss_type, alpha=alpha)
    got = loss_and_grads(x, "cpu", loss_type=loss_type, alpha=alpha)
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[1])
    loss_error, hidden_error, weight_error = errors(got, want)
    assert loss_error < 1e-3
    assert hidden_error < 2.5e-2 and weight_error < 2.5e-2
    assert hidden_error > 0  # not the float32 path


@pytest.mark.parametrize("loss_type,alpha", CASES, ids=IDS)
def test_the_error_is_that_of_bf16_inputs(loss_type, alpha):
    """Against float32 GEMMs of the bf16-rounded inputs (CUDA's ``out_dtype`` numerics) the path is within 0.5%: the
    logits are those products to 2^-16 (:func:`hf_kd.models.heads.compensated_mm`), d(logits) is rounded once to
    bf16 for the backward GEMMs. The float32 reference is ~1% or more from that, so the path ignoring autocast fails."""
    x = sharp_pair()
    inherent = loss_and_grads(rounded(x), loss_type=loss_type, alpha=alpha)
    got = loss_and_grads(x, "cpu", loss_type=loss_type, alpha=alpha)
    loss_error, *grad_errors = errors(got, inherent)
    assert loss_error < 2e-5 and max(grad_errors) < 5e-3
    assert min(errors(loss_and_grads(x, loss_type=loss_type, alpha=alpha), inherent)[1:]) > 7e-3


class Recorder(TorchDispatchMode):
    """The input dtypes of every matmul, and the storages of every float32 ``[V, H]`` result (but ``inputs``')."""

    def __init__(self, weight_shape, inputs=()):
        super().__init__()
        self.weight_shape, self.matmuls, self.full_copies = tuple(weight_shape), [], set()
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in MATMULS:
            operands = args[:2] if func.overloadpacket is aten.mm else args[1:3]  # addmm: (self, a, b)
            self.matmuls.append(tuple(t.dtype for t in operands))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == self.weight_shape:
            self.full_copies.add(out.untyped_storage().data_ptr())
            self.full_copies -= self.inputs
        return out


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast"])
def test_autocast_runs_every_head_gemm_in_bf16_without_a_float32_weight_copy(autocast):
    """Under autocast every matmul (both sides' logits, the logits' rounding error, d(hidden), d(weight)) takes
    bf16 inputs and the only float32 ``[V, H]`` tensor is the gradient accumulator; outside autocast every matmul
    is float32, as before."""
    x = sharp_pair(n=300, h=64, v=1000)
    hidden, weight = x["student_hidden"].clone().requires_grad_(), x["student_weight"].clone().requires_grad_()
    recorder = Recorder(weight.shape, (weight, x["teacher_weight"]))
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast), recorder:
        fused_distillation_loss(
            hidden, weight, x["teacher_hidden"], x["teacher_weight"], x["labels"], alpha=0.5, chunk_size=128
        )
    dtypes = {d for pair in recorder.matmuls for d in pair}
    assert dtypes == ({torch.bfloat16} if autocast else {torch.float32})
    chunks = 3  # 270 kept rows in chunks of 128: per chunk 2 matmuls per side's logits, 1 for d(hidden), 1 for d(W)
    assert len(recorder.matmuls) == (6 if autocast else 4) * chunks
    assert len(recorder.full_copies) == 1  # the float32 gradient accumulator


def test_cross_tokenizer_terms_under_autocast():
    """The cross-tokenizer pass (student and teacher heads through the same driver) takes bf16 GEMMs under autocast
    and stays within the budget of its float32 run."""
    from test_cross_tokenizer import STUDENT_MERGES, TEACHER_MERGES, byte_level_tokenizer
    from transformers import AutoTokenizer

    from hf_kd.models.heads import LMHeadSpec
    from hf_kd.objective.losses import Objective
    from hf_kd.objective.signals import StudentHidden, TeacherHidden
    from hf_kd.teachers.cross_tokenizer.alignment import align_batch
    from hf_kd.teachers.cross_tokenizer.loss import cross_tokenizer_terms
    from hf_kd.teachers.cross_tokenizer.vocabulary import shared_vocabulary

    with tempfile.TemporaryDirectory() as root:
        student = AutoTokenizer.from_pretrained(byte_level_tokenizer(f"{root}/s", STUDENT_MERGES))
        teacher = AutoTokenizer.from_pretrained(byte_level_tokenizer(f"{root}/t", TEACHER_MERGES))
    shared = shared_vocabulary(student, teacher)
    ids = torch.tensor(
        [student("ab cdab abcd a ab cd abab cd a", add_special_tokens=False)["input_ids"] + [student.eos_token_id]]
    )
    labels = ids[:, 1:].clone()
    alignment = align_batch(ids, None, labels, student, teacher, shared)
    g = torch.Generator().manual_seed(0)
    h = 64
    hidden = torch.randn(1, ids.shape[1] - 1, h, generator=g)
    weight = torch.randn(len(student), h, generator=g) * 10 / h**0.5
    t_hidden = torch.randn(1, alignment.teacher_inputs["input_ids"].shape[1] - 1, h, generator=g)
    t_head = LMHeadSpec(torch.randn(len(teacher), h, generator=g) * 10 / h**0.5, None, None, None)
    objective = Objective("forward_kl", temperature=2.0, alpha=0.5)

    def run(autocast: bool, x: torch.Tensor, w: torch.Tensor, recorder=None):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast), recorder or contextlib.nullcontext():
            terms = cross_tokenizer_terms(
                StudentHidden(x, LMHeadSpec(w, None, None, None)),
                TeacherHidden(t_hidden, t_head),
                alignment,
                shared,
                labels,
                objective,
                chunk_size=4,
            )
        return terms["loss"].detach(), torch.autograd.grad(terms["loss"], (x, w))

    recorder = Recorder(weight.shape)
    got = run(True, hidden, weight, recorder)
    assert {d for pair in recorder.matmuls for d in pair} == {torch.bfloat16}
    loss_error, *grad_errors = errors(got, run(False, hidden, weight))
    assert loss_error < 1e-3 and max(grad_errors) < 2.5e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("loss_type,alpha", CASES, ids=IDS)
def test_autocast_on_cuda_is_within_budget(loss_type, alpha):
    """bf16 GEMMs with float32 output (``out_dtype``; :func:`~hf_kd.models.heads.compensated_mm` on a torch without
    it): the loss within 1e-3, the gradients within 1% of the float32 reference -- or, where the rounding of the
    inputs to bf16 alone costs more (reverse KL and JSD at logit std 10: ~1.5% in float32 GEMMs of the rounded
    inputs on CPU), within 1.1x that cost, as that rounding is what bf16 GEMMs are."""
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # true float32 references
    try:
        x = sharp_pair("cuda")
        want = loss_and_grads(x, loss_type=loss_type, alpha=alpha)
        inherent = errors(loss_and_grads(rounded(x), loss_type=loss_type, alpha=alpha), want)
        got = loss_and_grads(x, "cuda", loss_type=loss_type, alpha=alpha)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    loss_error, *grad_errors = errors(got, want)
    assert loss_error < 1e-3
    for error, floor in zip(grad_errors, inherent[1:]):
        assert 0 < error < max(1e-2, 1.1 * floor)


def test_a_bf16_trainer_runs_the_loss_head_under_autocast(tmp_path, tiny_dir):
    """bf16=True: accelerate autocasts only the models' forward; the trainer puts the loss (its head GEMMs, torch.mm
    here: the models' own layers use F.linear) under the same autocast. The loss stays within budget of float32."""
    from conftest import load_model, variable_length_examples
    from test_trainer import make_args

    from hf_kd import DistillationCollator, DistillationTrainer

    batch = DistillationCollator()(variable_length_examples(4, seed=2, max_len=12))
    losses = {}
    for bf16 in (False, True):
        student, teacher = load_model(tiny_dir["student"]), load_model(tiny_dir["teacher"])
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=make_args(tmp_path, bf16=bf16, loss_chunk_size=8, alpha=0.5)
        )
        seen, real = [], torch.mm

        def recording(a, b, *args, **kwargs):
            seen.append(a.dtype)
            return real(a, b, *args, **kwargs)

        torch.mm = recording
        try:
            losses[bf16] = float(trainer.compute_loss(trainer.model, dict(batch)).detach())
        finally:
            torch.mm = real
        assert seen and (torch.bfloat16 in seen) == bf16
    assert losses[True] == pytest.approx(losses[False], rel=2e-2) and losses[True] != losses[False]

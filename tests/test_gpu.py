"""What only GPUs show. FSDP2 and DeepSpeed ZeRO-3: their numerics and sharding (the sharded run equals a plain run,
each rank holds 1/n of the teacher before and after training, the gathered student reloads) are proven on CPU
processes by test_sharded.py; here the same checks run over NCCL on CUDA, and ZeRO-3 runs in bf16 (two GPUs shard
across two processes; one GPU runs each engine in one process).

Skipped without CUDA; DeepSpeed tests also need `deepspeed`. Run on a GPU machine with `python -m pytest tests -m gpu`.
"""

import json

import pytest
import torch
from conftest import load_model
from test_distributed import run
from test_sharded import assert_like_plain, mixed_pair, needs_deepspeed  # noqa: F401 (mixed_pair is a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _gpus() -> int:
    return min(torch.cuda.device_count(), 2)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", pytest.param("zero3", marks=needs_deepspeed)])
def test_sharded_engines_over_nccl_match_a_plain_run(tmp_path, mixed_pair, engine):  # noqa: F811
    n = _gpus()
    plain = run(mixed_pair, tmp_path / "plain", nproc=1, batch=4, ga=1, device="cuda")
    run(mixed_pair, tmp_path / engine, nproc=n, batch=4 // n, ga=1, engine=engine, device="cuda")
    assert_like_plain(tmp_path / engine, plain, n, rel=1e-4, atol=1e-5)  # GPU kernels: another summation order


@pytest.mark.slow
@needs_deepspeed
def test_zero3_in_bf16_trains_close_to_fp32(tmp_path, mixed_pair):  # noqa: F811
    n = _gpus()
    _, plain_logs = run(mixed_pair, tmp_path / "plain", nproc=1, batch=4, ga=1, device="cuda")
    run(mixed_pair, tmp_path / "bf16", nproc=n, batch=4 // n, ga=1, engine="zero3", device="cuda", bf16=True)
    logs = [row for row in json.loads((tmp_path / "bf16" / "logs.json").read_text()) if "loss" in row]
    for a, b in zip(plain_logs, logs, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-2) and b["loss"] != a["loss"]  # bf16: close, not equal
    saved = load_model(str(tmp_path / "bf16" / "student"))  # gathered from bf16 partitions, saved, reloaded
    assert all(torch.isfinite(p).all() for p in saved.parameters())


# ---- the fused loss on a bf16/fp16 student head: tensor-core matmuls, no float32 copy of the weight ---------------


def _half_head(n: int, h: int, v: int, dtype, weight_grad: bool = True, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to("cuda", dtype)

    labels = torch.randint(0, v, (n,), generator=g)
    labels[::10] = -100
    return {
        "student_hidden": rand(n, h).requires_grad_(),
        "student_weight": rand(v, h, scale=2 * h**-0.5).requires_grad_(weight_grad),
        "teacher_hidden": rand(n, h),
        "teacher_weight": rand(v, h, scale=2 * h**-0.5),
        "labels": labels.cuda(),
    }


def _fused(x: dict, **kwargs):
    from hf_kd import fused_distillation_loss

    names = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "labels")
    return fused_distillation_loss(*(x[name] for name in names), **kwargs)


def _needs_out_dtype_matmuls(dtype):
    from hf_kd.models.heads import _mm_emits

    if not _mm_emits(torch.device("cuda"), dtype, torch.float32):
        pytest.skip(f"this torch has no CUDA torch.mm(..., out_dtype=float32) for {dtype}: the head is cast instead")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_loss_on_a_half_precision_head_matches_float32(dtype, temperature):
    """Logits from half-precision matmuls with float32 output equal the float32 logits of the same half-precision
    values up to summation order, so the loss matches a float32 reference on full logits to 1e-4; d(hidden) and
    d(weight) come from d(logits) rounded once to the weight's dtype (2^-8 relative for bf16): 1e-2 in norm."""
    _needs_out_dtype_matmuls(dtype)
    from hf_kd import distillation_loss

    x = _half_head(1000, 256, 32000, dtype)
    kwargs = dict(alpha=0.5, temperature=temperature)
    total, divergence, ce = _fused(x, chunk_size=256, return_components=True, **kwargs)
    got = torch.autograd.grad(total, (x["student_hidden"], x["student_weight"]))

    up = {k: v.detach().float() if v.is_floating_point() else v for k, v in x.items()}
    hidden, weight = up["student_hidden"].requires_grad_(), up["student_weight"].requires_grad_()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true float32 reference
    try:
        want = distillation_loss(
            hidden @ weight.T,
            up["teacher_hidden"] @ up["teacher_weight"].T,
            up["labels"],
            return_components=True,
            **kwargs,
        )
        want_grads = torch.autograd.grad(want[0], (hidden, weight))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert total.dtype == torch.float32
    for a, b in zip((total, divergence, ce), want):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=0)
    for name, a, b in zip(("d_hidden", "d_weight"), got, want_grads):
        assert a.dtype == dtype, name
        assert ((a.float() - b).norm() / b.norm()).item() < 1e-2, name


@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen head", "trained head"])
def test_fused_loss_makes_no_float32_copy_of_a_bf16_head(weight_grad):
    """Peak memory above the inputs, V x H = 65536 x 4096 (a float32 copy: 1 GiB). A frozen head (LoRA) needs only
    the [256, V] chunk buffers (~0.25 GiB); a trained one peaks at its float32 gradient accumulator (1 GiB) and that
    gradient cast to bf16 (0.5 GiB). The cast weight of the float32 path would add 1 GiB to either (2.2 GiB)."""
    _needs_out_dtype_matmuls(torch.bfloat16)
    n, h, v = 512, 4096, 65536
    copy = v * h * 4
    x = _half_head(n, h, v, torch.bfloat16, weight_grad=weight_grad)
    _fused(x, chunk_size=256).backward()  # warm-up: cuBLAS workspaces, the matmul probes
    x["student_hidden"].grad = x["student_weight"].grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _fused(x, chunk_size=256).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    budget = (1.75 if weight_grad else 0.5) * copy
    assert peak < budget, f"peak {peak / 2**30:.2f} GiB above the inputs, budget {budget / 2**30:.2f} GiB"


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cross_tokenizer_loss_on_a_half_precision_head_matches_float32(tmp_path, dtype):
    """The cross-tokenizer pass on a CUDA bf16 student head (logits from matmuls with float32 output, gradients through
    the head by hand: autograd has none for them) matches the float32 loss through full logits; its gradients come back
    in the head's dtype, within bf16 rounding."""
    _needs_out_dtype_matmuls(dtype)
    from test_cross_tokenizer import STUDENT_MERGES, TEACHER_MERGES, byte_level_tokenizer
    from transformers import AutoTokenizer

    from hf_kd.models.heads import LMHeadSpec
    from hf_kd.objective.losses import Objective
    from hf_kd.objective.signals import StudentHidden, TeacherLogits
    from hf_kd.teachers.cross_tokenizer.alignment import align_batch
    from hf_kd.teachers.cross_tokenizer.loss import cross_tokenizer_terms
    from hf_kd.teachers.cross_tokenizer.vocabulary import shared_vocabulary

    student = AutoTokenizer.from_pretrained(byte_level_tokenizer(tmp_path / "s", STUDENT_MERGES))
    teacher = AutoTokenizer.from_pretrained(byte_level_tokenizer(tmp_path / "t", TEACHER_MERGES))
    shared = shared_vocabulary(student, teacher).to("cuda")
    ids = torch.tensor(
        [student("ab cdab abcd a ab cd", add_special_tokens=False)["input_ids"] + [student.eos_token_id]]
    )
    labels = ids[:, 1:].clone()
    alignment = align_batch(ids.cuda(), None, labels.cuda(), student, teacher, shared)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, ids.shape[1] - 1, 64, generator=g).to("cuda", dtype).requires_grad_()
    weight = (torch.randn(len(student), 64, generator=g) * 0.2).to("cuda", dtype).requires_grad_()
    t_logits = torch.randn(1, alignment.teacher_inputs["input_ids"].shape[1] - 1, len(teacher), generator=g).cuda()
    objective = Objective("forward_kl", temperature=2.0, alpha=0.5)
    got = cross_tokenizer_terms(
        StudentHidden(hidden, LMHeadSpec(weight, None, None, None)),
        TeacherLogits(t_logits),
        alignment,
        shared,
        labels.cuda(),
        objective,
        chunk_size=4,
    )
    got_grads = torch.autograd.grad(got["loss"], (hidden, weight))
    hidden32, weight32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    want = cross_tokenizer_terms(
        hidden32 @ weight32.T, TeacherLogits(t_logits), alignment, shared, labels.cuda(), objective
    )
    want_grads = torch.autograd.grad(want["loss"], (hidden32, weight32))
    torch.testing.assert_close(got["loss"], want["loss"].detach(), rtol=1e-3, atol=0)
    for name, a, b in zip(("d_hidden", "d_weight"), got_grads, want_grads):
        assert a.dtype == dtype, name
        assert ((a.float() - b).norm() / b.norm()).item() < 2e-2, name

"""`hf-kd check`'s sizes: parameter counts of meta-device models and the rough memory a recipe needs per GPU.

Nothing here loads weights: models are built from their configs on the meta device, and the loss's peak is measured
on a small probe under a dispatch mode that counts live bytes.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hf_kd.models.tasks import DEFAULT_TASK, TASKS
from hf_kd.recipe.recipe import Recipe

GiB = 1024**3
_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


def meta_model(config, task: str = DEFAULT_TASK):
    """The model of ``config`` for ``task`` on the meta device: exact parameter counts and head layout, no memory."""
    with torch.device("meta"):
        return TASKS[task].load_class().from_config(config)


def count_parameters(model, task: str = DEFAULT_TASK) -> tuple[int, int]:
    """``(parameters, output rows)``: rows of the LM head, or a classifier's classes; tied weights are counted once."""
    if not TASKS[task].language_model:
        return sum(p.numel() for p in model.parameters()), model.config.num_labels
    head = model.get_output_embeddings()
    rows = head.weight.shape[0] if head is not None else model.config.vocab_size
    return sum(p.numel() for p in model.parameters()), rows


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class _PeakBytes(TorchDispatchMode):
    """Track the peak bytes of tensor storage allocated inside the mode (CPU-friendly memory measurement)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._seen:
                continue
            self._seen.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, size)
        return out

    def _release(self, key: int, size: int) -> None:
        self.live -= size
        self._seen.discard(key)


def loss_bytes_per_logit(args, dtype: torch.dtype = torch.bfloat16) -> float:
    """Peak bytes the loss (forward + backward) allocates per (token x vocab) entry, measured on a small batch.

    Measured, not tabulated, so it follows the recipe's loss_type / alpha and whatever losses.py does today.
    """
    from hf_kd.objective.losses import distillation_loss

    n, vocab = 64, 2048
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(n, vocab, generator=generator).to(dtype).requires_grad_()
    teacher = torch.randn(n, vocab, generator=generator).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=generator)
    with _PeakBytes() as tracker:
        loss = distillation_loss(student, teacher, labels, **args.objective.loss_kwargs())
        loss.backward()
    return tracker.peak / (n * vocab)


def _dtype_name(section_dtype: str | None, config, default: str) -> str:
    if section_dtype is None:
        return default
    if section_dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return str(found).replace("torch.", "") if found is not None else "float32"
    return section_dtype


@dataclass
class Found:
    """A model known from its config alone."""

    config: object
    model: object  # on the meta device
    params: int
    rows: int


def estimate_memory(recipe: Recipe, args, teacher: Found, student: Found, shared_vocab: int) -> list[tuple[str, float]]:
    """Rough per-GPU bytes of one micro-batch step without sharding (DDP or one GPU).

    Activations assume SDPA/flash attention (no [T, T] scores kept) and a Llama-style block: about ``8 h + 5 i``
    saved values per token and layer. The loss is the fused chunked path when ``loss_chunk_size`` is set and both
    heads are plain (see hf_kd.objective.fused), else full logits.
    """
    from hf_kd.models.heads import lm_head_spec

    t_bytes = _BYTES.get(_dtype_name(recipe.teacher.dtype, teacher.config, "bfloat16"), 2)  # the trainer's GPU default
    s_bytes = _BYTES.get(_dtype_name(recipe.student.dtype, student.config, "float32"), 4)
    half = bool(recipe.training.get("bf16") or recipe.training.get("fp16"))  # args has them off on a CPU machine
    act_bytes = 2 if half else s_bytes  # autocast computes activations (and the logits) in 16 bits
    tokens = args.per_device_train_batch_size * recipe.data.max_length
    s_text, t_text = _text_config(student.config), _text_config(teacher.config)
    hidden, layers = s_text.hidden_size, s_text.num_hidden_layers
    inter = getattr(s_text, "intermediate_size", 4 * hidden)
    per_layer = tokens * (8 * hidden + 5 * inter) * act_bytes
    if _checkpointing(args):
        activations = layers * tokens * hidden * act_bytes + per_layer  # layer inputs kept, one layer recomputed
    else:
        activations = layers * per_layer
    t_hidden = t_text.hidden_size
    teacher_transient = tokens * (4 * t_hidden + 2 * getattr(t_text, "intermediate_size", 4 * t_hidden)) * t_bytes
    if recipe.peft is not None:  # frozen base weights; adapters, their grads and Adam states are a rounding error
        student_states = student.params * s_bytes
        student_label = f"student weights (LoRA: base frozen, {s_bytes} B/param)"
    else:
        student_states = 4 * student.params * s_bytes  # weights + grads + AdamW's two moments, all in the param dtype
        student_label = f"student weights+grads+AdamW ({4 * s_bytes} B/param)"
    rows = [
        (f"teacher weights ({t_bytes} B/param)", teacher.params * t_bytes),
        (student_label, student_states),
        (
            f"student activations ({'checkpointed' if _checkpointing(args) else 'no checkpointing'}, {tokens} tokens)",
            activations,
        ),
        ("teacher forward (transient)", teacher_transient),
    ]
    if not TASKS[recipe.task].language_model:  # one logit vector per example
        rows.append(
            (
                f"classifier logits and loss ({teacher.rows} classes)",
                args.per_device_train_batch_size * teacher.rows * 16,
            )
        )
        return rows
    chunk = args.loss_chunk_size
    fused = bool(chunk) and all(lm_head_spec(f.model)[0] is not None for f in (teacher, student))
    if fused:  # per chunk: both chunks' float32 logits, the loss's buffers; plus the float32 [V, H] head gradient
        per_logit = 8 + loss_bytes_per_logit(args, torch.float32)
        rows.append(
            (
                f"loss, fused (chunks of {chunk} tokens) + float32 lm_head gradient",
                min(chunk, tokens) * shared_vocab * per_logit + student.rows * hidden * 4,
            )
        )
    else:
        rows.append(
            ("logits: student + its grad, teacher", tokens * (student.rows * act_bytes * 2 + teacher.rows * t_bytes))
        )
        per_logit = loss_bytes_per_logit(args, torch.bfloat16 if half else torch.float32)
        rows.append(("loss buffers on full logits", tokens * shared_vocab * per_logit))
    return rows


def _checkpointing(args) -> bool:
    """``activation_checkpointing`` (its name since transformers 5.23), ``gradient_checkpointing`` before it."""
    return bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False))

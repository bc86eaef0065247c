"""`hf-kd check`: what can be known about a recipe before renting GPUs.

Everything is read from configs and tokenizers (local paths, the Hub cache, or the Hub when online); no weights are
downloaded. Whatever cannot be reached is reported as not checked, never as a failure.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .adapters import SELF_TEACHER
from .data import DataError, check_tokenizers_agree, count_targets, is_empty_tokenizer, load_raw_dataset, tokenize_dataset
from .recipe import Recipe

GiB = 1024**3
_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


@dataclass
class Report:
    """Lines to print; ``failed`` makes `hf-kd check` exit 1."""

    lines: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    failed: bool = False

    def add(self, line: str) -> None:
        self.lines.append(line)

    def fail(self, line: str) -> None:
        self.lines.append(f"FAIL {line}")
        self.failed = True


def _fetch(loader, name: str):
    """``(object, None)`` from the local cache first, then the Hub if allowed; ``(None, why)`` if unreachable."""
    try:
        return loader(name, local_files_only=True), None
    except Exception as err:  # noqa: BLE001 - any failure here means "not available locally"
        local_error = err
    if os.path.isdir(os.path.expanduser(name)):
        return None, str(local_error).strip().splitlines()[0]
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return None, "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
    try:
        return loader(name), None
    except Exception as err:  # noqa: BLE001 - network down, gated repo, typo: say so, do not crash
        return None, str(err).strip().splitlines()[0][:200]


def meta_model(config, task: str = "causal_lm"):
    """The model of ``config`` for ``task`` on the meta device: exact parameter counts and head layout, no memory."""
    from .models import TASKS

    with torch.device("meta"):
        return TASKS[task].load_class().from_config(config)


def count_parameters(model, task: str = "causal_lm") -> tuple[int, int]:
    """``(parameters, output rows)``: rows of the LM head, or a classifier's classes; tied weights are counted once."""
    if task != "causal_lm":
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
    from .losses import distillation_loss

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
    heads are plain (see hf_kd.fused), else full logits.
    """
    from .models import lm_head_spec

    t_bytes = _BYTES.get(_dtype_name(recipe.teacher.dtype, teacher.config, "bfloat16"), 2)  # the trainer's GPU default
    s_bytes = _BYTES.get(_dtype_name(recipe.student.dtype, student.config, "float32"), 4)
    half = bool(recipe.training.get("bf16") or recipe.training.get("fp16"))  # args has them off on a CPU machine
    act_bytes = 2 if half else s_bytes  # autocast computes activations (and the logits) in 16 bits
    tokens = args.per_device_train_batch_size * recipe.data.max_length
    s_text, t_text = _text_config(student.config), _text_config(teacher.config)
    hidden, layers = s_text.hidden_size, s_text.num_hidden_layers
    inter = getattr(s_text, "intermediate_size", 4 * hidden)
    per_layer = tokens * (8 * hidden + 5 * inter) * act_bytes
    if args.gradient_checkpointing:
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
        (f"student activations ({'checkpointed' if args.gradient_checkpointing else 'no checkpointing'}, "
         f"{tokens} tokens)", activations),
        ("teacher forward (transient)", teacher_transient),
    ]  # fmt: skip
    if recipe.task != "causal_lm":  # one logit vector per example
        rows.append((f"classifier logits and loss ({teacher.rows} classes)", args.per_device_train_batch_size * teacher.rows * 16))
        return rows
    chunk = args.loss_chunk_size
    fused = bool(chunk) and all(lm_head_spec(f.model)[0] is not None for f in (teacher, student))
    if fused:  # per chunk: both chunks' float32 logits, the loss's buffers; plus the float32 [V, H] head gradient
        per_logit = 8 + loss_bytes_per_logit(args, torch.float32)
        rows.append((f"loss, fused (chunks of {chunk} tokens) + float32 lm_head gradient",
                     min(chunk, tokens) * shared_vocab * per_logit + student.rows * hidden * 4))  # fmt: skip
    else:
        rows.append(("logits: student + its grad, teacher", tokens * (student.rows * act_bytes * 2 + teacher.rows * t_bytes)))
        per_logit = loss_bytes_per_logit(args, torch.bfloat16 if half else torch.float32)
        rows.append(("loss buffers on full logits", tokens * shared_vocab * per_logit))
    return rows


def check_recipe(recipe: Recipe) -> Report:
    """Validate what can be validated without weights; see the module docstring."""
    from transformers import AutoConfig, AutoTokenizer

    report = Report()
    args = recipe.training_args(check_hardware=False)
    report.add(f"recipe {recipe.path}: valid")
    if any(recipe.training.get(k) for k in ("bf16", "fp16", "tf32")) and not torch.cuda.is_available():
        report.add("note: training asks for bf16/fp16/tf32, which this machine (no CUDA) cannot run; the GPU machine can")

    found: dict[str, Found] = {}
    for role, section in (("teacher", recipe.teacher), ("student", recipe.student)):
        if role == "teacher" and section.name_or_path == SELF_TEACHER:
            report.add("teacher self: the student's base model with its adapters disabled (self-distillation)")
            continue
        config, why = _fetch(AutoConfig.from_pretrained, section.name_or_path)
        if config is None:
            report.unchecked.append(f"{role} config ({section.name_or_path}): {why}")
            continue
        if recipe.task == "classification" and role == "student" and "teacher" in found:
            config.num_labels = found["teacher"].config.num_labels  # what hf-kd train gives the student's head
        model = meta_model(config, recipe.task)
        found[role] = Found(config, model, *count_parameters(model, recipe.task))
        rows = "vocab rows" if recipe.task == "causal_lm" else "classes"
        report.add(f"{role:8s}{section.name_or_path}: {config.model_type}, {_count(found[role].params)} parameters, "
                   f"{found[role].rows} {rows}")  # fmt: skip
    if recipe.teacher.name_or_path == SELF_TEACHER and "student" in found:
        found["teacher"] = found["student"]

    tokenizers = {}
    for role, section in (("teacher", recipe.teacher), ("student", recipe.student)):
        name = section.tokenizer or section.name_or_path
        if name == SELF_TEACHER:
            continue
        tokenizer, why = _fetch(AutoTokenizer.from_pretrained, name)
        if tokenizer is None:
            report.unchecked.append(f"{role} tokenizer ({name}): {why}")
        elif is_empty_tokenizer(tokenizer):
            report.fail(f"{role} tokenizer ({name}): no tokenizer files, only {len(tokenizer)} special tokens; set "
                        f"{role}.tokenizer")  # fmt: skip
        else:
            tokenizers[role] = tokenizer

    shared = None
    if recipe.task == "classification" and "teacher" in found:
        shared = found["teacher"].rows  # the student's head is built with the teacher's label set (hf_kd.cli)
        labels = ", ".join(str(found["teacher"].config.id2label.get(i, i)) for i in range(shared))
        report.add(f"labels: {shared} classes ({labels}), taken by the student's classification head from the teacher")
    elif "teacher" in found and "student" in found:
        t_rows, s_rows = found["teacher"].rows, found["student"].rows
        shared = min(t_rows, s_rows)
        if t_rows == s_rows:
            report.add(f"vocab: teacher and student both have {t_rows} rows")
        elif "student" not in tokenizers:
            report.unchecked.append(f"vocab alignment: rows differ ({t_rows} vs {s_rows}) and the tokenizer is unreachable")
        elif len(tokenizers["student"]) > shared:
            report.fail(f"vocab: teacher {t_rows} rows, student {s_rows} rows, tokenizer {len(tokenizers['student'])} "
                        "tokens: these models do not share a vocabulary")  # fmt: skip
        else:
            report.add(f"vocab: teacher {t_rows} rows, student {s_rows} rows, tokenizer {len(tokenizers['student'])} "
                       f"tokens -> distilling over the shared first {shared} rows (the rest is padding)")  # fmt: skip

    sample = _data_sample(recipe, report) if "student" in tokenizers else None
    if sample is not None:
        _check_data(recipe, args, tokenizers["student"], sample, report)
    if len(tokenizers) == 2 and sample:
        _check_tokenizers(recipe, tokenizers["student"], tokenizers["teacher"], sample, report)

    if shared is not None and "teacher" in found and "student" in found:
        rows = estimate_memory(recipe, args, found["teacher"], found["student"], shared)
        total = sum(b for _, b in rows)
        report.add(f"memory per GPU, rough (DDP or one GPU, per_device_train_batch_size={args.per_device_train_batch_size}"
                   f", max_length={recipe.data.max_length}):")  # fmt: skip
        for label, size in rows:
            report.add(f"  {_size(size):>10}  {label}")
        report.add(f"  {_size(total):>10}  total (+ ~1 GiB CUDA context; FSDP/ZeRO-3 divide the weight and optimizer "
                   "lines by the number of GPUs)")  # fmt: skip
    else:
        report.unchecked.append("memory estimate: needs both configs")
    return report


def _data_sample(recipe: Recipe, report: Report) -> list | None:
    """The first examples of the training data (streamed from the Hub when online), or ``None`` if unreachable."""
    data = recipe.data
    try:
        local = os.path.exists(os.path.expanduser(data.dataset))
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        raw = load_raw_dataset(data.dataset, data.split, data.subset, streaming=not local and not offline)
        return list(raw.take(max(data.tokenizer_check_samples, 256))) if hasattr(raw, "take") else []
    except StopIteration:  # `datasets` on an empty file
        return []
    except Exception as err:  # noqa: BLE001 - unreachable dataset: not checked, not failed
        report.unchecked.append(f"data sample ({data.dataset}): {str(err).strip().splitlines()[0][:200]}")
        return None


def _check_data(recipe: Recipe, args, tokenizer, sample: list, report: Report) -> None:
    """The checks `hf-kd train` applies to its data, on a sample: a recipe that train refuses fails here too."""
    import datasets

    data = recipe.data
    if not sample:
        report.fail(f"data: {data.dataset} has no examples")
        return
    try:
        if data.format == "prompt" and not args.every_batch_generated:
            raise DataError("data.format", "prompt-only data has no completions to distill on: set training.lmbda: 1 "
                            "(on-policy) or training.seq_kd: true (teacher completions)")  # fmt: skip
        tokenized = tokenize_dataset(datasets.Dataset.from_list(sample), tokenizer, data, desc="Checking the data",
                                     keep_prompt_only=args.every_batch_generated)  # fmt: skip
    except DataError as err:
        report.fail(f"data: {err}")
        return
    targets = sum(count_targets(labels) for labels in tokenized["labels"]) if data.format != "classification" else len(tokenized)
    report.add(f"data: the first {len(sample)} examples tokenize to {len(tokenized)} trainable examples, {targets} "
               "target tokens")  # fmt: skip


def _check_tokenizers(recipe: Recipe, student, teacher, sample: list, report: Report) -> None:
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab == t_vocab:
        report.add(f"tokenizers: identical vocabularies ({len(s_vocab)} tokens)")
    else:
        differ = sum(1 for token, i in s_vocab.items() if t_vocab.get(token) != i)
        report.add(f"tokenizers: vocabularies differ ({len(s_vocab)} vs {len(t_vocab)} tokens, {differ} student tokens "
                   "have another id or none in the teacher); checking the data sample")  # fmt: skip
    data = recipe.data
    try:
        report.add(f"tokenizers: {check_tokenizers_agree(student, teacher, sample[: data.tokenizer_check_samples], data)}")
    except (DataError, KeyError) as err:
        report.fail(f"tokenizers: {err}")

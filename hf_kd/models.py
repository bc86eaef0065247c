"""What hf_kd needs to know about a Hugging Face model: its task, its output head, and how to load one.

* :data:`TASKS` -- the one task table: task -> Auto class, label shift, PEFT task type, pipeline tag.
* :func:`unwrap`, :func:`num_outputs`, :func:`lm_head_spec` / :class:`LMHeadSpec` -- the output head: how many rows
  it has, and how a final hidden state becomes logits (for the fused loss, which never builds full logits).
* :func:`load_model` -- the one loader for teachers (trainer, CLI, cache builder) and students (CLI).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """How a task's logits align with its labels, and how its models are loaded, adapted and published."""

    name: str
    auto_class: str  # transformers Auto class that loads a checkpoint for this task
    shift_labels: bool  # causal LMs: logits at position i predict the token at i + 1
    peft_task_type: str  # peft.TaskType: SEQ_CLS / TOKEN_CLS also train the new classifier head
    pipeline_tag: str  # the Hub's pipeline tag for the model card
    mapping_names: tuple[str, ...]  # transformers' class-name mappings whose classes belong to this task

    @property
    def peft_auto_class(self) -> str:
        return self.auto_class.replace("AutoModel", "AutoPeftModel")

    def load_class(self):
        import transformers

        return getattr(transformers, self.auto_class)


TASKS = {
    task.name: task
    for task in (
        Task("causal_lm", "AutoModelForCausalLM", True, "CAUSAL_LM", "text-generation",
             ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",)),
        Task("classification", "AutoModelForSequenceClassification", False, "SEQ_CLS", "text-classification",
             ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
              "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES")),
        Task("token_classification", "AutoModelForTokenClassification", False, "TOKEN_CLS", "token-classification",
             ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",)),
    )
}  # fmt: skip


def unwrap(model: nn.Module) -> nn.Module:
    """The innermost transformers model under DDP/accelerate (``.module``) and PEFT (``get_base_model()``) wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):  # PeftModel
        model = model.get_base_model()
    return model


def task_of_class(class_name: str) -> Task | None:
    """The task whose transformers mappings list ``class_name`` (``LlamaForCausalLM`` -> causal_lm), else ``None``."""
    from transformers.models.auto import modeling_auto

    for task in TASKS.values():
        for mapping in task.mapping_names:
            if class_name in getattr(modeling_auto, mapping).values():
                return task
    return None


def detect_task(model: nn.Module) -> str | None:
    """``causal_lm``, ``classification`` or ``token_classification`` from the model's class, else ``None``."""
    inner = unwrap(model)
    if getattr(getattr(inner, "config", None), "is_encoder_decoder", False):
        return None  # seq2seq logits align with decoder labels unshifted: not a task handled here yet
    for cls in type(inner).__mro__:  # FSDP2 subclasses the model: FSDP<Name>(FSDPModule, <Name>)
        task = task_of_class(cls.__name__)
        if task is not None:
            return task.name
    return None


def num_outputs(model: nn.Module, task: str) -> int:
    """Size of the logits' last dim: lm_head rows for LMs (padded vocab), ``num_labels`` for classifiers.

    Under ZeRO-3 a model is loaded already partitioned (its weights are empty placeholders): the rows are read from
    the full shape DeepSpeed keeps (``ds_shape``).
    """
    inner = unwrap(model)
    if task == "causal_lm":
        head = inner.get_output_embeddings()
        return getattr(head.weight, "ds_shape", head.weight.shape)[0] if head is not None else inner.config.vocab_size
    return inner.config.num_labels


def default_dtype() -> torch.dtype:
    """A teacher's dtype when none is asked for: bfloat16 on GPU (half the memory), float32 on CPU (bf16 is slow)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_model(path: str, task: str, init_kwargs: dict | None = None) -> nn.Module:
    """``from_pretrained`` with the task's Auto class; a ``dtype`` string ("bfloat16") becomes a torch dtype."""
    kwargs = dict(init_kwargs or {})
    kwargs.setdefault("dtype", default_dtype())
    if isinstance(kwargs["dtype"], str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    logger.info("loading %s (%s) with %s", path, task, kwargs)
    return _model_class(path, task, kwargs).from_pretrained(path, **kwargs)


def _model_class(path: str, task: str, kwargs: dict):
    """The task's Auto class; for a classifier, the class its config names when that is one (an image or audio
    classifier, ViTForImageClassification, has no AutoModelForSequenceClassification mapping)."""
    import transformers

    auto = TASKS[task].load_class()
    if task != "classification":
        return auto
    keys = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only")
    try:
        config = transformers.AutoConfig.from_pretrained(path, **{k: v for k, v in kwargs.items() if k in keys})
    except (OSError, ValueError):
        return auto  # from_pretrained says what is wrong
    for name in getattr(config, "architectures", None) or []:
        found = task_of_class(name)
        if found is not None and found.name == task and hasattr(transformers, name):
            return getattr(transformers, name)
    return auto


def freeze(model: nn.Module) -> nn.Module:
    """A teacher's state for its whole life: no gradients, eval mode (no dropout), no KV cache."""
    model.requires_grad_(False)
    model.eval()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return model


@contextlib.contextmanager
def capture_final_hidden(model: nn.Module):
    """Record the decoder's output (the post-norm hidden states that feed the lm_head) during a forward call.

    The hook sits on the inner decoder, while the call itself still goes through every wrapper (DDP, PEFT, gradient
    checkpointing), so gradient synchronization and adapters behave exactly as in a plain forward.
    """
    box: list[torch.Tensor] = []

    def hook(_module, _args, output):
        box.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = unwrap(model).get_decoder().register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


# ---- the output head ----------------------------------------------------------------------------------------------

# model_type -> how its *ForCausalLM.forward turns the final (post-norm) hidden state into logits, read off
# transformers 5.23's modeling files. Anything else (Granite divides by logits_scaling, MiniCPM3 scales the hidden
# state, FalconH1 multiplies by lm_head_multiplier, ...) falls back to full logits rather than risk a wrong loss.
_PLAIN_HEADS = {
    "gemma", "llama", "mistral", "mixtral", "olmo2", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "smollm3",
}  # fmt: skip
_SOFTCAPPED_HEADS = {"gemma2", "gemma3_text"}  # cap * tanh(lm_head(h) / cap), cap = config.final_logit_softcapping
_SCALED_HEADS = {"cohere", "cohere2"}  # lm_head(h) * config.logit_scale


@dataclass(frozen=True)
class LMHeadSpec:
    """What turns a final hidden state ``h`` into logits: ``softcap(scale * (h @ weight.T + bias))``."""

    weight: torch.Tensor  # [V, H], the output-embedding parameter itself (tied to the input embedding for Gemma)
    bias: torch.Tensor | None  # [V] or None
    softcap: float | None  # Gemma 2/3 final_logit_softcapping
    logit_scale: float | None  # Cohere's logit_scale

    def logits(self, hidden: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
        """The model's logits ``[c, vocab_size or V]`` (float32 at least) for a chunk of final hidden states ``[c, H]``.

        Casts a bf16 weight to float32 on every call (on CPU): call it on chunks of rows, not row by row.
        """
        dtype = torch.promote_types(torch.promote_types(hidden.dtype, self.weight.dtype), torch.float32)
        bias = None if self.bias is None else self.bias[:vocab_size].to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):  # no bf16 matmul under the Trainer's autocast
            logits = project(hidden, as_projection_weight(self.weight[:vocab_size], dtype), bias, dtype)
        return finish_logits(logits, self.logit_scale, self.softcap)


def lm_head_spec(model: nn.Module) -> tuple[LMHeadSpec | None, str]:
    """``(spec, "")`` for a causal LM whose head is a plain linear layer, else ``(None, reason)``.

    ``model`` may be wrapped by DDP/accelerate (``.module``) and PEFT (``get_base_model()``). The reason is a sentence
    meant for a log line when the caller falls back to full logits.
    """
    model = unwrap(model)
    name = type(model).__name__
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _PLAIN_HEADS | _SOFTCAPPED_HEADS | _SCALED_HEADS:
        return None, (
            f"{name} (model_type {model_type!r}) is not known to compute logits as lm_head(hidden) with at most a "
            "logit scale or softcap; using full logits"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None, f"{name} has no output embeddings; using full logits"
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        return None, f"{name}'s lm_head is wrapped by a PEFT adapter layer ({type(head).__name__}); using full logits"
    if type(head) is not nn.Linear:  # subclasses include quantized layers (bitsandbytes) whose weight is packed
        return None, f"{name}'s lm_head is a {type(head).__name__}, not a plain nn.Linear; using full logits"
    weight = head.weight
    if hasattr(weight, "ds_shape"):  # an empty placeholder; the rows live in partitions, gathered in forward only
        return None, (
            f"{name}'s lm_head weight {tuple(weight.ds_shape)} is partitioned by DeepSpeed ZeRO-3; using full logits"
        )
    if type(weight) not in (torch.Tensor, nn.Parameter) or weight.dim() != 2 or weight.numel() == 0:
        # FSDP2 (DTensor) shards the weight outside the module's own forward
        return None, (
            f"{name}'s lm_head weight is a {type(weight).__name__} of shape {tuple(weight.shape)} (sharded or "
            "quantized?); using full logits"
        )
    softcap = getattr(config, "final_logit_softcapping", None) if model_type in _SOFTCAPPED_HEADS else None
    scale = getattr(config, "logit_scale", None) if model_type in _SCALED_HEADS else None
    return LMHeadSpec(weight=weight, bias=head.bias, softcap=softcap, logit_scale=scale), ""


def finish_logits(logits, logit_scale, softcap, in_place=False):
    """Cohere's ``* logit_scale``, then Gemma's ``cap * tanh(x / cap)``, in the order transformers applies them.

    ``in_place``: overwrite ``logits`` (a chunk buffer outside autograd) instead of allocating new tensors.
    """
    if logit_scale is not None:
        logits = logits.mul_(logit_scale) if in_place else logits * logit_scale
    if softcap is not None:
        logits = logits.div_(softcap).tanh_().mul_(softcap) if in_place else torch.tanh(logits / softcap) * softcap
    return logits


def project(hidden, weight, bias, dtype, out=None):
    """``hidden [c, H] @ weight[V, H].T (+ bias [V])`` -> ``[c, V]`` in ``dtype``, accumulated in at least float32;
    written into ``out`` (``[c, V]``, ``dtype``) when given, a buffer reused chunk after chunk."""
    if weight.dtype != dtype:  # CUDA bf16/fp16 weight: float32 output from the tensor-core matmul itself, no copy of W
        logits = torch.mm(hidden.to(weight.dtype), weight.T, out_dtype=dtype, out=out)
        return logits if bias is None else logits.add_(bias)
    hidden = hidden.to(dtype)
    return torch.mm(hidden, weight.T, out=out) if bias is None else torch.addmm(bias, hidden, weight.T, out=out)


def as_projection_weight(weight, dtype):
    """A head's weight (student or teacher) as :func:`project` takes it: kept in bf16/fp16 where the GPU matmul can
    emit ``dtype`` (float32), else cast to ``dtype``."""
    if weight.dtype != dtype and _mm_emits(weight.device, weight.dtype, dtype):
        return weight
    return weight.to(dtype)  # once per call, never per chunk


@functools.cache
def _mm_emits(device: torch.device, in_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=out_dtype)`` runs on ``device`` for ``in_dtype`` inputs (CUDA only)."""
    if device.type != "cuda" or in_dtype not in (torch.bfloat16, torch.float16) or out_dtype != torch.float32:
        return False
    try:
        probe = torch.ones(2, 2, device=device, dtype=in_dtype)
        return torch.mm(probe, probe, out_dtype=out_dtype).dtype == out_dtype
    except (RuntimeError, TypeError):
        return False

"""How hf_kd finds and loads a Hugging Face model: its task (:mod:`hf_kd.models.tasks` is the table), its wrappers,
and the one loader.

* :func:`detect_task` -- a model's task from its class.
* :func:`unwrap`, :func:`num_outputs` -- the model under its wrappers, and how many rows its output head has;
  how a final hidden state becomes logits is :mod:`hf_kd.models.heads`.
* :func:`load_model` -- the one loader for teachers (trainer, CLI, cache builder) and students (CLI).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from hf_kd.models.tasks import DEFAULT_TASK, TASKS, Task  # noqa: F401 (TASKS and Task: importable here too)

logger = logging.getLogger(__name__)


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
    if TASKS[task].language_model:
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
    if not TASKS[task].per_example:
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

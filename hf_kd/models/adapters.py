"""PEFT students: wrap a student in LoRA adapters, run its base model as a teacher, merge a copy for saving.

Named ``adapters`` so that ``import peft`` inside this package still means the PEFT library.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import logging
import os
import warnings

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from hf_kd.models.loading import task_of_class

logger = logging.getLogger(__name__)

SELF_TEACHER = "self"  # teacher_model / teacher_model_name_or_path value: the student's own base model


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` (possibly under DDP/accelerate wrappers) is a :class:`peft.PeftModel`."""
    while hasattr(model, "module"):  # not models.unwrap: that one also strips the PeftModel
        model = model.module
    return isinstance(model, PeftModel)


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` was loaded quantized (bitsandbytes 4/8-bit, GPTQ, ...): its weights are not plain tensors."""
    return getattr(model, "hf_quantizer", None) is not None or any(
        getattr(model, flag, False) for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit")
    )


def default_target_modules(model: nn.Module) -> list[str] | str:
    """PEFT's usual LoRA targets for this architecture (``q_proj``/``v_proj`` for Llama/Qwen/Gemma/Mistral, ...).

    An architecture PEFT has no entry for gets ``"all-linear"``: every linear layer but the output head.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    return list(targets) if targets else "all-linear"


def wrap_student(
    model: nn.Module,
    peft_config,
    gradient_checkpointing: bool = False,
    gradient_checkpointing_kwargs: dict | None = None,
):
    """``model`` with the adapters of ``peft_config`` (e.g. a ``LoraConfig``): a ``PeftModel`` whose base weights are
    frozen and only the adapters train. The base weights are ``model``'s own tensors, not a copy.

    ``target_modules=None`` becomes :func:`default_target_modules`; a missing ``task_type`` is read off the model's
    class (``CAUSAL_LM``, ``SEQ_CLS``, ``TOKEN_CLS``). A quantized model (QLoRA: loaded with :func:`qlora_quantization_config`) is first prepared for k-bit
    training (layer norms in float32, input gradients for gradient checkpointing).
    """
    if is_peft_model(model):
        raise ValueError("the student is already a PeftModel (it has adapters): pass it without peft_config")
    changes = {}
    if getattr(peft_config, "target_modules", ()) is None and not peft_config.is_prompt_learning:
        changes["target_modules"] = default_target_modules(model)
    task = task_of_class(type(model).__name__)
    if peft_config.task_type is None and task is not None:
        changes["task_type"] = task.peft_task_type
    if changes:
        peft_config = dataclasses.replace(peft_config, **changes)  # the caller's config object stays as it was
    if is_quantized(model):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
        )
    elif gradient_checkpointing:
        # reentrant checkpointing only back-propagates into a segment whose input requires grad; the embeddings are
        # frozen, so make their output require it
        model.enable_input_require_grads()
    _record_base_model_path(model)
    with warnings.catch_warnings():
        # peft reads transformers 5's deprecated `is_gradient_checkpointing` (renamed is_activation_checkpointing)
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = get_peft_model(model, peft_config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "PEFT student: %d of %d parameters train (%.3f%%), targets %s",
        trainable,
        total,
        100 * trainable / max(total, 1),
        getattr(peft_config, "target_modules", None),
    )
    return model


def _record_base_model_path(model: nn.Module) -> None:
    """A student loaded from a local directory names it by its absolute path: PEFT writes ``name_or_path`` into the
    adapter's ``base_model_name_or_path``, and a relative one (``./student``) would load from nowhere else. A Hub id
    stays as it is."""
    name = getattr(model, "name_or_path", None)
    if isinstance(name, str) and name and os.path.isdir(os.path.expanduser(name)):
        model.name_or_path = os.path.abspath(os.path.expanduser(name))


def qlora_quantization_config(compute_dtype: torch.dtype = torch.bfloat16):
    """QLoRA's student quantization: 4-bit NF4 weights, double quantization, ``compute_dtype`` matmuls.

    Pass it as ``AutoModelForCausalLM.from_pretrained(..., quantization_config=...)`` for the student, then train with
    a ``peft_config``. Raises a ``RuntimeError`` saying what is missing where bitsandbytes or a CUDA GPU is not there.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("QLoRA (a 4-bit student) needs bitsandbytes: pip install bitsandbytes; or train plain LoRA")
    if not torch.cuda.is_available():
        raise RuntimeError("QLoRA (a 4-bit student) needs a CUDA GPU for bitsandbytes' kernels; train plain LoRA here")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # QLoRA's NormalFloat4: quantiles of a normal distribution, like the weights
        bnb_4bit_use_double_quant=True,  # quantize the quantization constants too (~0.4 bit/param saved)
        bnb_4bit_compute_dtype=compute_dtype,
    )


def require_adapters(model: nn.Module) -> None:
    """The check behind ``teacher_model="self"``: the student must be a PeftModel, whose base model is the teacher."""
    if not is_peft_model(model):
        raise ValueError(
            f"teacher_model={SELF_TEACHER!r} makes the student's base model (adapters off) the teacher, but the "
            f"student ({type(model).__name__}) has no adapters: pass peft_config=LoraConfig(...) (a recipe's peft: "
            "section) or a PeftModel"
        )


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """``model`` (a PeftModel, unwrapped from DDP) as its own base model: adapters off, eval mode; both restored."""
    was_training = model.training
    model.eval()  # the teacher never runs dropout
    try:
        with model.disable_adapter():
            yield model
    finally:
        model.train(was_training)


def merged_copy(model: nn.Module) -> nn.Module:
    """A new model with ``model``'s adapters merged into its base weights; ``model`` itself is not touched.

    Merging the live model and unmerging it afterwards would not restore the base weights bit for bit (``W + BA - BA``
    rounds, badly so in bfloat16). The copy shares every frozen base tensor with ``model`` and copies only the
    adapters; ``safe_merge`` writes each merged weight into a new tensor, so extra memory is the merged layers only.
    """
    if is_quantized(model.get_base_model()):
        raise ValueError(
            "save_merged: the student's base weights are quantized (QLoRA); save the adapters (save_merged=False) and "
            "merge them into a bfloat16 copy of the base model with PeftModel.from_pretrained(...).merge_and_unload()"
        )
    # deepcopy consults the memo by id: each frozen parameter "copies" to a new Parameter over the same storage, so
    # rebinding its .data (what safe_merge does) in the copy leaves the original parameter as it was
    memo = {id(p): nn.Parameter(p.data, requires_grad=False) for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, memo).merge_and_unload(safe_merge=True)

"""The output head of a causal LM: how a final (post-norm) hidden state becomes logits, for the fused loss, which never
builds full logits (:class:`LMHeadSpec`, :func:`lm_head_spec`), and the matmul helpers it runs on."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from hf_kd.models.loading import unwrap

# model_type -> how its *ForCausalLM.forward turns the final (post-norm) hidden state into logits, read off
# transformers 5.23's modeling files. Anything else (Granite divides by logits_scaling, MiniCPM3 scales the hidden
# state, FalconH1 multiplies by lm_head_multiplier, ...) falls back to full logits rather than risk a wrong loss.
_PLAIN_HEADS = {
    "gemma",
    "llama",
    "mistral",
    "mixtral",
    "olmo2",
    "phi3",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "smollm3",
}
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


def lm_head_spec(model: nn.Module, sharded: bool = False) -> tuple[LMHeadSpec | None, str]:
    """``(spec, "")`` for a causal LM whose head is a plain linear layer, else ``(None, reason)``.

    ``model`` may be wrapped by DDP/accelerate (``.module``) and PEFT (``get_base_model()``). The reason is a sentence
    meant for a log line when the caller falls back to full logits. ``sharded``: a weight sharded by FSDP2 or ZeRO-3
    is accepted, and the spec holds the shard: gather it before use (:mod:`hf_kd.models.gathering`).
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
    if _unsharded_class(head) is not nn.Linear:  # subclasses include quantized layers (bitsandbytes): packed weight
        return None, f"{name}'s lm_head is a {type(head).__name__}, not a plain nn.Linear; using full logits"
    weight = head.weight
    if is_sharded(weight) and not sharded and (weight.numel() == 0 or hasattr(weight, "_local_tensor")):
        return None, (
            f"{name}'s lm_head weight is sharded by FSDP2 / DeepSpeed ZeRO-3 and not gathered now "
            "(hf_kd.models.gathering); using full logits"
        )
    if not is_sharded(weight) and (type(weight) not in (torch.Tensor, nn.Parameter) or weight.dim() != 2):
        return None, (  # e.g. a bitsandbytes layer's packed weight
            f"{name}'s lm_head weight is a {type(weight).__name__} of shape {tuple(weight.shape)} (quantized?); "
            "using full logits"
        )
    softcap = getattr(config, "final_logit_softcapping", None) if model_type in _SOFTCAPPED_HEADS else None
    scale = getattr(config, "logit_scale", None) if model_type in _SCALED_HEADS else None
    return LMHeadSpec(weight=weight, bias=head.bias, softcap=softcap, logit_scale=scale), ""


def _unsharded_class(module: nn.Module) -> type:
    """The module's class before FSDP2 (``fully_shard`` swaps it for ``FSDP<Class>(FSDPModule, Class)``)."""
    cls = type(module)
    return cls.__bases__[1] if len(cls.__bases__) == 2 and cls.__bases__[0].__name__ == "FSDPModule" else cls


def is_sharded(weight: torch.Tensor) -> bool:
    """Whether ``weight`` belongs to a sharding engine: a ZeRO-3 partitioned parameter (gathered now or not: its
    rows live in partitions, gathered only around its module's forward and backward) or an FSDP2 ``DTensor`` shard."""
    return hasattr(weight, "ds_shape") or hasattr(weight, "_local_tensor")


def finish_logits(logits, logit_scale, softcap, in_place=False):
    """Cohere's ``* logit_scale``, then Gemma's ``cap * tanh(x / cap)``, in the order transformers applies them.

    ``in_place``: overwrite ``logits`` (a chunk buffer outside autograd) instead of allocating new tensors.
    """
    if logit_scale is not None:
        logits = logits.mul_(logit_scale) if in_place else logits * logit_scale
    if softcap is not None:
        logits = logits.div_(softcap).tanh_().mul_(softcap) if in_place else torch.tanh(logits / softcap) * softcap
    return logits


def project(hidden, weight, bias, dtype, out=None, low_out=None):
    """``hidden [c, H] @ weight[V, H].T (+ bias [V])`` -> ``[c, V]`` in ``dtype``, accumulated in at least float32;
    written into ``out`` (``[c, V]``, ``dtype``) when given, a buffer reused chunk after chunk.

    A ``weight`` in bf16/fp16 (:func:`as_projection_weight`: CUDA, or the Trainer's autocast) takes ``hidden``
    rounded to its dtype: float32 straight out of the matmul where it can (``out_dtype``, CUDA), else
    :func:`compensated_mm` (``low_out``: its ``[c, V]`` buffer in the weight's dtype, reused like ``out``)."""
    if weight.dtype != dtype:  # no float32 copy of W
        hidden = hidden.to(weight.dtype)
        if _mm_emits(weight.device, weight.dtype, dtype):
            logits = torch.mm(hidden, weight.T, out_dtype=dtype, out=out)
        else:
            logits = compensated_mm(hidden, weight.T, dtype, out=out, low_out=low_out)
        return logits if bias is None else logits.add_(bias)
    hidden = hidden.to(dtype)
    return torch.mm(hidden, weight.T, out=out) if bias is None else torch.addmm(bias, hidden, weight.T, out=out)


def compensated_mm(a, b, dtype, out=None, low_out=None):
    """``a @ b`` of bf16/fp16 matrices as ``dtype`` (float32) where no matmul emits float32 (CPU): the rounded
    product, plus its rounding error, which a second matmul of the same inputs recovers.

    A bf16 matmul accumulates in float32 and rounds once (up to 2^-8 relative: 0.06 on a logit of 20, a 6% change of
    its probability); ``addmm`` with ``beta=-1`` adds the rounded product to the float32 accumulator before it
    rounds, so ``a @ b - high`` comes out as small as that error and is kept to 2^-16 relative of the product.
    ``high + error`` is then the float32 product of the bf16 inputs (what ``out_dtype`` gives on CUDA) for two bf16
    matmuls: 2.2x faster than one float32 matmul on an AVX512-BF16 CPU (Zen 4 family, [256, 1024] @ [1024, 32000],
    one thread). ``low_out``: ``[m, n]`` in ``a``'s dtype."""
    high = torch.mm(a, b, out=low_out)
    out = high.to(dtype) if out is None else out.copy_(high)
    return out.add_(high.addmm_(a, b, beta=-1))  # high <- a @ b - high: the rounding error


def as_projection_weight(weight, dtype, low=None):
    """A head's weight (student or teacher) as :func:`project` takes it: in ``low`` (bf16/fp16, the autocast
    dtype) when given; kept in bf16/fp16 where the GPU matmul can emit ``dtype`` (float32); else cast to ``dtype``."""
    if low is not None:
        return weight.to(low)  # once per call (a no-op for a weight already in it), never per chunk
    if weight.dtype != dtype and _mm_emits(weight.device, weight.dtype, dtype):
        return weight
    return weight.to(dtype)  # once per call, never per chunk


def autocast_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the Trainer's autocast (``bf16=True`` / ``fp16=True``) runs ``device``'s matmuls in, for chunk
    logits in ``dtype``: bf16/fp16 under autocast when ``dtype`` is float32, else ``None`` (float64 is never cast)."""
    if dtype != torch.float32 or not torch.is_autocast_enabled(device.type):
        return None
    low = torch.get_autocast_dtype(device.type)
    return low if low in (torch.bfloat16, torch.float16) else None


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

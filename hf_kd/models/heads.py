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

"""A student made from its teacher by keeping some of its decoder layers (depth pruning, as in Minitron / DistillKit):
it starts with the teacher's embeddings, head and the kept layers' weights, so distillation repairs a model that
already knows the vocabulary instead of training one from nothing."""

from __future__ import annotations

import copy

import torch
from torch import nn


def evenly_spaced(total: int, depth: int) -> list[int]:
    """``depth`` layer indices out of ``total``, the first and the last included, evenly spaced in between."""
    if not 1 <= depth <= total:
        raise ValueError(f"depth must be in [1, {total}], got {depth}")
    if depth == 1:
        return [total - 1]
    return [round(i * (total - 1) / (depth - 1)) for i in range(depth)]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a transformers causal LM (``model.model.layers`` for Llama, Qwen, Mistral, ...)."""
    return _layer_owner(model).layers


def _layer_owner(model: nn.Module) -> nn.Module:
    """The module whose ``layers`` attribute is the decoder layer list (the base model: ``model.model``)."""
    owner = getattr(model, "base_model", model)  # transformers: the base model under its prefix (LlamaModel)
    if not isinstance(getattr(owner, "layers", None), nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no decoder layer list at .model.layers to prune")
    return owner


def prune_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of ``model`` with only the decoder layers ``keep`` (indices, in order), everything else shared by value
    (embeddings, final norm, head). The config says the new depth, and each kept attention layer gets its new index:
    the KV cache is indexed by it, so a stale index breaks ``generate``. The copy is trainable (every parameter
    requires grad) and in train mode, whatever the model was: a teacher is frozen once a trainer holds it, and a
    student copied from it afterwards would otherwise train nothing."""
    layers = decoder_layers(model)
    total = len(layers)
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= total:
        raise ValueError(f"keep must be increasing distinct layer indices in [0, {total - 1}], got {keep}")
    pruned = copy.deepcopy(model)
    inner = decoder_layers(pruned)
    kept = nn.ModuleList(inner[i] for i in keep)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    _layer_owner(pruned).layers = kept
    config = pruned.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds (sliding / full) follow the layers
        config.layer_types = [config.layer_types[i] for i in keep]
    pruned.requires_grad_(True)
    return pruned.train()


@torch.no_grad()
def drop_one_divergence(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """How much each decoder layer matters: per layer, the mean KL(model || model without that layer) per token on a
    batch (float64 sums; every position counts where ``attention_mask`` is 1). The layers are skipped in place, one at
    a time, and restored: no copy of the model is made."""
    owner, config = _layer_owner(model), model.config
    layers, depth, types = owner.layers, config.num_hidden_layers, getattr(config, "layer_types", None)
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()

    def log_probs():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return torch.log_softmax(logits[mask].double(), -1)

    was_training = model.training
    model.eval()
    scores = []
    try:
        full = log_probs()
        for skipped in range(len(layers)):
            owner.layers = nn.ModuleList(layer for i, layer in enumerate(layers) if i != skipped)
            config.num_hidden_layers = len(layers) - 1
            if types is not None:
                config.layer_types = [kind for i, kind in enumerate(types) if i != skipped]
            without = log_probs()
            scores.append((full.exp() * (full - without)).sum(-1).mean().item())
    finally:
        owner.layers, config.num_hidden_layers = layers, depth
        if types is not None:
            config.layer_types = types
        model.train(was_training)
    return scores


def most_important(scores: list[float], depth: int) -> list[int]:
    """The ``depth`` layers whose removal alone costs most (:func:`drop_one_divergence`), in model order."""
    if not 1 <= depth <= len(scores):
        raise ValueError(f"depth must be in [1, {len(scores)}], got {depth}")
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:depth])

"""A sharded output head (FSDP2, DeepSpeed ZeRO-3) made whole for the fused loss, which reads the head's weight
outside the model's forward.

Under FSDP2 the weight is a ``DTensor`` shard outside the forward of its FSDP unit; under ZeRO-3 an empty placeholder
whose rows live in partitions, gathered only while its module's forward (or backward) runs. Two ways to see it whole:

* :func:`gathered_head` -- no gradient (the frozen teacher's head, the student's in evaluation): the unit unsharded
  (FSDP2) or the parameters gathered read-only (ZeRO-3) for the duration of the block, then freed;
* :func:`as_head_forward` -- the student's head in training: the loss runs *as the head module's forward*, so the
  engine's own hooks gather the weight before it and, in backward, gather it again and reduce-scatter the gradient the
  loss gives it into each process's shard. A weight gathered by hand (ZeRO-3's ``GatheredParameters``) outside its
  module's forward has no such hooks: its gradient would never reach the partitions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from hf_kd.models.heads import LMHeadSpec, is_sharded, lm_head_spec
from hf_kd.models.loading import unwrap


@contextlib.contextmanager
def gathered_head(model: nn.Module) -> Iterator[LMHeadSpec]:
    """``model``'s head spec with its whole weight, for reading without a gradient; a head that is not sharded is
    yielded as it is. Every process must enter it together (it is a collective)."""
    spec = lm_head_spec(model, sharded=True)[0]
    if spec is None or not is_sharded(spec.weight):
        yield spec
        return
    head = unwrap(model).get_output_embeddings()
    if hasattr(spec.weight, "ds_shape"):
        import deepspeed

        params = [p for p in (head.weight, head.bias) if p is not None]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):  # read-only: nothing is written back
            yield lm_head_spec(model)[0]
        return
    unit = fsdp_unit(model, head)
    unit.unshard()  # the whole unit (final norm, head and tied embeddings: Accelerate groups them)
    try:
        yield lm_head_spec(model)[0]  # read now: FSDP2 swaps the module's parameters for the unsharded ones
    finally:
        unit.reshard()


def as_head_forward(model: nn.Module, hidden: torch.Tensor, fn: Callable[[torch.Tensor, LMHeadSpec], object]):
    """``fn(hidden, spec)`` run as the forward of ``model``'s output head module, with its weight whole in ``spec``.

    The engine's forward hooks on the head (FSDP2 unit, ZeRO-3 module) see one call of the head taking ``hidden``
    and returning what ``fn`` returns (a tensor, or a dict / tuple of them): they gather the weight before ``fn`` and
    register the backward hooks that gather it again and reduce its gradient, as for any call of the head. ``fn``
    must compute from the ``hidden`` it is given (the engine may wrap the input to hook its gradient)."""
    head = unwrap(model).get_output_embeddings()

    def forward(rows):
        return fn(rows, lm_head_spec(model)[0])

    previous = head.__dict__.get("forward")  # a forward set on the object (Accelerate's device hooks, a patch)
    head.forward = forward  # an instance attribute: nn.Module.__call__ runs the hooks, then this
    try:
        return head(hidden)
    finally:
        if previous is None:
            del head.forward  # the class's forward again
        else:
            head.forward = previous


def fsdp_unit(model: nn.Module, module: nn.Module) -> nn.Module:
    """The FSDP2 unit that holds ``module``'s parameters: ``module`` itself when Accelerate made it one (the head, in
    its final-norm + head group), else its nearest wrapped ancestor (the root at least)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        return module
    owner = None
    for candidate in unwrap(model).modules():  # parents come before their children: the last match is the nearest
        if isinstance(candidate, FSDPModule) and any(m is module for m in candidate.modules()):
            owner = candidate
    if owner is None:
        raise ValueError(f"{type(module).__name__} is not inside an FSDP2 unit")
    return owner

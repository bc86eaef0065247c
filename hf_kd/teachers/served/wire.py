"""What crosses the wire between a teacher server and its clients: tensors as safetensors bytes (never JSON floats),
and the head's identity.

A request is ``{"input_ids": [B, S] int64, "attention_mask": [B, S] int64}``; an answer ``{"hidden": [B, S, H]}`` in
the dtype the client asked for. The head (``weight [V, H]``, ``bias [V]``; ``logit_scale`` and ``softcap`` in the
metadata) is sent once, named by the SHA-256 of its bytes, which ``/info`` reports: a client that holds that hash
holds the head.
"""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load, save

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKEN_HEADER = "Authorization"  # "Bearer <token>" when the server was started with a token file


def pack(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Tensors (moved to the CPU, made contiguous) -> safetensors bytes."""
    return save({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, metadata=metadata)


def unpack(data: bytes) -> dict[str, torch.Tensor]:
    return load(data)


def head_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (the head's logit scale and softcap)."""
    import json
    import struct

    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

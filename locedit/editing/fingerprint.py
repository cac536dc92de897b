"""A fingerprint of a model's **weights** (not its name or path): SHA-256 over the geometry and the bytes of a fixed,
small set of tensors — the token embedding and every layer's MLP output projection — of the unedited model.

Each tensor is hashed in the narrowest of bfloat16, float16 and float32 that holds its values exactly, so a bfloat16
checkpoint loaded as float32 has the fingerprint it has loaded as bfloat16; weights that differ in one element do
not share one. The value is cached per model and recomputed when one of those tensors is written in place."""

from __future__ import annotations

import hashlib
import json
import weakref

import torch

from locedit.core.lm import materialized
from locedit.editing.edit import geometry, unedited
from locedit.errors import LoceditError

FINGERPRINT_VERSION = 1
_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, str]]" = weakref.WeakKeyDictionary()
_ROWS = 4096  # rows hashed per chunk (bounds the memory a 7B embedding needs on the CPU)


def fingerprinted_modules(lm) -> list[tuple[str, torch.nn.Module]]:
    """The (name, module) pairs whose `.weight` the fingerprint covers: the embedding, then each layer's MLP output
    projection."""
    adapter = lm.adapter
    out = [("embed", adapter.embed_module(lm.model))]
    for layer in range(lm.num_layers):
        out.append((f"layer{layer}.mlp_down", adapter.layer_part(lm.model, layer, adapter.mlp_down)))
    return out


def fingerprinted_tensors(lm) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs the fingerprint covers (offloaded ones are meta tensors outside `materialized`)."""
    return [(name, module.weight) for name, module in fingerprinted_modules(lm)]


def weights_fingerprint(lm) -> str:
    """The hex SHA-256 fingerprint of `lm`'s unedited weights (edits applied with locedit are reverted while it is
    computed and re-applied afterwards; the weights end as they began). Cached per model and tensor state, so a
    model with edits applied is reverted only the first time."""
    cache = _CACHE.setdefault(lm.model, {})
    now = _state(lm)
    if now in cache:
        return cache[now]
    with unedited(lm):
        original = _state(lm)
        value = cache.get(original)
        if value is None:
            digest = hashlib.sha256(json.dumps({"version": FINGERPRINT_VERSION, "geometry": geometry(lm)},
                                               sort_keys=True).encode())
            for name, module in fingerprinted_modules(lm):
                with materialized(module):  # an offloaded weight is loaded for the hash, one module at a time
                    _update(digest, name, module.weight)
            value = digest.hexdigest()
    if len(cache) > 16:  # states of long-gone edits
        cache.clear()
    cache[original] = value
    cache[_state(lm)] = value  # the state the edits were re-applied to
    return value


def _state(lm) -> tuple:
    """Where each fingerprinted tensor lives and how often it was written in place (torch's version counter)."""
    return tuple((t.data_ptr(), t._version) for _, t in fingerprinted_tensors(lm))


def canonical_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The narrowest of bfloat16, float16 and float32 that represents every value of `tensor` exactly."""
    t = tensor.detach()
    for dtype in (torch.bfloat16, torch.float16):
        if t.dtype == dtype or torch.equal(t.to(dtype).to(t.dtype), t):
            return dtype
    return torch.float32


def _update(digest, name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type == "meta":
        raise LoceditError(f"cannot fingerprint the weights: {name} is offloaded (a meta tensor)")
    with torch.no_grad():
        dtype = canonical_dtype(tensor)
        digest.update(f"{name}:{dtype}:{tuple(tensor.shape)}:".encode())
        flat = tensor.detach().reshape(tensor.shape[0], -1) if tensor.dim() else tensor.detach().reshape(1, 1)
        for start in range(0, flat.shape[0], _ROWS):
            chunk = flat[start:start + _ROWS].to(dtype).contiguous().cpu()
            digest.update(chunk.reshape(-1).view(torch.uint8).numpy().tobytes())



"""Attaching interventions to a model: hooks on the adapter's modules plus a registered attention function.

`attached(lm, passes)` is the one place where locedit touches a model. On exit — also through an exception — every
hook is removed, the attention implementation is restored and the registered attention/mask functions are
unregistered when no other model still uses them.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from locedit.errors import InterventionError
from locedit.core.engine.interventions import (
    PROJECTIONS,
    AddEmbeddingNoise,
    AddLinear,
    AddToSublayer,
    BlockAttention,
    Capture,
    Intervention,
    SetHeads,
    SetResidual,
    SetSublayer,
    UniformAttention,
)

ATTN_NAME = "locedit"
_LOCK = threading.Lock()
_ACTIVE_MODULES: dict[int, tuple["Layout", int]] = {}  # id(attention module) -> (pass state, layer)
_ACTIVE_MODELS: set[int] = set()
_REGISTRATIONS = 0


# --------------------------------------------------------------------------------------------------------------
# Layouts: how the rows of one forward pass map to interventions and token positions
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Layout:
    """The batch of one forward pass (or of the layers of one pass that use it).

    Row i computes tokens [t0, t1) of a sequence whose own prompt has `lengths[i]` tokens starting at padded
    index `pad_left[i]`; `interventions[i]` apply to it. Keys span [0, t1) (earlier ones come from the cache).
    """

    interventions: list[list[Intervention]]
    lengths: list[int]
    pad_left: list[int]
    t0: int
    t1: int
    num_layers: int
    num_heads: int
    device: torch.device | None = None  # where index tensors and masks are built (the model's device)
    # True when rows are right-padded prompts run without a padding mask (`run_packed`): a real token never sees
    # the padding after it, so the mask is purely causal for every position that is read
    causal_only: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return len(self.interventions)

    @property
    def unpadded(self) -> bool:
        """Every row is a full, unpadded prompt of `t1` tokens (the attention mask is then purely causal)."""
        return all(p == 0 for p in self.pad_left) and all(n == self.t1 for n in self.lengths)

    def absolute(self, row: int, position: int) -> int:
        n = self.lengths[row]
        if not -n <= position < n:
            raise InterventionError(f"position {position} is outside a prompt of {n} tokens")
        return self.pad_left[row] + (position if position >= 0 else n + position)

    def _check_layers(self, layers: Sequence[int], allow_final: bool = False) -> None:
        top = self.num_layers + (1 if allow_final else 0)
        for layer in layers:
            if not 0 <= layer < top:
                raise InterventionError(f"layer {layer} does not exist (the model has {self.num_layers} layers)")

    def _check_heads(self, heads: Sequence[int]) -> None:
        for head in heads:
            if not 0 <= head < self.num_heads:
                raise InterventionError(f"head {head} does not exist (the model has {self.num_heads} heads)")

    # --- writes: (rows, local positions[, heads]) -> values -------------------------------------------------------
    def writes(self, site: str, layer: int) -> "Writes | None":
        key = ("w", site, layer)
        if key not in self._cache:
            self._cache[key] = self._build_writes(site, layer)
        return self._cache[key]

    def adds(self, kind: str, layer: int) -> "list[Writes]":
        """The `AddToSublayer` writes at projection `kind` of `layer`, one `Writes` per distinct column range."""
        key = ("a", kind, layer)
        if key not in self._cache:
            ranges = sorted({iv.columns for ivs in self.interventions for iv in ivs
                             if isinstance(iv, AddToSublayer) and iv.kind == kind and iv.layer == layer},
                            key=lambda c: (-1, -1) if c is None else c)
            built = [self._build_writes(kind, layer, columns) for columns in ranges]
            self._cache[key] = [w for w in built if w is not None]
        return self._cache[key]

    def linear(self, kind: str, layer: int) -> "list[tuple[torch.Tensor | None, torch.Tensor]]":
        """The `AddLinear` deltas at projection `kind` of `layer`: [(rows or None for every row, delta)]."""
        key = ("l", kind, layer)
        if key not in self._cache:
            groups: dict[int, tuple[list[int], torch.Tensor]] = {}
            for row, ivs in enumerate(self.interventions):
                for iv in ivs:
                    if isinstance(iv, AddLinear) and iv.kind == kind and iv.layer == layer:
                        groups.setdefault(id(iv.delta), ([], iv.delta))[0].append(row)
            self._cache[key] = [
                (None if rows == list(range(self.batch)) else torch.tensor(rows, dtype=torch.long,
                                                                           device=self.device), delta)
                for rows, delta in groups.values()]
        return self._cache[key]

    def _build_writes(self, site: str, layer: int, columns: tuple[int, int] | None = None) -> "Writes | None":
        entries: dict[tuple, torch.Tensor | None] = {}
        additive = site == "embed" or site in PROJECTIONS
        for row, ivs in enumerate(self.interventions):
            for iv in ivs:
                for pos_list, heads, value in _writes_of(iv, site, layer, self, columns):
                    for k, pos in enumerate(pos_list):
                        absolute = self.absolute(row, pos)
                        if not self.t0 <= absolute < self.t1:
                            continue
                        local = absolute - self.t0
                        v = None if value is None else value[k]
                        for head in heads:
                            key = (row, local) if head is None else (row, local, head)
                            if additive and key in entries:
                                entries[key] = entries[key] + v
                            else:
                                entries[key] = v
        if not entries:
            return None
        keys = list(entries)
        index = tuple(torch.tensor(col, dtype=torch.long, device=self.device) for col in zip(*keys))
        values = list(entries.values())
        zero = all(v is None for v in values)
        if not zero:
            ref = next(v for v in values if v is not None)
            device = self.device if self.device is not None else ref.device
            ref = ref.to(device)
            # values may come from different devices (a user's CPU tensor, a capture on the GPU): gather them on
            # the model's device once, here, instead of once per forward
            values = torch.stack([torch.zeros_like(ref) if v is None else v.to(device=device, dtype=ref.dtype)
                                  for v in values])
        cols = None if columns is None else torch.arange(*columns, dtype=torch.long, device=self.device)
        return Writes(index=index, values=None if zero else values, additive=additive, columns=cols)

    # --- attention edits --------------------------------------------------------------------------------------
    def blocked(self, layer: int) -> torch.Tensor | None:
        """Boolean (batch, heads or 1, t1 - t0, t1): True where the edge is knocked out at `layer`."""
        key = ("b", layer)
        if key not in self._cache:
            self._cache[key] = self._build_blocked(layer)
        return self._cache[key]

    def _build_blocked(self, layer: int) -> torch.Tensor | None:
        edits = [(row, iv) for row, ivs in enumerate(self.interventions) for iv in ivs
                 if isinstance(iv, BlockAttention) and layer in iv.layers]
        if not edits:
            return None
        per_head = any(iv.heads is not None for _, iv in edits)
        mask = torch.zeros(self.batch, self.num_heads if per_head else 1, self.t1 - self.t0, self.t1, dtype=torch.bool)
        for row, iv in edits:
            queries = [self.absolute(row, q) - self.t0 for q in iv.queries]
            queries = torch.tensor([q for q in queries if 0 <= q < self.t1 - self.t0], dtype=torch.long)
            keys = [self.absolute(row, k) for k in iv.keys]
            keys = torch.tensor([k for k in keys if k < self.t1], dtype=torch.long)
            if queries.numel() == 0 or keys.numel() == 0:
                continue
            heads = torch.arange(mask.shape[1]) if iv.heads is None else torch.tensor(iv.heads, dtype=torch.long)
            mask[row, heads[:, None, None], queries[None, :, None], keys[None, None, :]] = True
        # built on the CPU (many small index writes), copied to the model's device once and cached there
        return mask.to(self.device) if self.device is not None else mask

    def uniform_queries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = ("u", layer)
        if key not in self._cache:
            pairs = {(row, self.absolute(row, q) - self.t0)
                     for row, ivs in enumerate(self.interventions) for iv in ivs
                     if isinstance(iv, UniformAttention) and layer in iv.layers for q in iv.queries}
            pairs = sorted(p for p in pairs if 0 <= p[1] < self.t1 - self.t0)
            self._cache[key] = (tuple(torch.tensor(c, dtype=torch.long, device=self.device) for c in zip(*pairs))
                                if pairs else None)
        return self._cache[key]

    def validate(self) -> None:
        """Check every intervention's layers, heads and positions up front (clear errors before any forward)."""
        for row, ivs in enumerate(self.interventions):
            for iv in ivs:
                if isinstance(iv, SetResidual):
                    self._check_layers([iv.layer], allow_final=True)
                elif not isinstance(iv, AddEmbeddingNoise):
                    self._check_layers(iv.layers)
                if isinstance(iv, AddLinear):
                    continue
                if isinstance(iv, (SetHeads,)) or (isinstance(iv, BlockAttention) and iv.heads is not None):
                    self._check_heads(iv.heads)
                positions = iv.queries + iv.keys if isinstance(iv, BlockAttention) else (
                    iv.queries if isinstance(iv, UniformAttention) else iv.positions)
                for p in positions:
                    self.absolute(row, p)


@dataclass
class Writes:
    index: tuple[torch.Tensor, ...]
    values: torch.Tensor | None  # None: zeros
    additive: bool
    columns: torch.Tensor | None = None  # output features written (all when None)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        index = tuple(i.to(h.device) for i in self.index)
        if self.columns is not None:
            index = tuple(i[:, None] for i in index) + (self.columns.to(h.device)[None, :],)
            values = self.values.to(device=h.device, dtype=h.dtype)
            return h.index_put(index, values, accumulate=self.additive)
        if self.values is None:
            values = torch.zeros((), dtype=h.dtype, device=h.device).expand(len(index[0]), *h.shape[len(index):])
        else:
            values = self.values.to(device=h.device, dtype=h.dtype)
        return h.index_put(index, values, accumulate=self.additive)


def _broadcast(value: torch.Tensor | None, n: int, width: int | None, what: str) -> torch.Tensor | None:
    if value is None:
        return None
    value = torch.as_tensor(value)
    if value.dim() > 2:
        raise InterventionError(f"{what}: value of shape {tuple(value.shape)} has more than 2 dimensions")
    try:
        return value.expand(n, width if width is not None else value.shape[-1])
    except RuntimeError:
        raise InterventionError(
            f"{what}: value of shape {tuple(value.shape)} does not broadcast to ({n}, {width})"
        ) from None


def _writes_of(iv: Intervention, site: str, layer: int, layout: Layout, columns: tuple[int, int] | None = None):
    """Yield (positions, heads, values) of `iv` at `site`/`layer`; values row k belongs to positions[k]."""
    if site in PROJECTIONS:
        if isinstance(iv, AddToSublayer) and iv.kind == site and iv.layer == layer and iv.columns == columns:
            yield iv.positions, (None,), _broadcast(iv.value, len(iv.positions), None, "AddToSublayer")
    elif site == "embed" and isinstance(iv, AddEmbeddingNoise):
        yield iv.positions, (None,), _broadcast(iv.noise, len(iv.positions), None, "AddEmbeddingNoise")
    elif site == "residual" and isinstance(iv, SetResidual) and iv.layer == layer:
        yield iv.positions, (None,), _broadcast(iv.value, len(iv.positions), None, "SetResidual")
    elif site in ("attn", "mlp") and isinstance(iv, SetSublayer) and iv.sublayer == site and layer in iv.layers:
        yield iv.positions, (None,), _broadcast(iv.value, len(iv.positions), None, "SetSublayer")
    elif site == "heads" and isinstance(iv, SetHeads) and layer in iv.layers:
        yield iv.positions, iv.heads, _broadcast(iv.value, len(iv.positions), None, "SetHeads")


# --------------------------------------------------------------------------------------------------------------
# A forward pass: which layout each layer uses, what to capture
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Pass:
    """One forward pass. Layers below `split` use `lower` (batch P); from `split` on the batch is expanded with
    `expand_index` (row -> lower row) and uses `upper`. Without a split, `upper` serves every layer."""

    upper: Layout
    lower: Layout | None = None
    split: int = 0
    expand_index: torch.Tensor | None = None
    capture: Capture | None = None
    captured: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)  # with `Capture(moments=True)`: vectors summed per (site, layer)
    # True when the engine built the forward itself (`run`, `run_batch`): the attention mask it receives is then
    # exactly causal (plus its layouts' padding), so layers without edge knockouts may use the kernel's own
    # causal path. False for `intervene`, where the caller's mask may hold anything.
    engine_mask: bool = False

    def layout(self, layer: int) -> Layout:
        return self.lower if (self.lower is not None and layer < self.split) else self.upper

    def wants(self, site: str, layer: int) -> bool:
        return self.capture is not None and self.capture.wants(site, layer)

    def record(self, site: str, layer: int, value: torch.Tensor) -> None:
        if self.capture is not None and self.capture.moments:
            x = value.detach()
            x = x.reshape(-1, x.shape[-2] * x.shape[-1]) if site == "heads" else x.reshape(-1, x.shape[-1])
            x = x.float()
            key = (site, layer)
            if key in self.captured:
                self.captured[key].addmm_(x.T, x)
            else:
                self.captured[key] = x.T @ x
            self.counts[key] = self.counts.get(key, 0) + x.shape[0]
            return
        self.captured[(site, layer)] = value


# --------------------------------------------------------------------------------------------------------------
# The registered attention function
# --------------------------------------------------------------------------------------------------------------
def _locedit_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    entry = _ACTIVE_MODULES.get(id(module))
    if entry is None:
        raise RuntimeError("locedit attention function called for a module outside an intervention context")
    state, layer = entry
    return state.attention(module, layer, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    global _REGISTRATIONS
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if _REGISTRATIONS == 0:
        AttentionInterface.register(ATTN_NAME, _locedit_attention)
        AttentionMaskInterface.register(ATTN_NAME, eager_mask)
    _REGISTRATIONS += 1


def _unregister() -> None:
    global _REGISTRATIONS
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _REGISTRATIONS -= 1
    if _REGISTRATIONS == 0:
        AttentionInterface._global_mapping.pop(ATTN_NAME, None)
        AttentionMaskInterface._global_mapping.pop(ATTN_NAME, None)


def registered() -> bool:
    """Whether locedit's attention function is currently registered with transformers (for tests)."""
    from transformers import AttentionInterface

    return ATTN_NAME in AttentionInterface._global_mapping


class _PassState:
    """Dispatch target of hooks while a `Pass` runs; swapped between passes of one attachment."""

    def __init__(self, lm, base_kernel: Callable, eager_kernel: Callable, base_is_sdpa: bool = False,
                 causal_limit: int | None = None):
        self.lm = lm
        self.pass_: Pass | None = None
        self.base_kernel = base_kernel
        self.eager_kernel = eager_kernel
        # SDPA computes causal attention itself (`is_causal`, or nothing to mask for one last query): with no
        # edit at a layer, handing it no mask keeps the fast kernels (flash / cuDNN) that an explicit mask
        # disables, and gives exactly the plain forward's numbers. Not beyond a sliding window.
        self.base_is_sdpa = base_is_sdpa
        self.causal_limit = causal_limit

    def _maskless(self, layout: Layout, query, key, kwargs) -> bool:
        p = self.pass_
        if not (self.base_is_sdpa and p.engine_mask and (layout.unpadded or layout.causal_only)):
            return False
        q_len, k_len = query.shape[2], key.shape[2]
        if k_len != layout.t1 or kwargs.get("sliding_window") is not None and k_len > kwargs["sliding_window"]:
            return False
        if self.causal_limit is not None and k_len > self.causal_limit:
            return False
        # q == k: causal from position 0 (SDPA's top-left causal alignment is right); one query at the end of
        # the sequence sees every key
        return (q_len == k_len and layout.t0 == 0) or q_len == 1

    def attention(self, module, layer, query, key, value, attention_mask, **kwargs):
        p = self.pass_
        layout = p.layout(layer)
        b, _, q_len, _ = query.shape
        k_len = key.shape[2]
        blocked = layout.blocked(layer)
        uniform = layout.uniform_queries(layer)
        if uniform is not None:
            rows, qpos = (t.to(query.device) for t in uniform)
            qt = query.transpose(1, 2)
            qt = qt.index_put((rows, qpos), torch.zeros((), dtype=qt.dtype, device=qt.device).expand(
                len(rows), *qt.shape[2:]))
            query = qt.transpose(1, 2)
        weights_wanted = p.wants("attn_weights", layer)
        if blocked is None and not weights_wanted and self._maskless(layout, query, key, kwargs):
            return self.base_kernel(module, query, key, value, None, **kwargs)
        mask = attention_mask
        if mask is None:
            causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
            mask = torch.zeros(1, 1, q_len, k_len, dtype=query.dtype, device=query.device)
            mask = mask.masked_fill(~causal, torch.finfo(query.dtype).min)
        else:
            mask = mask[:, :, :, :k_len]  # built by transformers in the model's dtype (0 / the dtype's minimum)
        if mask.shape[0] not in (1, b):
            # the mask was built for the lower (pre-expansion) batch: map rows to their lower row
            mask = mask.index_select(0, p.expand_index.to(mask.device))
        if blocked is not None:
            if blocked.shape[-2:] != (q_len, k_len):
                raise InterventionError(
                    f"internal: block mask {tuple(blocked.shape)} does not fit attention ({q_len}, {k_len})")
            if mask.dtype == torch.bool:  # True = attend
                mask = mask & ~blocked.to(mask.device)
            else:  # additive: the dtype's minimum, so the remaining weights renormalise
                mask = mask.masked_fill(blocked.to(mask.device), torch.finfo(mask.dtype).min)
        kernel = self.eager_kernel if weights_wanted else self.base_kernel
        out, weights = kernel(module, query, key, value, mask, **kwargs)
        if weights_wanted:
            p.record("attn_weights", layer, weights)
        return out, weights


def _first_tensor(args, kwargs, name: str = "hidden_states"):
    if args:
        return args[0], lambda v: ((v, *args[1:]), kwargs)
    return kwargs[name], lambda v: (args, {**kwargs, name: v})


def _output_tensor(output):
    if isinstance(output, torch.Tensor):
        return output, lambda v: v
    return output[0], lambda v: (v, *output[1:])


def _eager_kernel_for(module: nn.Module) -> Callable:
    kernel = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if kernel is None:
        raise InterventionError(f"{type(module).__name__} has no eager attention kernel")
    return kernel


@contextmanager
def attached(lm, projections: bool = False) -> Iterator[_PassState]:
    """Attach locedit's hooks and attention function to `lm.model` for the duration of the block.

    Set `state.pass_` before each forward. `projections`: also hook the projections and layer outputs that
    `AddToSublayer`, `AddLinear`, `Capture(outputs=..., attn_in=...)` use (off by default: fewer hooks, faster
    forwards). Everything is undone on exit, also through an exception."""
    from transformers import AttentionInterface

    model, adapter = lm.model, lm.adapter
    with _LOCK:
        if id(model) in _ACTIVE_MODELS:
            raise InterventionError("this model already has locedit interventions attached; nesting is not supported")
        _ACTIVE_MODELS.add(id(model))
    handles = []
    configs = _configs_of(model)
    original = [(cfg, cfg._attn_implementation) for cfg in configs]
    attn_modules = [adapter.layer_part(model, i, adapter.attn) for i in range(lm.num_layers)]
    base_name = original[0][1] or "eager"
    eager = _eager_kernel_for(attn_modules[0])
    if base_name == "eager" or base_name not in AttentionInterface._global_mapping:
        base_kernel = eager  # flash and other kernels cannot take an arbitrary mask: eager is exact
    else:
        base_kernel = AttentionInterface._global_mapping[base_name]
    windows = [w for cfg in configs for w in (getattr(cfg, "sliding_window", None),
                                               getattr(cfg, "attention_chunk_size", None)) if isinstance(w, int)]
    state = _PassState(lm, base_kernel, eager, base_is_sdpa=base_name == "sdpa",
                       causal_limit=min(windows) if windows else None)
    try:
        with _LOCK:
            _register()
        for cfg in configs:
            cfg._attn_implementation = ATTN_NAME
        for layer, module in enumerate(attn_modules):
            _ACTIVE_MODULES[id(module)] = (state, layer)
        handles += _install_hooks(lm, state, projections)
        yield state
    finally:
        for h in handles:
            h.remove()
        for module in attn_modules:
            _ACTIVE_MODULES.pop(id(module), None)
        for cfg, impl in original:
            cfg._attn_implementation = impl
        with _LOCK:
            if registered():
                _unregister()
            _ACTIVE_MODELS.discard(id(model))


def _configs_of(model: nn.Module) -> list:
    seen, configs = set(), []
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            configs.append(cfg)
    return configs


def _install_hooks(lm, state: _PassState, projections: bool = False) -> list:
    model, adapter, n_layers = lm.model, lm.adapter, lm.num_layers
    handles = []

    def embed_hook(module, args, output):
        w = state.pass_.layout(-1).writes("embed", -1)
        return w.apply(output) if w is not None else output

    handles.append(adapter.embed_module(model).register_forward_hook(embed_hook))

    def layer_output(p: Pass, layer: int, h: torch.Tensor) -> torch.Tensor:
        """What decoder layer `layer` outputs, after its `AddToSublayer("layer", ...)` writes."""
        if not projections:
            return h
        for w in p.layout(layer).adds("layer", layer):
            h = w.apply(h)
        if p.wants("layer", layer):
            p.record("layer", layer, h)
        return h

    for layer in range(n_layers):
        block = adapter.get_layers(model)[layer]

        def pre_layer(module, args, kwargs, layer=layer):
            p = state.pass_
            h, rebuild = _first_tensor(args, kwargs)
            if layer > 0:
                h = layer_output(p, layer - 1, h)
            if p.lower is not None and layer == p.split:
                h = h.index_select(0, p.expand_index.to(h.device))
            w = p.layout(layer).writes("residual", layer)
            if w is not None:
                h = w.apply(h)
            if p.wants("residual", layer):
                p.record("residual", layer, h)
            return rebuild(h)

        handles.append(block.register_forward_pre_hook(pre_layer, with_kwargs=True))

        if layer == n_layers - 1:
            def post_last(module, args, output, layer=layer):
                p = state.pass_
                h, rebuild = _output_tensor(output)
                h = layer_output(p, layer, h)
                w = p.layout(layer).writes("residual", n_layers)
                if w is not None:
                    h = w.apply(h)
                if p.wants("residual", n_layers):
                    p.record("residual", n_layers, h)
                return rebuild(h)

            handles.append(block.register_forward_hook(post_last))

        for site, path in (("attn", adapter.attn_out), ("mlp", adapter.mlp_out)):
            def sublayer_hook(module, args, output, layer=layer, site=site):
                p = state.pass_
                h, rebuild = _output_tensor(output)
                w = p.layout(layer).writes(site, layer)
                if w is not None:
                    h = w.apply(h)
                if p.wants(site, layer):
                    p.record(site, layer, h)
                return rebuild(h)

            handles.append(adapter.layer_part(model, layer, path).register_forward_hook(sublayer_hook))

        def heads_hook(module, args, kwargs, layer=layer):
            p = state.pass_
            z, rebuild = _first_tensor(args, kwargs, "input")
            w = p.layout(layer).writes("heads", layer)
            if w is None and not p.wants("heads", layer):
                return None
            shaped = z.view(*z.shape[:-1], lm.num_heads, lm.head_dim)
            if w is not None:
                shaped = w.apply(shaped)
            if p.wants("heads", layer):
                p.record("heads", layer, shaped)
            return rebuild(shaped.reshape(z.shape))

        handles.append(adapter.layer_part(model, layer, adapter.attn_o).register_forward_pre_hook(
            heads_hook, with_kwargs=True))

        def input_hook(module, args, kwargs, layer=layer, site="mlp_keys"):
            p = state.pass_
            if p.wants(site, layer):
                x, _ = _first_tensor(args, kwargs, "input")
                p.record(site, layer, x)
            return None

        handles.append(adapter.layer_part(model, layer, adapter.mlp_down).register_forward_pre_hook(
            input_hook, with_kwargs=True))
        if not projections:
            continue
        qkv = adapter.layer_part(model, layer, adapter.qkv)
        handles.append(qkv.register_forward_pre_hook(partial(input_hook, layer=layer, site="attn_in"),
                                                     with_kwargs=True))

        for kind in ("mlp_down", "attn_o", "qkv"):
            def projection_hook(module, args, kwargs, output, layer=layer, kind=kind):
                p = state.pass_
                layout = p.layout(layer)
                linear, adds = layout.linear(kind, layer), layout.adds(kind, layer)
                if not linear and not adds and not p.wants(kind, layer):
                    return None
                h, rebuild = _output_tensor(output)
                if linear:
                    x, _ = _first_tensor(args, kwargs, "input")
                    for rows, delta in linear:
                        if rows is None:  # every row: FT-L's own arithmetic, bit for bit
                            h = h + (x.float() @ delta.to(x.device).T).to(h.dtype)
                        else:
                            r = rows.to(h.device)
                            h = h.index_add(0, r, (x[r].float() @ delta.to(x.device).T).to(h.dtype))
                for w in adds:
                    h = w.apply(h)
                if p.wants(kind, layer):
                    p.record(kind, layer, h)
                return rebuild(h)

            handles.append(adapter.layer_part(model, layer, getattr(adapter, kind)).register_forward_hook(
                projection_hook, with_kwargs=True))
    return handles


def needs_projections(rows: Sequence[Sequence[Intervention]], capture: Capture | None) -> bool:
    """Whether a run needs the projection hooks (`attached(lm, projections=True)`)."""
    if capture is not None and (capture.outputs or capture.attn_in):
        return True
    return any(isinstance(iv, (AddToSublayer, AddLinear)) for ivs in rows for iv in ivs)

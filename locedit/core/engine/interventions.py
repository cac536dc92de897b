"""Intervention and capture specifications: plain, immutable data. The engine turns them into hooks.

Positions are token indices of the row's own prompt (0 = its first token, BOS included where the tokenizer adds
one); negative positions count from the end (-1 = last). Layers are 0-indexed decoder layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, Union

import torch

Sublayer = Literal["attn", "mlp"]
# The modules of a layer whose output `AddToSublayer` / `AddLinear` change and `Capture(outputs=...)` records:
# the MLP output projection, the attention output projection, the value-producing projection (v_proj, qkv_proj,
# c_attn or query_key_value) and the whole decoder layer (its output is the residual entering the next layer).
Projection = Literal["mlp_down", "attn_o", "qkv", "layer"]
PROJECTIONS: tuple[str, ...] = ("mlp_down", "attn_o", "qkv", "layer")


def _projection(kind: str, what: str) -> str:
    if kind not in PROJECTIONS:
        from locedit.errors import InterventionError

        raise InterventionError(f"{what}: unknown kind {kind!r}; use one of {', '.join(PROJECTIONS)}")
    return kind


def _tuple(values) -> tuple[int, ...]:
    if isinstance(values, int):
        return (values,)
    return tuple(int(v) for v in values)


@dataclass(frozen=True, eq=False)
class BlockAttention:
    """Attention-edge knockout: at `layers`, queries at `queries` may not attend to keys at `keys` (the logit is
    set to the dtype's minimum before the softmax, so the remaining weights renormalise, as in the paper).
    `heads=None` blocks all heads."""

    layers: Sequence[int]
    queries: Sequence[int]
    keys: Sequence[int]
    heads: Sequence[int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _tuple(self.layers))
        object.__setattr__(self, "queries", _tuple(self.queries))
        object.__setattr__(self, "keys", _tuple(self.keys))
        if self.heads is not None:
            object.__setattr__(self, "heads", _tuple(self.heads))


@dataclass(frozen=True, eq=False)
class UniformAttention:
    """The official code's attention "knockout": at `layers`, queries at `queries` attend uniformly to every
    visible key (done by zeroing their query vectors)."""

    layers: Sequence[int]
    queries: Sequence[int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _tuple(self.layers))
        object.__setattr__(self, "queries", _tuple(self.queries))


@dataclass(frozen=True, eq=False)
class SetSublayer:
    """Replace what the attention or MLP sublayer adds to the residual stream at `layers` x `positions`.

    `value=None` zeroes it (a true knockout); otherwise `value` broadcasts to (len(positions), d_model), e.g. a
    mean activation, or a clean-run state to restore in causal tracing."""

    sublayer: Sublayer
    layers: Sequence[int]
    positions: Sequence[int]
    value: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _tuple(self.layers))
        object.__setattr__(self, "positions", _tuple(self.positions))


@dataclass(frozen=True, eq=False)
class SetHeads:
    """Replace the output of attention heads (before the output projection mixes them) at `layers` x `heads` x
    `positions`. `value=None` zeroes it (head knockout); otherwise it broadcasts to (len(positions), head_dim)."""

    layers: Sequence[int]
    heads: Sequence[int]
    positions: Sequence[int]
    value: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _tuple(self.layers))
        object.__setattr__(self, "heads", _tuple(self.heads))
        object.__setattr__(self, "positions", _tuple(self.positions))


@dataclass(frozen=True, eq=False)
class SetResidual:
    """Overwrite the residual stream entering `layer` (`layer == num_layers` is the final output, before the
    final norm) at `positions` with `value` (broadcast to (len(positions), d_model))."""

    layer: int
    positions: Sequence[int]
    value: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "positions", _tuple(self.positions))


@dataclass(frozen=True, eq=False)
class AddEmbeddingNoise:
    """Add `noise` (broadcast to (len(positions), d_model)) to the token embeddings at `positions`."""

    positions: Sequence[int]
    noise: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", _tuple(self.positions))


@dataclass(frozen=True, eq=False)
class AddToSublayer:
    """Add `value` to what module `kind` of `layer` outputs, at `positions` (its output features `columns`, a
    (start, stop) pair, or all of them). `value` broadcasts to (len(positions), width); it may require grad:
    gradients flow into it, which is how editing optimises ROME's v* / MEMIT's z (δ = 0 leaves every number as
    it was). kind: "mlp_down" (the MLP output projection), "attn_o" (the attention output projection), "qkv"
    (the value-producing projection) or "layer" (the decoder layer: the residual entering layer + 1)."""

    kind: Projection
    layer: int
    positions: Sequence[int]
    value: torch.Tensor
    columns: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _projection(self.kind, "AddToSublayer"))
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "positions", _tuple(self.positions))
        if self.columns is not None:
            start, stop = (int(c) for c in self.columns)
            object.__setattr__(self, "columns", (start, stop))

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)


@dataclass(frozen=True, eq=False)
class AddLinear:
    """Add `x @ delta.T` (in float32, cast to the output's dtype) to what projection `kind` of `layer` outputs,
    x being its input, at every position: a weight change (out, in) applied without writing any weight.
    `delta` may require grad (FT-L trains it). kind: "mlp_down", "attn_o" or "qkv"."""

    kind: Projection
    layer: int
    delta: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _projection(self.kind, "AddLinear"))
        if self.kind == "layer":
            from locedit.errors import InterventionError

            raise InterventionError("AddLinear: a decoder layer is not a linear projection; use mlp_down, attn_o "
                                    "or qkv")
        object.__setattr__(self, "layer", int(self.layer))

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)


Intervention = Union[BlockAttention, UniformAttention, SetSublayer, SetHeads, SetResidual, AddEmbeddingNoise,
                     AddToSublayer, AddLinear]


@dataclass(frozen=True)
class Capture:
    """What to record during a run.

    residual: the stream entering each layer, plus the final output (index `num_layers`), before the final norm
    — the same convention as HF's `hidden_states` except that the last entry is *not* normalised.
    attn / mlp: what each sublayer adds to the residual. heads: per-head outputs before the output projection,
    (..., n_heads, head_dim). mlp_keys: the input to the MLP's output projection (the ROME/MEMIT key).
    attn_weights: post-softmax attention, (n_heads, queries, keys); needs the eager kernel, which the engine
    switches to for that run. `layers=None` means all; `last_only` keeps only the last position.
    """

    residual: bool = False
    attn: bool = False
    mlp: bool = False
    heads: bool = False
    mlp_keys: bool = False
    attn_weights: bool = False
    attn_in: bool = False
    outputs: tuple[str, ...] = ()
    layers: Sequence[int] | None = None
    last_only: bool = False
    moments: bool = False

    def __post_init__(self) -> None:
        outputs = (self.outputs,) if isinstance(self.outputs, str) else tuple(self.outputs)
        for kind in outputs:
            _projection(kind, "Capture(outputs=...)")
        object.__setattr__(self, "outputs", outputs)

    def wants(self, site: str, layer: int) -> bool:
        on = site in self.outputs if site in PROJECTIONS else bool(getattr(self, site))
        return on and (self.layers is None or layer in self.layers)

    def highest_layer(self, num_layers: int) -> int:
        """The highest layer any captured site reads (for stopping a forward early)."""
        if self.layers is not None and self.layers:
            return max(self.layers)
        return num_layers - 1


def first_layer(interventions: Sequence[Intervention]) -> int:
    """The earliest layer an intervention writes at (-1 for the embeddings)."""
    layers = []
    for iv in interventions:
        if isinstance(iv, AddEmbeddingNoise):
            layers.append(-1)
        elif isinstance(iv, SetResidual):
            layers.append(iv.layer)
        else:
            layers.append(min(iv.layers))
    return min(layers) if layers else 10**9


def written_positions(iv: Intervention) -> tuple[int, ...]:
    """The positions whose states an intervention changes directly (queries for attention edits)."""
    if isinstance(iv, (BlockAttention, UniformAttention)):
        return iv.queries
    if isinstance(iv, AddLinear):
        return (0,)
    return iv.positions

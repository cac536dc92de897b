"""Second moments of captured states over many batches, in one pass that stops after the highest layer needed."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch

from locedit.core.engine.hooks import Layout, Pass, attached, needs_projections
from locedit.core.engine.interventions import Capture
from locedit.core.engine.run import forward
from locedit.errors import InterventionError


class _Stop(Exception):
    """Raised after the highest captured layer: the rest of the forward is skipped."""


@dataclass
class Moments:
    """`sums[site, layer]`: Σ x xᵀ (float32, on the model's device) over every vector seen; `counts[site,
    layer]`: how many vectors that was; `tokens`: the tokens run."""

    sums: dict[tuple[str, int], torch.Tensor]
    counts: dict[tuple[str, int], int]
    tokens: int


@torch.no_grad()
def second_moments(lm, batches: Iterable[torch.Tensor], capture: Capture,
                   on_batch: Callable[[int], None] | None = None) -> Moments:
    """Σ x xᵀ of what `capture` asks for (e.g. `Capture(mlp_keys=True, layers=[3, 5])`), over unpadded (rows,
    tokens) id batches. The forward stops after the highest layer `capture` reads (later layers and the
    unembedding cost nothing; so "layer" outputs, recorded as the next layer starts, are not available).
    `on_batch(tokens)` is called after each batch (a progress bar)."""
    capture = replace(capture, moments=True, last_only=False)
    top = capture.highest_layer(lm.num_layers)
    if not 0 <= top < lm.num_layers:
        raise InterventionError(f"layer {top} does not exist (the model has {lm.num_layers} layers)")
    tokens = 0
    with attached(lm, needs_projections([], capture)) as state:
        p = Pass(upper=Layout([], [], [], 0, 0, lm.num_layers, lm.num_heads, lm.device), capture=capture,
                 engine_mask=True)
        stopper = lm.layers[top].register_forward_hook(_raise_stop)
        try:
            for batch in batches:
                rows, width = batch.shape
                p.upper = Layout([[] for _ in range(rows)], [width] * rows, [0] * rows, 0, width, lm.num_layers,
                                 lm.num_heads, lm.device)
                state.pass_ = p
                try:
                    forward(lm, batch, use_cache=False)
                except _Stop:
                    pass
                tokens += batch.numel()
                if on_batch is not None:
                    on_batch(batch.numel())
        finally:
            stopper.remove()
    return Moments(dict(p.captured), dict(p.counts), tokens)


def _raise_stop(module, args, output):
    raise _Stop

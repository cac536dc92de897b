"""Optimising through a model: one padded batch run many times under changing, differentiable interventions,
with the columns no intervention reaches computed once.

`prefixed(lm, input_ids, attention_mask, prefix=P)` runs columns [0, P) once, without gradients, keeping their
keys and values; each `.run(rows)` then recomputes only columns [P, width) — with autograd on, so gradients flow
into an `AddToSublayer` value or an `AddLinear` delta (ROME's v*, MEMIT's z, FT-L's weight change). By
causality this equals the full forward whenever no row writes before column P (checked). Used as a context
manager (`with prefixed(...) as batch:`) the engine's hooks stay attached across the runs of the block (an
optimisation loop then pays for attaching once); no other engine run may use the model inside it.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Sequence

import torch

from locedit.core.engine.hooks import Layout, Pass, attached, needs_projections
from locedit.core.engine.interventions import AddLinear, Capture, Intervention, written_positions
from locedit.core.engine.run import Captures, forward, output_cache
from locedit.errors import InterventionError


@dataclass
class PrefixedResult:
    """`logits`: (rows, len(logits_at), vocab), at the requested columns of [prefix, width) in that order.
    `captures[site, layer]`: (rows, width - prefix, ...): columns [prefix, width) of the padded batch."""

    logits: torch.Tensor
    captures: Captures


class PrefixedBatch:
    """A padded batch (any padding: each row's tokens are the contiguous run where `attention_mask` is 1)
    whose first `prefix` columns hold no intervention. Positions in `run`'s rows are each row's own token
    indices, as everywhere in the engine."""

    def __init__(self, lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: int = 0,
                 position_ids: torch.Tensor | None = None):
        if input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise InterventionError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                                    f"{tuple(attention_mask.shape)} must be one (rows, width) shape")
        width = int(input_ids.shape[1])
        if not 0 <= prefix < width:
            raise InterventionError(f"prefix {prefix} must leave at least one of the batch's {width} columns")
        self.lm = lm
        self.input_ids = input_ids.to(lm.device)
        self.attention_mask = attention_mask.to(lm.device)
        self.position_ids = (position_ids if position_ids is not None
                             else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)).to(lm.device)
        self.prefix = int(prefix)
        mask = attention_mask.bool().cpu()
        self.lengths = [int(m.sum()) for m in mask]
        self.pad_left = [int(m.long().argmax()) if n else 0 for m, n in zip(mask, self.lengths)]
        if any(n == 0 for n in self.lengths):
            raise InterventionError("a row of the batch has no tokens (its attention mask is all zeros)")
        self._kv = None
        self._held: ExitStack | None = None
        self._state = None
        if self.prefix > 0:  # columns [0, prefix): once, no hooks, no gradients
            with torch.no_grad():
                out = forward(lm, self.input_ids[:, :self.prefix], attention_mask=self.attention_mask[:, :self.prefix],
                              position_ids=self.position_ids[:, :self.prefix], use_cache=True, logits_at=1)
            self._kv = [(layer.keys, layer.values) for layer in output_cache(out).layers]

    def __enter__(self) -> "PrefixedBatch":
        stack = ExitStack()
        self._state = stack.enter_context(attached(self.lm, projections=True))
        self._held = stack
        return self

    def __exit__(self, *exc) -> None:
        held, self._held, self._state = self._held, None, None
        if held is not None:
            held.close()

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    def run(self, rows: Sequence[Sequence[Intervention]] | None = None, *, capture: Capture | None = None,
            logits_at: Sequence[int] | torch.Tensor | None = None) -> PrefixedResult:
        """Columns [prefix, width) under `rows[i]` for batch row i; `logits_at`: the columns (of [prefix,
        width), counted from `prefix`) whose logits to return (all when None). Runs with autograd as the caller
        has it (wrap in `torch.no_grad()` when nothing is optimised)."""
        lm = self.lm
        rows = [list(r) for r in (rows if rows is not None else [[] for _ in range(self.rows)])]
        if len(rows) != self.rows:
            raise InterventionError(f"{len(rows)} intervention rows for a batch of {self.rows}")
        layout = Layout(rows, self.lengths, self.pad_left, self.prefix, self.width, lm.num_layers, lm.num_heads,
                        lm.device)
        layout.validate()
        for i, ivs in enumerate(rows):
            for iv in ivs:
                if isinstance(iv, AddLinear) and self.prefix > 0:
                    raise InterventionError("AddLinear changes every position; it needs prefix=0")
                for position in written_positions(iv):
                    if layout.absolute(i, position) < self.prefix:
                        raise InterventionError(f"row {i} writes at position {position}, inside the cached "
                                                f"prefix of {self.prefix} columns")
        cache = None
        if self._kv is not None:
            from transformers import DynamicCache

            cache = DynamicCache(ddp_cache_data=self._kv, config=lm.model.config)
        if logits_at is None:
            keep = torch.arange(self.width - self.prefix)
        else:
            keep = torch.as_tensor(list(logits_at) if not isinstance(logits_at, torch.Tensor) else logits_at,
                                   dtype=torch.long)
        p = Pass(upper=layout, capture=capture, engine_mask=True)
        with ExitStack() as stack:
            state = self._state or stack.enter_context(attached(lm, needs_projections(rows, capture)))
            state.pass_ = p
            out = forward(lm, self.input_ids[:, self.prefix:], attention_mask=self.attention_mask,
                          position_ids=self.position_ids[:, self.prefix:], cache=cache,
                          use_cache=cache is not None, logits_at=keep)
        return PrefixedResult(out.logits, Captures(dict(p.captured), self.lengths, self.pad_left, False))


def prefixed(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: int = 0,
             position_ids: torch.Tensor | None = None) -> PrefixedBatch:
    """A `PrefixedBatch`: columns [0, prefix) run now, once; `.run(rows)` recomputes the rest (module docstring).
    `position_ids` default to each row's own token index (from the attention mask)."""
    return PrefixedBatch(lm, input_ids, attention_mask, prefix, position_ids)

"""Causal tracing as ROME does it (Meng et al. 2022): corrupt the subject's embeddings with Gaussian noise, then
restore single clean states (hidden / MLP / attention, per position and layer) and measure how much of the
target's probability comes back. Cells are batched and share the corrupted prefix, instead of ROME's loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from locedit.core.engine import AddEmbeddingNoise, Capture, SetResidual, SetSublayer, run
from locedit.errors import LoceditError
from locedit.core.facts import EncodedFact, Fact
from locedit.core.lm import LM
from locedit.localization.common import FlowResult, Target, as_encoded, fact_summary, resolve_target, window_layers

KINDS = ("hidden", "mlp", "attn")


def embedding_std(lm: LM, sample: int = 4096, seed: int = 0) -> float:
    """Standard deviation of the embedding layer's outputs over a fixed sample of the vocabulary (ROME uses the
    std over a dataset's subject tokens; pass `noise_std` to causal_trace to use such a value). Computed in
    float32 and remembered per (model, embedding weights version) so repeated traces do not recompute it."""
    module = lm.adapter.embed_module(lm.model)
    key = (sample, seed, module.weight.data_ptr(), module.weight._version)
    cache = lm.__dict__.setdefault("_embedding_std", {})
    if key not in cache:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, lm.vocab_size, (min(sample, lm.vocab_size),), generator=g).to(lm.device)
        with torch.no_grad():
            cache[key] = float(module(ids).float().std())
    return cache[key]


@dataclass
class CausalTraceResult(FlowResult):
    """`scores[position][layer]`: mean p(target) over the noise samples when that cell's clean state is restored
    (hidden: the output of the layer; mlp/attn: that sublayer's output in a window of layers centred on it).
    `low_score`: corrupted p(target); `high_score`: clean p(target)."""

    kind: str
    target: str
    target_id: int
    high_score: float
    low_score: float
    scores: list
    tokens: list
    subject_span: list
    window: int
    samples: int
    noise_std: float
    fact: dict = field(default_factory=dict)
    target_source: str = "top1"
    target_text: str = ""
    analysis = "causal_trace"

    def summary(self) -> str:
        """The tracked target, the clean and corrupted p(target), and the cell whose restore recovers most."""
        scores = np.asarray(self.scores, dtype=float)
        head = (f"{self.target_line()}\n{self.kind} trace: clean p {self.high_score:.3f}, corrupted p "
                f"{self.low_score:.3f}")
        if not np.isfinite(scores).any():
            return head + "; no cell traced"
        position, layer = np.unravel_index(int(np.nanargmax(scores)), scores.shape)
        return (head + f"; best restore: {self.tokens[position]!r} (position {position}) at layer {layer} "
                f"(p {scores[position, layer]:.3f})")

    def plot(self, ax=None):
        from locedit.core.plots import causal_trace_heatmap

        return causal_trace_heatmap(self, ax=ax)

    def indirect_effect(self) -> np.ndarray:
        """(positions, layers): restored p minus corrupted p."""
        return np.asarray(self.scores, dtype=float) - self.low_score


def causal_trace(lm: LM, fact: Fact | EncodedFact, *, kind: str = "hidden", samples: int = 10, noise: float = 3.0,
                 noise_std: float | None = None, window: int = 10, seed: int = 1,
                 positions: Sequence[int] | None = None,
                 layers: Sequence[int] | None = None, target: Target | None = None) -> CausalTraceResult:
    """ROME's causal trace. Noise: `noise` x `noise_std` (default the embedding std, see `embedding_std`), drawn
    once with `seed` and shared by every cell (ROME's paired design). `window` applies to mlp/attn restores.
    Cells before the subject are not run: noise cannot reach them, so restoring them is a no-op and their score
    is the corrupted score (ROME computes the same number the long way). `positions` restricts the traced
    positions and `layers` the traced layers (the others are reported as NaN). `target`: an already resolved
    `Target` (see `resolve_target`), to skip the clean forward that resolves it."""
    if kind not in KINDS:
        raise LoceditError(f"unknown trace kind {kind!r}; use one of {KINDS}")
    enc = as_encoded(lm, fact)
    target = target if target is not None else resolve_target(lm, enc)
    std = noise_std if noise_std is not None else embedding_std(lm)
    site = "residual" if kind == "hidden" else kind
    with torch.no_grad():
        clean = run(lm, enc, capture=Capture(**{site: True})).captures
        plan = _TracePlan(lm, enc, kind, samples, noise, std, window, seed, positions, layers,
                          lambda s, layer: clean[s, layer][0])
        probs = run(lm, enc, plan.rows, bases=plan.bases, row_base=plan.row_base).prob_of(target.token_id)
    return plan.result(target, probs.float().cpu())


def causal_trace_batch(lm: LM, facts: Sequence[Fact | EncodedFact], *, kind: str = "hidden", samples: int = 10,
                       noise: float = 3.0, noise_std: float | None = None, window: int = 10, seed: int = 1,
                       positions: Sequence[int] | None = None,
                       layers: Sequence[int] | None = None, targets: Sequence[Target] | None = None,
                       fact_positions: Sequence[Sequence[int] | None] | None = None,
                       max_rows: int = 512, clean=None) -> list[CausalTraceResult]:
    """`causal_trace` of several facts, their cells packed into shared passes (`run_packed`: one pass for every
    fact's noise samples, then shared chunks); each result equals the single-fact one. `fact_positions[k]`
    overrides `positions` for fact k (e.g. each fact's subject positions). `clean`: the facts' `CleanRun` when
    already made (`locedit.localization.common.clean_run`)."""
    from locedit.core.engine import run_batch, run_packed
    from locedit.localization.common import resolve_targets

    if kind not in KINDS:
        raise LoceditError(f"unknown trace kind {kind!r}; use one of {KINDS}")
    encs = [as_encoded(lm, f) for f in facts]
    if not encs:
        return []
    targets = list(targets) if targets is not None else resolve_targets(lm, encs)
    std = noise_std if noise_std is not None else embedding_std(lm)
    site = "residual" if kind == "hidden" else kind
    with torch.no_grad():
        captured = (clean.captures if clean is not None
                    else run_batch(lm, encs, capture=Capture(**{site: True}), padding_side="right").captures)
        plans = [_TracePlan(lm, enc, kind, samples, noise, std, window, seed,
                            fact_positions[k] if fact_positions is not None else positions, layers,
                            lambda s, layer, k=k: captured[s, layer][k])
                 for k, enc in enumerate(encs)]
        rows, row_base, bases, base_prompt, ids = [], [], [], [], []
        for k, plan in enumerate(plans):
            rows += plan.rows
            row_base += [len(bases) + b for b in plan.row_base]
            ids += [targets[k].token_id] * len(plan.rows)
            bases += plan.bases
            base_prompt += [k] * len(plan.bases)
        probs = run_packed(lm, encs, rows, bases=bases, base_prompt=base_prompt, row_base=row_base,
                           max_rows=max_rows).prob_of(torch.tensor(ids)).float().cpu()
    out, start = [], 0
    for plan, target in zip(plans, targets):
        out.append(plan.result(target, probs[start:start + len(plan.rows)]))
        start += len(plan.rows)
    return out


causal_trace.batched = causal_trace_batch


class _TracePlan:
    """One fact's trace: its noise bases, its cell rows (samples per cell, then the corrupted runs) and how the
    probabilities of those rows become a `CausalTraceResult`. `clean(site, layer)` is the fact's clean capture
    (positions, d)."""

    def __init__(self, lm, enc, kind, samples, noise, std, window, seed, positions, layers, clean):
        n, L = len(enc), lm.num_layers
        self.lm, self.enc, self.kind, self.samples, self.window, self.std = lm, enc, kind, samples, window, std
        subject = list(enc.positions.subject)
        rng = np.random.RandomState(seed)
        # drawn on the CPU (the same numbers on every device), scaled in float32, then moved once
        noise_values = (torch.from_numpy(rng.randn(samples, len(subject), lm.d_model)).float() * noise * std).to(
            device=lm.device, dtype=lm.dtype)
        self.bases = [[AddEmbeddingNoise(subject, noise_values[s])] for s in range(samples)]
        cells = []
        self.first = first = subject[0]  # states before the subject are identical in the clean and corrupted runs
        self.wanted = wanted = [p % n for p in positions] if positions is not None else list(range(n))
        self.traced = traced = [p for p in range(first, n) if p in wanted]
        self.traced_layers = traced_layers = (sorted({int(l) % L for l in layers}) if layers is not None
                                              else list(range(L)))
        for position in traced:
            for layer in traced_layers:
                if kind == "hidden":
                    cells.append([SetResidual(layer + 1, [position], clean("residual", layer + 1)[position])])
                else:
                    cells.append([SetSublayer(kind, [j], [position], clean(kind, j)[position])
                                  for j in window_layers(layer, window, L)])
        self.n_cells = len(cells)
        rows = [cell for cell in cells for _ in range(samples)]
        row_base = [s for _ in cells for s in range(samples)]
        rows.append([])
        row_base.append(0)
        self.rows = rows + [[] for _ in range(samples - 1)]
        self.row_base = row_base + list(range(1, samples))

    def result(self, target: Target, probs: torch.Tensor) -> "CausalTraceResult":
        enc, samples, n, L = self.enc, self.samples, len(self.enc), self.lm.num_layers
        low = float(probs[self.n_cells * samples:].mean())
        cell_probs = torch.full((n, L), float("nan"))
        cell_probs[[p for p in self.wanted if p < self.first]] = low
        if self.n_cells:
            means = probs[: self.n_cells * samples].view(len(self.traced), len(self.traced_layers), samples).mean(-1)
            cell_probs[torch.tensor(self.traced, dtype=torch.long)[:, None],
                       torch.tensor(self.traced_layers, dtype=torch.long)[None, :]] = means
        return CausalTraceResult(self.kind, target.token, target.token_id, target.base_prob, low,
                                 cell_probs.tolist(), list(enc.tokens), [enc.subject_start, enc.subject_end],
                                 self.window, samples, self.std, fact_summary(enc), **target.fields())

"""Attention knockout (paper §4): block the last position from attending to a group of positions in a window of
layers around each layer, and measure the relative change of the target's probability."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from locedit.core.engine import BlockAttention, run
from locedit.errors import InterventionError
from locedit.core.facts import EncodedFact, Fact
from locedit.core.lm import LM
from locedit.localization.common import FlowResult, Target, as_encoded, fact_summary, resolve_target, window_layers


def position_groups(enc: EncodedFact, groups: str | Mapping[str, Sequence[int]] = "default") -> dict[str, tuple]:
    """The source groups the last position is blocked from.

    "default": subject, non_subject (every position but the subject and the last, *without position 0*), last,
    and "first" (position 0) when it is not part of the subject — most models park attention on the first token
    (an attention sink), so blocking it with the relation tokens mixes two effects. "paper": the official code's
    groups (subject, non_subject with position 0, last). A mapping gives user-defined groups (positions may be
    negative)."""
    g = enc.positions
    if isinstance(groups, Mapping):
        return {name: tuple(int(p) for p in positions) for name, positions in groups.items()}
    if groups == "paper":
        return {"subject": g.subject, "non_subject": g.non_subject_paper, "last": (g.last,)}
    if groups == "default":
        out = {"subject": g.subject, "non_subject": g.non_subject, "last": (g.last,)}
        if g.first:
            out["first"] = g.first
        return out
    raise InterventionError(f"unknown position groups {groups!r}; use 'default', 'paper' or a mapping")


@dataclass
class KnockoutResult(FlowResult):
    """`relative_change[group][layer]` = 100 (p_blocked - p_base) / p_base for the window centred on `layer`."""

    target: str
    target_id: int
    base_prob: float
    window: int
    groups: dict
    relative_change: dict
    probs: dict
    fact: dict = field(default_factory=dict)
    target_source: str = "top1"
    target_text: str = ""
    analysis = "attention_knockout"

    def summary(self) -> str:
        """The tracked target, and the group and window centre whose blocking lowers p(target) most."""
        group, layer, change = min(((g, l, c) for g, curve in self.relative_change.items()
                                    for l, c in enumerate(curve) if c == c), key=lambda x: x[2],
                                   default=(None, None, float("nan")))
        if group is None:
            return f"{self.target_line()}\nno group could be blocked"
        return (f"{self.target_line()}\nstrongest drop: blocking last -> {group} around layer {layer} "
                f"(window {self.window}): {change:+.1f}% p(target)")

    def plot(self, ax=None):
        from locedit.core.plots import knockout_curves

        return knockout_curves([self], ax=ax)


def attention_knockout(lm: LM, fact: Fact | EncodedFact, *, window: int = 9,
                       groups: str | Mapping[str, Sequence[int]] = "default", heads: Sequence[int] | None = None,
                       target: Target | None = None) -> KnockoutResult:
    """Block last -> group edges in a `window` of layers centred on each layer (all heads, or `heads`), for every
    group and layer in one batched run with prefix reuse. `target`: an already resolved `Target`."""
    if window < 1:
        raise InterventionError(f"window must be at least 1, not {window}")
    enc = as_encoded(lm, fact)
    target = target if target is not None else resolve_target(lm, enc)
    named, rows, keys = knockout_rows(lm, enc, window, groups, heads)
    with torch.no_grad():
        probs = run(lm, enc, rows).prob_of(target.token_id).float().cpu().numpy()
    return knockout_result(enc, target, window, named, keys, probs)


def attention_knockout_batch(lm: LM, facts: Sequence[Fact | EncodedFact], *, window: int = 9,
                             groups: str | Mapping[str, Sequence[int]] = "default",
                             heads: Sequence[int] | None = None,
                             targets: Sequence[Target] | None = None, max_rows: int = 512,
                             clean=None) -> list[KnockoutResult]:
    """`attention_knockout` of several facts, their rows packed into shared forward passes (`run_packed`); each
    result equals the single-fact one. `targets`: already resolved targets (else one padded forward resolves
    them all). `clean`: the facts' `CleanRun`, whose clean pass is then shared."""
    from locedit.core.engine import run_packed
    from locedit.localization.common import resolve_targets

    if window < 1:
        raise InterventionError(f"window must be at least 1, not {window}")
    encs = [as_encoded(lm, f) for f in facts]
    if not encs:
        return []
    targets = list(targets) if targets is not None else resolve_targets(lm, encs)
    plans = [knockout_rows(lm, enc, window, groups, heads) for enc in encs]
    rows = [r for _, fact_rows, _ in plans for r in fact_rows]
    row_prompt = [k for k, (_, fact_rows, _) in enumerate(plans) for _ in fact_rows]
    ids = torch.tensor([targets[k].token_id for k in row_prompt])
    with torch.no_grad():
        probs = run_packed(lm, encs, rows, row_prompt=row_prompt, max_rows=max_rows,
                           clean_kv=None if clean is None else clean.kv).prob_of(ids).float().cpu()
    probs = probs.numpy()
    out, start = [], 0
    for enc, target, (named, fact_rows, keys) in zip(encs, targets, plans):
        out.append(knockout_result(enc, target, window, named, keys, probs[start:start + len(fact_rows)]))
        start += len(fact_rows)
    return out


attention_knockout.batched = attention_knockout_batch


def knockout_rows(lm: LM, enc: EncodedFact, window: int, groups, heads):
    """The knockout's rows for one fact: (named groups, one row per group and layer, each row's group name); an
    analysis that runs more rows on the same prompt can add these to its own run and read them with
    `knockout_result`."""
    named = position_groups(enc, groups)
    last = enc.positions.last
    rows, keys = [], []
    for name, positions in named.items():
        for layer in range(lm.num_layers):
            rows.append([BlockAttention(window_layers(layer, window, lm.num_layers), [last], positions, heads)]
                        if positions else [])
            keys.append(name)
    return named, rows, keys


def knockout_result(enc, target: Target, window: int, named: dict, keys: list, probs: np.ndarray) -> KnockoutResult:
    """The `KnockoutResult` of `knockout_rows`' rows from p(target) of each row."""
    probs_by_group = {name: probs[[i for i, k in enumerate(keys) if k == name]].tolist() for name in named}
    change = {name: (100 * (np.asarray(p) - target.base_prob) / target.base_prob).tolist()
              for name, p in probs_by_group.items()}
    return KnockoutResult(target.token, target.token_id, target.base_prob, window,
                          {k: list(v) for k, v in named.items()}, change, probs_by_group, fact_summary(enc),
                          **target.fields())


@dataclass
class KnockoutMap(FlowResult):
    """`probs[position][layer]`: p(target) when the last position cannot attend to that one position in the
    window centred on that layer (the notebook's single-prompt heatmap)."""

    target: str
    target_id: int
    base_prob: float
    window: int
    tokens: list
    probs: list
    fact: dict = field(default_factory=dict)
    target_source: str = "top1"
    target_text: str = ""
    analysis = "knockout_map"

    def summary(self) -> str:
        """The tracked target, and the (position, layer) whose blocking lowers p(target) most."""
        probs = np.asarray(self.probs, dtype=float)
        position, layer = np.unravel_index(int(np.nanargmin(probs)), probs.shape)
        return (f"{self.target_line()}\nlowest p(target) {probs[position, layer]:.3f}: blocking last -> "
                f"{self.tokens[position]!r} (position {position}) around layer {layer} (window {self.window})")

    def plot(self, ax=None):
        from locedit.core.plots import knockout_heatmap

        return knockout_heatmap(self, ax=ax)


def knockout_map(lm: LM, fact: Fact | EncodedFact, *, window: int = 9,
                 target: Target | None = None) -> KnockoutMap:
    """Block last -> each single position, in a window around each layer: a (position x layer) map."""
    enc = as_encoded(lm, fact)
    target = target if target is not None else resolve_target(lm, enc)
    n, last = len(enc), enc.positions.last
    rows = [[BlockAttention(window_layers(layer, window, lm.num_layers), [last], [pos])]
            for pos in range(n) for layer in range(lm.num_layers)]
    with torch.no_grad():
        probs = run(lm, enc, rows).prob_of(target.token_id).view(n, lm.num_layers).float().cpu()
    return KnockoutMap(target.token, target.token_id, target.base_prob, window, list(enc.tokens), probs.tolist(),
                       fact_summary(enc), **target.fields())

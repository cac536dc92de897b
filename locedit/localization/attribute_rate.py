"""Subject enrichment (paper §5): the attribute rate of hidden states projected to the vocabulary.

For a hidden state h: project it (`LM.project`), take the top-k token ids, decode each, keep the clean ones
(`clean_token`), take the first m; the attribute rate is 100 * (how many of them are in A_s) / (how many there
are). The paper uses k = 500, m = 50, and the input-embedding projection without the final norm.

Layer convention: `rates[position][l]` is the state *entering* decoder layer l, i.e. HF's `hidden_states[l]`
(l = 0 is the embedding output), for l = 0..L-1; the extra entry l = L is the final block's output before the
final norm (which the paper never uses; HF's `hidden_states[L]` is normalised instead). The paper plots
`hidden_states[l]` at x = l + 1, so the paper's x = 1..L are our indices 0..L-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from locedit.core.engine import Capture, run
from locedit.core.facts import EncodedFact, Fact
from locedit.core.lm import LM, Projection
from locedit.localization.attributes import AttributeSet, attribute_set, decode_ids
from locedit.localization.common import FlowResult, Target, as_encoded, clean_token, fact_summary, resolve_target
from locedit.core.statistics import mean_ci

POSITIONS: tuple[str, ...] = ("first", "subject_first", "subject_last", "after_subject", "last")


def clean_top(lm: LM, scores: torch.Tensor, k: int, m: int) -> list[str]:
    """The first `m` clean tokens among the top-`k` of a score vector (vocab,)."""
    ids = scores.topk(min(k, scores.shape[-1])).indices.tolist()
    return [t for t in decode_ids(lm.tokenizer, ids) if clean_token(t)][:m]


def rate_of(tokens: Sequence[str], attributes: AttributeSet) -> float:
    """100 * share of `tokens` that are attributes (NaN when there are no tokens)."""
    if not tokens:
        return float("nan")
    return 100.0 * sum(t in attributes.tokens for t in tokens) / len(tokens)


def state_rates(lm: LM, states: torch.Tensor, attributes: AttributeSet, projection: Projection, k: int,
                m: int) -> tuple[list[float], list[list[str]]]:
    """Attribute rate and clean top-m tokens of each state of `states` (n, d)."""
    with torch.no_grad():
        scores = lm.project(states, projection).float()
        ids = scores.topk(min(k, scores.shape[-1]), dim=-1).indices.cpu().tolist()  # one transfer for all rows
    tops = [[t for t in decode_ids(lm.tokenizer, row) if clean_token(t)][:m] for row in ids]
    return [rate_of(t, attributes) for t in tops], tops


def named_positions(enc: EncodedFact, names: Sequence[str]) -> dict[str, int | None]:
    """Token index of each named position, None where it does not exist: "first" when position 0 is part of
    the subject (or the prompt has one token), "after_subject" when the subject ends the prompt."""
    g = enc.positions
    out: dict[str, int | None] = {}
    for name in names:
        if name == "first":
            out[name] = g.first[0] if g.first else None
        elif name == "after_subject":
            out[name] = g.subject_last + 1 if g.subject_last + 1 < g.n else None
        elif name in ("subject_first", "subject_last", "last"):
            out[name] = getattr(g, name)
        else:
            raise ValueError(f"unknown position {name!r}; use some of {POSITIONS}")
    return out


def report_layers(num_layers: int, count: int = 5) -> list[int]:
    """A few evenly spread layer indices in 0..num_layers for the top-token report."""
    return sorted({int(round(x)) for x in np.linspace(0, num_layers, count)})


@dataclass
class AttributeRateResult(FlowResult):
    """`rates[position][l]`: attribute rate (0-100) of the state entering layer l (l = L: final output before the
    final norm); None for a position the prompt does not have. `embedding_baseline`: the rate of the mean of the
    subject's token embeddings. `top_tokens[l]`: clean top tokens at subject_last for a few layers."""

    target: str
    target_id: int
    base_prob: float
    target_in_attributes: bool
    positions: dict
    layers: list
    rates: dict
    embedding_baseline: float
    embedding_top_tokens: list
    top_tokens: dict
    projection: str
    attribute_source: str
    num_attributes: int
    k: int
    m: int
    fact: dict = field(default_factory=dict)
    target_source: str = "top1"
    target_text: str = ""
    analysis = "attribute_rate"

    def summary(self) -> str:
        """The tracked target and the peak attribute rate at the last subject token."""
        rates = self.rates.get("subject_last")
        line = f"embedding baseline {self.embedding_baseline:.1f}"
        if rates:
            values = np.asarray([np.nan if r is None else r for r in rates], dtype=float)
            if np.isfinite(values).any():
                layer = int(np.nanargmax(values))
                line = f"subject_last attribute rate peaks at {values[layer]:.1f} entering layer {layer}; " + line
        return f"{self.target_line()}\n{line} ({self.num_attributes} attributes, {self.attribute_source})"

    @staticmethod
    def aggregate(results: Sequence) -> dict:
        return aggregate(results)

    def plot(self, ax=None):
        from locedit.core.plots import attribute_rate_curves

        return attribute_rate_curves([self], ax=ax)


def attribute_rate(lm: LM, fact: Fact | EncodedFact, *, attributes: AttributeSet | None = None,
                   paragraphs: Mapping[str, str] | None = None, projection: Projection | None = None,
                   k: int = 500, m: int = 50, positions: Sequence[str] = POSITIONS,
                   target: Target | None = None) -> AttributeRateResult:
    """Attribute rate at each named position and every layer (0..L, see the module docstring), from one clean
    run. A_s: `attributes` if given, else `attribute_set(lm, subject, paragraphs)` (the subject's paragraphs,
    else text generated by the model). `projection=None` uses `lm.default_projection()`."""
    enc = as_encoded(lm, fact)
    projection = projection or lm.default_projection()
    attributes = attributes if attributes is not None else attribute_set(lm, enc.fact.subject, paragraphs)
    target = target if target is not None else resolve_target(lm, enc)
    where = named_positions(enc, positions)
    layers = list(range(lm.num_layers + 1))
    with torch.no_grad():
        captures = run(lm, enc, [[]], capture=Capture(residual=True), reuse_prefix=False).captures
        stream = captures.stack("residual", layers)[:, 0]  # (layers, n, d)
    rates: dict[str, list | None] = {}
    tops_by_position: dict[str, list] = {}
    for name, pos in where.items():
        if pos is None:
            rates[name] = None
            continue
        rates[name], tops_by_position[name] = state_rates(lm, stream[:, pos], attributes, projection, k, m)
    baseline, baseline_top = embedding_baseline(lm, enc, attributes, projection, k, m)
    subject_tops = tops_by_position.get("subject_last") or state_rates(
        lm, stream[:, enc.positions.subject_last], attributes, projection, k, m)[1]
    top_tokens = {layer: subject_tops[layer][:20] for layer in report_layers(lm.num_layers)}
    return AttributeRateResult(
        target.token, target.token_id, target.base_prob, target.token in attributes.tokens,
        where, layers, rates, baseline, baseline_top[:20], top_tokens, projection, attributes.source,
        len(attributes), k, m, fact_summary(enc), **target.fields())


def embedding_baseline(lm: LM, enc: EncodedFact, attributes: AttributeSet, projection: Projection, k: int,
                       m: int) -> tuple[float, list[str]]:
    """Rate of the mean of the subject's input-embedding rows (the subject's tokens as they occur in the
    prompt), projected like the hidden states."""
    ids = torch.tensor(enc.input_ids[enc.subject_start:enc.subject_end], device=lm.embedding_matrix.device)
    with torch.no_grad():
        mean = lm.embedding_matrix[ids].float().mean(0, keepdim=True)
    rates, tops = state_rates(lm, mean, attributes, projection, k, m)
    return rates[0], tops[0]



def aggregate(results: Sequence) -> dict:
    """Mean and 95% CI (Student t, NaN-aware) over facts, per position and layer, plus the embedding baseline.
    Accepts `AttributeRateResult`s, their `to_dict()`s or `run_dataset` lines (`{"result": ...}`); positions a
    fact lacks (None) are left out of that fact's contribution. Each entry is `{"mean", "ci95", "n"}`."""
    dicts = [unwrap(r) for r in results]
    if not dicts:
        raise ValueError("nothing to aggregate")
    layers = dicts[0]["layers"]
    if any(d["layers"] != layers for d in dicts):
        raise ValueError("results come from models with different numbers of layers")
    out: dict = {"analysis": "attribute_rate", "count": len(dicts), "layers": layers, "rates": {}}
    names = list(dict.fromkeys(name for d in dicts for name in d["rates"]))
    for name in names:
        rows = [d["rates"].get(name) for d in dicts]
        rows = [[np.nan if v is None else v for v in row] for row in rows if row is not None]
        if not rows:
            out["rates"][name] = None
            continue
        mean, ci = mean_ci(np.asarray(rows, dtype=float))
        out["rates"][name] = {"mean": mean.tolist(), "ci95": ci.tolist(), "n": len(rows)}
    base = [np.nan if d["embedding_baseline"] is None else d["embedding_baseline"] for d in dicts]
    mean, ci = mean_ci(np.asarray(base, dtype=float))
    out["embedding_baseline"] = {"mean": float(mean), "ci95": float(ci), "n": len(base)}
    return out


def unwrap(result) -> dict:
    """A result's dict from a result object, its `to_dict()` or a `run_dataset` line."""
    if isinstance(result, FlowResult):
        return result.to_dict()
    if isinstance(result, dict) and isinstance(result.get("result"), dict):
        return result["result"]
    return result

"""Attribute extraction (paper §6): at the last position, project each layer's attention and MLP outputs to the
vocabulary; an *extraction event* is a sublayer whose top-1 token is the target. At each attention event,
attention-weight ablations show which source positions the extraction needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from locedit.core.engine import BlockAttention, Capture, SetHeads, run
from locedit.core.facts import EncodedFact, Fact
from locedit.core.lm import LM, Projection
from locedit.core.statistics import mean_ci
from locedit.localization.common import FlowResult, Target, as_encoded, fact_summary, rank_of, resolve_target


def ablation_keys(enc: EncodedFact) -> dict[str, tuple[int, ...] | None]:
    """The official code's 12 attention-weight variants, as the set of key positions the last position may NOT
    read (None = every weight zeroed, leaving only the output bias)."""
    g = enc.positions
    everything = tuple(range(g.n))
    subj, last, subj_last = g.subject, (g.last,), (g.subject_last,)

    def all_but(keep):
        return tuple(p for p in everything if p not in keep)

    return {
        "block_subject": subj,
        "block_last": last,
        "block_subject_last": subj_last,
        "block_subject_last_and_last": subj_last + last,
        "block_non_subject": g.non_subject_paper + last,
        "block_non_subject_except_last": g.non_subject_paper,
        "all_but_first": all_but((0,)),
        "all_but_last": all_but(last),
        "all_but_subject_last": all_but(subj_last),
        "all_but_subject_last_and_last": all_but(subj_last + last),
        "block_all": None,
    }


@dataclass
class ExtractionResult(FlowResult):
    """Per layer: the top-1 token and the target's rank in the attention / MLP output at the last position."""

    target: str
    target_id: int
    base_prob: float
    projection: str
    attn_top1: list
    mlp_top1: list
    attn_rank: list
    mlp_rank: list
    attn_events: list
    mlp_events: list
    category: str
    first_attn_before_mlp: bool | None
    ablations: dict
    rank_gap: list
    fact: dict = field(default_factory=dict)
    target_source: str = "top1"
    target_text: str = ""
    analysis = "extraction_events"

    def summary(self) -> str:
        """The tracked target and where the attention / MLP outputs at the last position extract it."""
        return (f"{self.target_line()}\nextraction: {self.category}; attention events at layers "
                f"{self.attn_events or 'none'}, MLP events at layers {self.mlp_events or 'none'}")

    def plot(self, ax=None):
        from locedit.core.plots import extraction_rates

        return extraction_rates(self.aggregate([self.to_dict()]), ax=ax)

    @staticmethod
    def aggregate(dicts: list[dict]) -> dict:
        """Per-layer event rates (attention and MLP), share of facts with an event, the attention/MLP cross-tab,
        number of extracting layers, and per ablation variant the share of events that survive."""
        if not dicts:
            return {}
        num_layers = len(dicts[0]["attn_top1"])
        attn = np.zeros((len(dicts), num_layers))
        mlp = np.zeros((len(dicts), num_layers))
        for i, d in enumerate(dicts):
            attn[i, d["attn_events"]] = 1
            mlp[i, d["mlp_events"]] = 1
        cats = [d["category"] for d in dicts]
        survive: dict[str, list] = {}
        for d in dicts:
            for layer_result in d["ablations"].values():
                for name, v in layer_result.items():
                    survive.setdefault(name, []).append(float(v["event"]))
        attn_mean, attn_ci = mean_ci(attn)
        mlp_mean, mlp_ci = mean_ci(mlp)
        has_any = attn.any(1) | mlp.any(1)
        both = [d["first_attn_before_mlp"] for d in dicts if d["category"] == "both"]
        return {
            "n": len(dicts),
            "attn_rate": attn_mean.tolist(), "attn_ci95": attn_ci.tolist(),
            "mlp_rate": mlp_mean.tolist(), "mlp_ci95": mlp_ci.tolist(),
            "share_with_attn_event": float(attn.any(1).mean()),
            "share_with_mlp_event": float(mlp.any(1).mean()),
            "share_with_any_event": float(has_any.mean()),
            "mean_extracting_layers_given_event": float((attn + mlp)[has_any].sum(1).mean()) if has_any.any() else 0.0,
            "crosstab": {c: cats.count(c) / len(cats) for c in ("attn_only", "mlp_only", "both", "neither")},
            "both_first_attn_not_after_mlp": (sum(bool(b) for b in both) / len(both)) if both else None,
            "ablation_event_survival": {k: float(np.mean(v)) for k, v in survive.items()},
        }


def extraction_events(lm: LM, fact: Fact | EncodedFact, *, projection: Projection | None = None, ablations: bool = True,
                      target: Target | None = None) -> ExtractionResult:
    """Extraction events at the last position, and attention-weight ablations at each attention event layer.

    Ablations block the chosen keys *before* the softmax (the remaining weights renormalise exactly; the official
    code re-applied softmax to probabilities, which makes the weights near-uniform instead)."""
    enc = as_encoded(lm, fact)
    target = target if target is not None else resolve_target(lm, enc)
    projection = projection or lm.default_projection()
    with torch.no_grad():
        clean = run(lm, enc, capture=Capture(attn=True, mlp=True, residual=True)).captures
        attn_out = clean.stack("attn", range(lm.num_layers))[:, 0, -1]  # (L, d) at the last position
        mlp_out = clean.stack("mlp", range(lm.num_layers))[:, 0, -1]
        attn_scores = lm.project(attn_out, projection).float()
        mlp_scores = lm.project(mlp_out, projection).float()
    attn_top1 = attn_scores.argmax(-1).tolist()
    mlp_top1 = mlp_scores.argmax(-1).tolist()
    attn_events = [layer for layer, t in enumerate(attn_top1) if t == target.token_id]
    mlp_events = [layer for layer, t in enumerate(mlp_top1) if t == target.token_id]
    category = ("both" if attn_events and mlp_events else "attn_only" if attn_events else
                "mlp_only" if mlp_events else "neither")
    first_before = attn_events[0] <= mlp_events[0] if category == "both" else None

    # rank gap: target's rank in the subject-last state leaving layer l vs in the attention output at l
    sl = enc.positions.subject_last
    rank_gap = []
    with torch.no_grad():
        for layer in attn_events:
            state = clean["residual", layer + 1][0, sl]
            rank_state = int(rank_of(lm.project(state, projection).float(), target.token_id))
            rank_gap.append({"layer": layer, "rank_in_subject_last": rank_state,
                             "rank_in_attention_output": int(rank_of(attn_scores[layer], target.token_id))})

    ablation_results = _ablations(lm, enc, attn_events, target.token_id, projection) if ablations else {}
    return ExtractionResult(
        target.token, target.token_id, target.base_prob, projection,
        [lm.token_str(t) for t in attn_top1], [lm.token_str(t) for t in mlp_top1],
        rank_of(attn_scores, target.token_id).tolist(), rank_of(mlp_scores, target.token_id).tolist(),
        attn_events, mlp_events, category, first_before, ablation_results, rank_gap, fact_summary(enc),
        **target.fields(),
    )


def _ablations(lm: LM, enc: EncodedFact, layers: list[int], target_id: int, projection: Projection) -> dict:
    """For each attention event layer and variant: does the event survive, and the target's rank."""
    if not layers:
        return {}
    variants = ablation_keys(enc)
    last = enc.positions.last
    rows, keys = [], []
    for layer in layers:
        for name, blocked in variants.items():
            if blocked is None:
                rows.append([SetHeads([layer], range(lm.num_heads), [last])])
            else:
                rows.append([BlockAttention([layer], [last], blocked)])
            keys.append((layer, name))
    with torch.no_grad():
        out = run(lm, enc, rows, capture=Capture(attn=True, layers=layers, last_only=True))
        outputs = torch.stack([out.captures["attn", layer][i] for i, (layer, _) in enumerate(keys)])
        scores = lm.project(outputs, projection).float()
    ranks = rank_of(scores, target_id).tolist()
    result: dict = {}
    for (layer, name), rank in zip(keys, ranks):
        result.setdefault(str(layer), {})[name] = {"event": rank == 0, "rank": rank}
    return result

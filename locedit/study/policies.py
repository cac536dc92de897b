"""Edit-site policies of the study: where each policy edits a fact, the tuned fixed layer, the oracle's pick."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from locedit.study.split import fact_hash

HELD_OUT_POLICIES = ("located", "fixed", "fixed_carrier", "random", "located_no_l0", "located_subject_last")
FIXED_POLICIES = ("fixed", "fixed_carrier")
HEAD_POLICIES = ("head_located", "head_random_same_layers", "head_random_any")


def policy_key(fact_id: str, policy: str, layer: int | None) -> str:
    """A held-out row's key. The fixed policies' keys name their layer, so re-tuning the fixed layer re-runs them
    instead of reusing rows made at the old layer."""
    return f"heldout|{fact_id}|{policy}" + (f"|L{layer}" if policy in FIXED_POLICIES else "")


def layer_bands(num_layers: int) -> tuple[tuple[int, int], ...]:
    """The bands located_no_l0 − fixed is split by: the tuned layer (1), the early band that edits well on tuning
    (2–4), and the rest of the model's layers."""
    return ((1, 1), (2, 4), (5, num_layers - 1))


def random_layer(fact_id: str, num_layers: int) -> int:
    """The random policy's layer: uniform over the model's layers, seeded by the fact id."""
    return int(fact_hash(f"layer:{fact_id}")[:8], 16) % num_layers


def random_heads(fact_id: str, located: Sequence[Sequence[int]], num_layers: int, num_heads: int,
                 same_layers: bool) -> list[list[int]]:
    """As many random heads as `located`: in the located heads' layers (one per located head), or anywhere;
    never a located head, no duplicates; seeded by the fact id."""
    rng = np.random.default_rng(int(fact_hash(f"heads:{fact_id}:{same_layers}")[:8], 16))
    taken = {tuple(h) for h in located}
    out = []
    for layer, _ in located:
        while True:
            cand = (int(layer) if same_layers else int(rng.integers(num_layers)), int(rng.integers(num_heads)))
            if cand not in taken:
                taken.add(cand)
                out.append(list(cand))
                break
    return out


def located_layer(sm) -> int:
    """locate's top-ranked MLP layer (its `located_layers`: the recommendation itself may be the calibrated layer
    of the weights, `locedit.editing.calibration`; SiteMaps cached before that field existed recommend the located
    layer)."""
    rank_one = sm.recommendation["rank_one"]
    return rank_one.get("located_layers", rank_one["layers"])[0]


def policy_sites(sm, fact_id: str, fixed_layer: int, num_layers: int) -> dict[str, tuple[int, str]]:
    """`{policy: (layer, key position)}` of every held-out policy for one fact's SiteMap `sm`."""
    rec = located_layer(sm)
    no_l0 = next(m["layer"] for m in sm.mlp_layers if m["layer"] != 0)
    return {"located": (rec, "carrier"), "located_subject_last": (rec, "subject_last"),
            "located_no_l0": (no_l0, "carrier"), "fixed": (fixed_layer, "subject_last"),
            "fixed_carrier": (fixed_layer, "carrier"), "random": (random_layer(fact_id, num_layers), "carrier")}


def head_sites(sm, fact_id: str, num_layers: int, num_heads: int) -> dict[str, list[list[int]]]:
    """`{policy: heads}` of the head-edit policies: locate's extraction heads, random heads in their layers, random
    heads anywhere."""
    located = [list(h) for h in sm.recommendation["head_edit"]["heads"]]
    return {"head_located": located,
            "head_random_same_layers": random_heads(fact_id, located, num_layers, num_heads, True),
            "head_random_any": random_heads(fact_id, located, num_layers, num_heads, False)}


def loc_features(sm, layer: int) -> dict[str, Any]:
    """locate's evidence for one MLP layer: its score, rank, trace effect and knockout changes."""
    by_layer = {m["layer"]: m for m in sm.mlp_layers}
    m = by_layer.get(layer, {})
    rank = [x["layer"] for x in sm.mlp_layers].index(layer) if layer in by_layer else None
    return {"loc_score": m.get("score"), "loc_rank": rank, "loc_trace": m.get("trace_effect"),
            "loc_knockout": m.get("knockout_change"), "loc_layer_knockout": m.get("layer_knockout_change")}


def head_scores(sm, heads: Iterable[Sequence[int]]) -> list[float | None]:
    """locate's score of each head (None for a head it did not score)."""
    scores = {(h["layer"], h["head"]): h["score"] for h in sm.heads}
    return [scores.get((int(l), int(h))) for l, h in heads]


def best_row(rows: Sequence[Mapping]) -> Mapping | None:
    """The oracle's pick among sweep rows of one fact: highest (S, PS, ES, NS, EM)."""
    def k(r):
        return tuple(-1e9 if r.get(m) is None else r[m] for m in ("S", "PS", "ES", "NS", "EM"))
    return max(rows, key=k) if rows else None


def choose_fixed(rows: Mapping[str, Mapping], tuning_ids: Iterable[str]) -> tuple[int | None, dict]:
    """The fixed layer: the best mean S over the tuning facts swept at every layer (ties, rounded so float
    summation order never decides, go to PS, ES, then the summed margins EM + PM + NM), and the per-layer table."""
    tuning_ids = set(tuning_ids)
    sweep = [r for r in rows.values() if r["phase"] == "tuning" and r["fact"] in tuning_ids and "error" not in r]
    # only facts swept at every layer any fact was swept at: an interrupted sweep must not compare layers on
    # different facts
    layers = {r["layer"] for r in sweep}
    per_fact: dict[str, set] = {}
    for r in sweep:
        per_fact.setdefault(r["fact"], set()).add(r["layer"])
    complete = {f for f, ls in per_fact.items() if ls == layers}
    by_layer: dict[int, list] = {}
    for r in sweep:
        if r["fact"] in complete:
            by_layer.setdefault(r["layer"], []).append(r)
    table = {l: {m: float(np.mean([r[m] for r in rs if r.get(m) is not None] or [np.nan]))
                 for m in ("S", "ES", "PS", "NS", "EM", "PM", "NM")} | {"n": len(rs)}
             for l, rs in sorted(by_layer.items())}
    if not table:
        return None, table

    def margin(t: dict) -> float:  # P(new) - P(true) on prompt and paraphrases, P(true) - P(new) on neighbours
        return sum(0.0 if math.isnan(t[m]) else t[m] for m in ("EM", "PM", "NM"))

    best = max(table, key=lambda l: (round(table[l]["S"], 9), round(table[l]["PS"], 9), round(table[l]["ES"], 9),
                                     margin(table[l]), -l))
    return best, table

"""Scoring layer predictors against recorded trial sweeps: per fact, does the predictor's top layer hit the sweep's
best layer (±1), how much S does following it lose (regret), and how well does it rank the swept layers
(Spearman with S); against "earlier is better" (−layer)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from locedit.core.statistics import bootstrap_mean
from locedit.errors import LoceditError
from locedit.study.correlation import paired_sorted, within_fact_correlation
from locedit.study.policies import best_row

DEPTH = "depth"  # the baseline's score name: −layer


def preferred_band(sweep: Iterable[Mapping], margin: float = 0.10) -> tuple[int, int]:
    """The layer span a calibration prefers: from the first to the last swept layer whose mean S is within
    `margin` of the best (`sweep`: rows with "layer" and "S")."""
    rows = [r for r in sweep if r.get("S") is not None]
    if not rows:
        raise LoceditError("no calibration sweep rows with a mean S: cannot choose a preferred band")
    best = max(float(r["S"]) for r in rows)
    near = [int(r["layer"]) for r in rows if float(r["S"]) >= best - margin]
    return min(near), max(near)


def predicted_layer(rows: Sequence[Mapping], score: str) -> int:
    """The swept layer `score` ranks first (the earlier layer on a tie; −layer for `DEPTH`)."""
    def key(r):
        s = -r["layer"] if score == DEPTH else r[score]
        return (float(s), -r["layer"])
    return int(max(rows, key=key)["layer"])


def fact_outcome(rows: Sequence[Mapping], score: str, tolerance: int = 1) -> dict:
    """One fact's sweep `rows` (one per layer, with "S" and `score`): the best layer (`best_row`: S, then PS, ES,
    NS, EM), the predicted one, `hit` (|predicted − best| ≤ tolerance), `hit_S` (the predicted layer's S equals the
    best S: a tie counts) and `regret` (best S − predicted layer's S)."""
    rows = [r for r in rows if r.get("S") is not None and (score == DEPTH or r.get(score) is not None)]
    best = best_row(rows)
    layer = predicted_layer(rows, score)
    s_pred = next(float(r["S"]) for r in rows if r["layer"] == layer)
    return {"best": int(best["layer"]), "predicted": layer, "hit": abs(layer - int(best["layer"])) <= tolerance,
            "hit_S": s_pred >= float(best["S"]) - 1e-9, "regret": float(best["S"]) - s_pred}


def score_predictors(rows: Iterable[Mapping], scores: Sequence[str], tolerance: int = 1) -> dict:
    """Every predictor in `scores` (row keys; higher = predicted better) and `DEPTH` over the facts of `rows`:
    per predictor the per-fact outcomes, the hit rates and mean regret (bootstrap CIs), the within-fact Spearman
    with S (`within_fact_correlation`) and the paired differences to depth of hit, hit_S, regret and ρ."""
    rows = list(rows)
    by_fact: dict[str, list] = {}
    for r in rows:
        by_fact.setdefault(str(r["fact"]), []).append(r)
    out: dict = {"facts": len(by_fact), "tolerance": tolerance, "predictors": {}}
    for name in [DEPTH, *scores]:
        per_fact = {f: fact_outcome(rs, name, tolerance) for f, rs in sorted(by_fact.items())}
        entry = {"per_fact": per_fact}
        for metric in ("hit", "hit_S", "regret"):
            est = bootstrap_mean([float(o[metric]) for o in per_fact.values()])
            entry[metric] = {"mean": est.mean, "low": est.low, "high": est.high}
        if name != DEPTH:
            corr = within_fact_correlation(rows, score=name)
            entry["spearman"] = corr["score"]
            entry["spearman_minus_depth"] = corr["score_minus_depth"]
            entry["spearman_n"] = corr["n"]
            depth = out["predictors"][DEPTH]["per_fact"]
            for metric in ("hit", "hit_S", "regret"):
                entry[f"{metric}_minus_depth"] = paired_sorted({f: float(o[metric]) for f, o in per_fact.items()},
                                                               {f: float(o[metric]) for f, o in depth.items()})
        else:
            corr = within_fact_correlation([dict(r, _depth=-r["layer"]) for r in rows], score="_depth")
            entry["spearman"] = corr["depth"]
            entry["spearman_n"] = corr["n"]
        out["predictors"][name] = entry
    return out

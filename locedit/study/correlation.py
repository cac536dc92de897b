"""Does locate's layer score predict which layer edits best? Within-fact rank correlations and paired differences
by layer band."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from locedit.core.statistics import bootstrap_mean, paired_difference


def paired_sorted(a: Mapping, b: Mapping) -> dict:
    """`paired_difference(a, b)` (a − b) over the shared keys in sorted order, so the interval never depends on
    the order rows were read in."""
    return paired_difference(a, b, keys=sorted(a))


def paired_by_layer_band(a: Mapping[str, Mapping], b: Mapping[str, Mapping], bands: Sequence[tuple[int, int]],
                         metric: str = "S") -> dict[str, dict]:
    """Paired difference a − b of `metric` per band of a's edit layer. `a`, `b`: {fact: row with "layer" and
    metric}; `bands`: [(first, last), …] inclusive. Returns {"first–last": paired_difference}."""
    out = {}
    for first, last in bands:
        in_band = {f: r for f, r in a.items() if r.get("layer") is not None and first <= int(r["layer"]) <= last}
        out[f"{first}–{last}" if last != first else str(first)] = paired_sorted(
            {f: r.get(metric) for f, r in in_band.items()}, {f: r.get(metric) for f, r in b.items()})
    return out


def within_fact_correlation(rows: Iterable[Mapping], *, outcome: str = "S", score: str = "loc_score") -> dict:
    """Per fact, Spearman's ρ over its swept layers between locate's layer score and the edit outcome, and the same
    for "earlier is better" (−layer); the mean of each over facts (bootstrap CI) and their paired difference. Facts
    whose outcome (or score) is the same at every layer have no ranking to predict and are counted apart."""
    from scipy.stats import spearmanr

    by_fact: dict[str, list] = {}
    for r in rows:
        if r.get(outcome) is not None and r.get(score) is not None:
            by_fact.setdefault(str(r["fact"]), []).append(r)
    rho_score, rho_depth, flat = {}, {}, 0
    for fact, rs in by_fact.items():
        y = [float(r[outcome]) for r in rs]
        x = [float(r[score]) for r in rs]
        if len(rs) < 3 or len(set(y)) < 2 or len(set(x)) < 2:
            flat += 1
            continue
        rho_score[fact] = float(spearmanr(x, y).statistic)
        rho_depth[fact] = float(spearmanr([-r["layer"] for r in rs], y).statistic)
    out = {"facts": len(by_fact), "flat": flat, "n": len(rho_score), "per_fact_score": rho_score,
           "per_fact_depth": rho_depth}
    for name, d in (("score", rho_score), ("depth", rho_depth)):
        mean, lo, hi = bootstrap_mean(list(d.values()))
        out[name] = {"mean": mean, "low": lo, "high": hi}
    out["score_minus_depth"] = paired_sorted(rho_score, rho_depth)
    return out

"""The statistics every result uses: a mean with its bootstrap CI, a paired difference (sign: a − b), the Student-t
CI half-width of per-layer means, AUROC, and the layer-vs-score regression (scipy and scikit-learn underneath)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Hashable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

# Defaults of every bootstrap here: percentile method, 2000 resamples, seed 0 (a rerun gives the same interval).
CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0


class Estimate(NamedTuple):
    """A mean and its confidence interval; `low`/`high` are None for fewer than 2 values, `mean` for none."""

    mean: float | None
    low: float | None
    high: float | None

    def excludes(self, value: float = 0.0) -> bool:
        """Whether the interval lies wholly above or below `value`."""
        return self.low is not None and (self.low > value or self.high < value)


def _finite(values: Iterable[Any]) -> np.ndarray:
    return np.asarray([float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                      dtype=float)


def bootstrap_mean(values: Iterable[float | None], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                   seed: int = SEED) -> Estimate:
    """Mean and percentile-bootstrap CI (`scipy.stats.bootstrap`) of the values, None and NaN left out. A constant
    sample gets a zero-width interval; one value gets `(mean, None, None)`; none `(None, None, None)`."""
    from scipy.stats import bootstrap

    x = _finite(values)
    if x.size == 0:
        return Estimate(None, None, None)
    mean = float(x.mean())
    if x.size < 2:
        return Estimate(mean, None, None)
    if np.allclose(x, x[0]):
        return Estimate(mean, mean, mean)
    with warnings.catch_warnings():  # scipy warns about degenerate resamples of near-constant data
        warnings.simplefilter("ignore")
        res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=resamples, method="percentile",
                        rng=np.random.default_rng(seed))
    return Estimate(mean, float(res.confidence_interval.low), float(res.confidence_interval.high))


def paired_difference(a: Mapping[Hashable, float | None], b: Mapping[Hashable, float | None], *,
                      keys: Sequence[Hashable] | None = None, tie: float = 1e-9, confidence: float = CONFIDENCE,
                      resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """The paired difference **a − b** over the keys both have with a value (`keys`: which, in which order;
    default a's keys in a's order): `{"n", "mean", "low", "high"}` (bootstrap CI of the per-key differences),
    `"a"`, `"b"` (the means of each side over those keys), `"wins"` (a − b > tie), `"ties"`, `"losses"`
    (a − b < −tie), `"excludes_zero"`."""
    order = list(a) if keys is None else list(keys)
    pairs = [(float(a[k]), float(b[k])) for k in order
             if k in a and k in b and a[k] is not None and b[k] is not None]
    diffs = [x - y for x, y in pairs]
    est = bootstrap_mean(diffs, confidence=confidence, resamples=resamples, seed=seed)
    return {"n": len(pairs), "mean": est.mean, "low": est.low, "high": est.high,
            "a": float(np.mean([x for x, _ in pairs])) if pairs else None,
            "b": float(np.mean([y for _, y in pairs])) if pairs else None,
            "wins": sum(d > tie for d in diffs), "ties": sum(abs(d) <= tie for d in diffs),
            "losses": sum(d < -tie for d in diffs), "excludes_zero": est.excludes(0.0)}


def mean_ci(values: Sequence[float] | np.ndarray, axis: int = 0, confidence: float = CONFIDENCE):
    """Mean and the half-width of its confidence interval (Student t) along `axis`, ignoring NaNs; the half-width
    is NaN where fewer than 2 values are present."""
    from scipy import stats

    arr = np.asarray(values, dtype=float)
    with warnings.catch_warnings():  # all-NaN columns (e.g. one fact's missing layer) give NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(arr, axis=axis)
        std = np.nanstd(arr, axis=axis, ddof=1) if arr.shape[axis] > 1 else np.zeros_like(mean)
    count = np.sum(~np.isnan(arr), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf((1 + confidence) / 2, np.maximum(count - 1, 1)) * std / np.sqrt(np.maximum(count, 1))
    return mean, np.where(count > 1, half, np.nan)


def auroc(labels: Sequence[bool | int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve of `scores` predicting the binary `labels` (`sklearn.metrics.roc_auc_score`);
    None when only one class is present (no curve)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, dtype=int)
    if len(y) != len(scores):
        raise ValueError(f"auroc needs as many scores as labels, got {len(scores)} and {len(y)}")
    if len(set(y.tolist())) < 2:
        return None
    return float(roc_auc_score(y, np.asarray(scores, dtype=float)))


def hase_regression(rows: Iterable[Mapping], *, outcome: str = "S", score: str = "loc_score",
                    folds: int = 5) -> dict:
    """Hase et al.'s question on sweep rows `{fact, layer, <outcome>, <score>}`: how much variance of the outcome
    does the score explain beyond layer identity? In-sample R² of least squares on layer one-hots, on the score
    alone, on both, and the increment; the same out of fold (`GroupKFold` by fact, R² of the pooled out-of-fold
    predictions); the score's coefficient and its Pearson r with the outcome. Fewer than 4 rows: `{"n"}` only."""
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GroupKFold, cross_val_predict

    rows = [r for r in rows if r.get(outcome) is not None and r.get(score) is not None]
    if len(rows) < 4:
        return {"n": len(rows)}
    y = np.array([float(r[outcome]) for r in rows])
    layers = sorted({r["layer"] for r in rows})
    onehot = np.array([[float(r["layer"] == l) for l in layers] for r in rows])
    s = np.array([[float(r[score])] for r in rows])
    designs = {"layer": onehot, "score": s, "layer+score": np.hstack([onehot, s])}
    out: dict = {"n": len(rows), "facts": len({r["fact"] for r in rows}), "layers": layers, "outcome": outcome,
                 "score": score}
    for name, x in designs.items():
        model = LinearRegression().fit(x, y)
        out[f"r2_{name}"] = float(model.score(x, y)) if y.var() > 0 else 0.0
        if name == "score":
            out["score_coef"] = float(model.coef_[0])
    out["r2_increment"] = out["r2_layer+score"] - out["r2_layer"]
    groups = np.array([str(r["fact"]) for r in rows])
    k = min(folds, len(set(groups)))
    if k >= 2 and y.var() > 0:
        for name, x in designs.items():
            pred = cross_val_predict(LinearRegression(), x, y, groups=groups, cv=GroupKFold(n_splits=k))
            out[f"cv_r2_{name}"] = float(r2_score(y, pred))
    if len(set(s[:, 0])) > 1 and y.var() > 0:
        out["pearson_score_outcome"] = float(np.corrcoef(s[:, 0], y)[0, 1])
    return out

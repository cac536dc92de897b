"""core/statistics.py: bootstrap means, the sign of paired differences, Student-t CIs, AUROC, the regression."""

import numpy as np
import pytest

from locedit.core.statistics import Estimate, auroc, bootstrap_mean, hase_regression, mean_ci, paired_difference


def test_bootstrap_mean_is_seeded_and_covers_the_mean():
    x = np.random.default_rng(3).normal(2.0, 1.0, 100)
    est = bootstrap_mean(x)
    assert isinstance(est, Estimate) and est.low < est.mean < est.high and est.low < 2.0 < est.high
    assert bootstrap_mean(x) == est and bootstrap_mean(x, seed=1) != est
    wider = bootstrap_mean(x, confidence=0.99)
    assert wider.low < est.low and wider.high > est.high
    assert bootstrap_mean([1.0, None, float("nan"), 3.0]).mean == 2.0       # None and NaN left out
    assert bootstrap_mean([]) == (None, None, None) and not Estimate(None, None, None).excludes(0)


def test_paired_difference_is_a_minus_b():
    a = {"x": 1.0, "y": 2.0, "z": 3.0, "only_a": 9.0}
    b = {"x": 0.5, "y": 2.0, "z": 2.0, "only_b": -9.0}
    d = paired_difference(a, b)
    assert d["n"] == 3 and abs(d["mean"] - 0.5) < 1e-12 and (d["wins"], d["ties"], d["losses"]) == (2, 1, 0)
    assert d["a"] == 2.0 and d["b"] == 1.5
    r = paired_difference(b, a)
    assert abs(r["mean"] + 0.5) < 1e-12 and (r["wins"], r["losses"]) == (0, 2)
    assert abs(r["low"] + d["high"]) < 1e-9 and abs(r["high"] + d["low"]) < 1e-9   # the mirror interval
    # the ties threshold: a difference of 1e-12 is a tie by default, a win with tie=0
    assert paired_difference({"k": 1e-12}, {"k": 0.0})["ties"] == 1
    assert paired_difference({"k": 1e-12}, {"k": 0.0}, tie=0.0)["wins"] == 1


def test_paired_difference_keys_choose_the_pairs_and_their_order():
    rng = np.random.default_rng(0)
    a = {f"k{i}": float(v) for i, v in enumerate(rng.normal(size=30))}
    b = {k: 0.0 for k in a}
    reordered = dict(reversed(list(a.items())))
    assert paired_difference(a, b, keys=sorted(a)) == paired_difference(reordered, b, keys=sorted(a))
    assert paired_difference(a, b, keys=["k0", "k1", "missing"])["n"] == 2


def test_mean_ci_student_t():
    from scipy import stats

    values = np.array([[1.0, 2.0], [3.0, np.nan], [5.0, 4.0]])
    mean, half = mean_ci(values)
    assert np.allclose(mean, [3.0, 3.0])
    expected = stats.t.ppf(0.975, 2) * np.std([1, 3, 5], ddof=1) / np.sqrt(3)
    assert abs(half[0] - expected) < 1e-12
    single = mean_ci(np.array([[1.0], [np.nan]]))[1]
    assert np.isnan(single[0])                                            # one value: no interval


def test_auroc():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auroc([1, 1], [0.2, 0.3]) is None
    with pytest.raises(ValueError, match="as many scores as labels"):
        auroc([0, 1], [0.2])


def test_hase_regression_cross_validation_pools_out_of_fold_predictions():
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import GroupKFold

    rng = np.random.default_rng(5)
    rows = [{"fact": f, "layer": l, "loc_score": float(rng.uniform()), "S": float(rng.uniform())}
            for f in range(8) for l in (0, 4, 8)]
    out = hase_regression(rows)
    # by hand: out-of-fold predictions from GroupKFold by fact, one R² over all of them
    y = np.array([r["S"] for r in rows])
    x = np.array([[r["loc_score"]] for r in rows])
    groups = np.array([str(r["fact"]) for r in rows])
    pred = np.zeros_like(y)
    for train, test in GroupKFold(n_splits=5).split(x, y, groups):
        pred[test] = LinearRegression().fit(x[train], y[train]).predict(x[test])
    assert abs(out["cv_r2_score"] - (1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())) < 1e-12
    assert out["n"] == 24 and out["facts"] == 8 and out["layers"] == [0, 4, 8]

"""The mechanistic pass rules (locedit.verification.mechanism) on synthetic numbers: each threshold just inside and
just outside, missing data (NaN, constant or short curves, no MLP layer, no neighbours), and the combination rule.
The thresholds are the module's constants; these tests read them rather than restate them."""

import math

import numpy as np
import pytest

from locedit.verification import mechanism as mech

NAN = float("nan")
EPS = 1e-6


# --- helpers of the knockout rule -------------------------------------------------------------------------------------
def test_drop_weighted_centre_by_hand():
    assert mech.drop_weighted_centre([0.0, -1.0, -3.0, 0.0]) == pytest.approx((1 * 1 + 2 * 3) / 4)
    assert mech.drop_weighted_centre([-2.0, 0.5, 0.0, -2.0]) == pytest.approx(1.5)  # rises count for nothing
    assert mech.drop_weighted_centre([0.3, 0.2, 0.1, 0.4]) == 2.0  # nothing drops: the argmin


def test_pearson_and_its_missing_data():
    a = [0.0, -1.0, -3.0, -0.5]
    assert mech.pearson(a, a) == pytest.approx(1.0)
    assert mech.pearson(a, [-x for x in a]) == pytest.approx(-1.0)
    assert mech.pearson(a, [2 * x + 1 for x in a]) == pytest.approx(1.0)
    b = [0.0, -2.0, -1.0, 0.0]
    ma, mb = np.mean(a), np.mean(b)
    by_hand = sum((x - ma) * (y - mb) for x, y in zip(a, b)) / math.sqrt(
        sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    assert mech.pearson(a, b) == pytest.approx(by_hand)
    assert mech.pearson(a, [0.0] * 4) == 0.0 and mech.pearson([1.0], [2.0]) == 0.0 and mech.pearson([], []) == 0.0


def test_log_odds_clips_certainties():
    assert mech.log_odds(0.5) == pytest.approx(0.0)
    assert mech.log_odds(1 / (1 + math.e)) == pytest.approx(-1.0)
    assert mech.log_odds(1.0) == pytest.approx(math.log((1 - 1e-9) / 1e-9))
    assert mech.log_odds(0.0) == pytest.approx(-math.log((1 - 1e-9) / 1e-9))


# --- knockout ---------------------------------------------------------------------------------------------------------
def test_knockout_rule_thresholds():
    lo, shift, corr = mech.KNOCKOUT_MIN_LOGODDS, mech.KNOCKOUT_MAX_SHIFT, mech.KNOCKOUT_MIN_CORR
    assert mech.knockout_rule(lo, 0.0, 1.0)
    assert not mech.knockout_rule(lo - EPS, 0.0, 1.0)
    assert mech.knockout_rule(5.0, shift, 1.0) and mech.knockout_rule(5.0, -shift, 1.0)
    assert not mech.knockout_rule(5.0, shift + EPS, 1.0) and not mech.knockout_rule(5.0, -shift - EPS, 1.0)
    assert mech.knockout_rule(5.0, 0.0, corr)
    assert not mech.knockout_rule(5.0, 0.0, corr - EPS)


@pytest.mark.parametrize("args", [(NAN, 0.0, 1.0), (5.0, NAN, 1.0), (5.0, 0.0, NAN)])
def test_knockout_rule_fails_on_missing_numbers(args):
    assert mech.knockout_rule(*args) is False


def knockout(subject, base_prob, blocked, others=None):
    """A knockout result dict as `attention_knockout(...).to_dict()` gives it (only what the check reads)."""
    curves = {"subject": list(subject), **(others or {})}
    return {"knockout": {"relative_change": curves, "base_prob": base_prob,
                         "probs": {"subject": list(blocked)}, "window": 3}}


def p_for_logodds(x):
    return 1 / (1 + math.exp(-x))


CURVE = [0.0, -0.1, -0.8, -0.3, 0.0, 0.0]  # critical at layer 2


def test_knockout_check_numbers_and_logodds_threshold():
    before = knockout(CURVE, 0.6, [0.6, 0.5, 0.2, 0.4, 0.6, 0.6])
    for drop, passed in ((mech.KNOCKOUT_MIN_LOGODDS + 1e-4, True), (mech.KNOCKOUT_MIN_LOGODDS - 1e-4, False)):
        blocked = [0.5] * 6
        blocked[2] = p_for_logodds(-drop)  # base p(new) = 0.5: log-odds 0
        c = mech.knockout_check(before, knockout(CURVE, 0.5, blocked))
        assert c["passed"] is passed, drop
        assert c["subject_logodds_drop_after"] == pytest.approx(drop)
        assert c["subject_logodds_drop_before"] == pytest.approx(
            math.log(0.6 / 0.4) - math.log(0.2 / 0.8))
        assert c["critical_layer_before"] == c["critical_layer_after"] == 2
        assert c["layer_shift"] == 0.0 and c["curve_correlation"] == pytest.approx(1.0)
        assert c["subject_drop_after"] == pytest.approx(0.8)


def bump(n, centre, width=4.0):
    """A knockout curve dropping most around `centre` (a Gaussian dip: its drop-weighted centre is `centre`)."""
    x = np.arange(n)
    return list(-0.8 * np.exp(-((x - centre) ** 2) / (2 * width ** 2)))


def test_knockout_check_layer_shift_threshold():
    n, s = 80, mech.KNOCKOUT_MAX_SHIFT
    blocked = [0.01] * n  # p(new) 0.5 -> 0.01: a large log-odds drop everywhere
    before = knockout(bump(n, 40.0), 0.5, blocked)
    for delta, passed in ((s - 0.05, True), (s + 0.05, False), (-s + 0.05, True), (-s - 0.05, False)):
        c = mech.knockout_check(before, knockout(bump(n, 40.0 + delta), 0.5, blocked))
        assert c["layer_shift"] == pytest.approx(delta, abs=1e-4)
        assert c["curve_correlation"] >= mech.KNOCKOUT_MIN_CORR  # only the shift decides here
        assert c["passed"] is passed, delta


def test_knockout_check_correlation_threshold():
    # after = before + t * noise: pick t so that r lands just either side of KNOCKOUT_MIN_CORR
    before = np.array([0.0, -0.2, -0.9, -0.5, -0.1, 0.0, 0.0, -0.05])
    noise = np.array([0.3, -0.2, 0.1, 0.4, -0.6, 0.2, -0.3, 0.1])
    noise -= noise.mean()
    blocked = [0.01] * len(before)

    def corr_at(t):
        return mech.pearson(before, before + t * noise)

    lo, hi = 0.0, 100.0
    for _ in range(100):  # bisect r(t) = KNOCKOUT_MIN_CORR (r falls as t grows on this pair)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if corr_at(mid) > mech.KNOCKOUT_MIN_CORR else (lo, mid)
    verdicts = {}
    for t in (lo * 0.99, hi * 1.01):
        after = before + t * noise
        c = mech.knockout_check(knockout(before, 0.5, blocked), knockout(after, 0.5, blocked))
        assert abs(c["layer_shift"]) <= mech.KNOCKOUT_MAX_SHIFT  # only the correlation decides here
        verdicts[t] = (c["curve_correlation"] >= mech.KNOCKOUT_MIN_CORR, c["passed"])
    assert list(verdicts.values()) == [(True, True), (False, False)]


def test_knockout_check_flat_curve_after_fails():
    """An edit whose new target no longer depends on the subject: a flat curve correlates with nothing."""
    c = mech.knockout_check(knockout(CURVE, 0.6, [0.1] * 6), knockout([0.0] * 6, 0.9, [0.9] * 6))
    assert c["curve_correlation"] == 0.0 and c["subject_logodds_drop_after"] == pytest.approx(0.0)
    assert c["passed"] is False


def test_knockout_check_all_groups_correlation_is_reported_not_judged():
    others_b = {"last": [0.0, 0.0, -0.1, -0.9, -0.2, 0.0]}
    others_a = {"last": [-0.9, 0.0, 0.0, 0.0, 0.0, 0.4]}
    blocked = [0.01] * 6
    c = mech.knockout_check(knockout(CURVE, 0.5, blocked, others_b), knockout(CURVE, 0.5, blocked, others_a))
    expected = mech.pearson(others_b["last"] + CURVE, others_a["last"] + CURVE)
    assert c["curve_correlation_all_groups"] == pytest.approx(expected) and expected < mech.KNOCKOUT_MIN_CORR
    assert c["passed"] is True


# --- extraction -------------------------------------------------------------------------------------------------------
def test_extraction_rule_thresholds():
    gain = mech.EXTRACTION_MIN_GAIN
    assert mech.extraction_rule(new_after=2.0, old_after=2.0 - EPS, new_before=2.0 - gain - EPS)
    assert not mech.extraction_rule(new_after=2.0, old_after=2.0, new_before=0.0)  # a tie is not a win
    assert not mech.extraction_rule(new_after=2.0, old_after=2.0 + EPS, new_before=0.0)
    assert not mech.extraction_rule(new_after=2.0, old_after=0.0, new_before=2.0 - gain)  # no rise
    assert not mech.extraction_rule(new_after=2.0, old_after=0.0, new_before=2.0 - gain + EPS)


@pytest.mark.parametrize("args", [(NAN, 0.0, 0.0), (1.0, NAN, 0.0), (1.0, 0.0, NAN)])
def test_extraction_rule_fails_on_missing_numbers(args):
    assert mech.extraction_rule(*args) is False


def readout(dla, attn_top1=(), mlp_top1=(), ranks=None):
    return {"readout": {"dla": np.asarray(dla, float), "attn_top1": list(attn_top1), "mlp_top1": list(mlp_top1),
                        "ranks": ranks}, "old_id": 7, "new_id": 9}


def test_extraction_check_sums_the_given_heads():
    L, H = 3, 2
    db, da = np.zeros((L, H, 2)), np.zeros((L, H, 2))
    db[2, 1] = [3.0, 0.5]   # (old, new) before
    db[1, 0] = [1.0, 0.0]
    da[2, 1] = [1.0, 2.0]   # after
    da[1, 0] = [0.5, 0.0]
    da[0, 0] = [0.0, 50.0]  # not one of the heads: ignored
    before = readout(db, attn_top1=[7, 3, 7], mlp_top1=[1, 7, 2])
    after = readout(da, attn_top1=[9, 9, 3], mlp_top1=[9, 1, 2])
    c = mech.extraction_check(None, before, after, [(2, 1), (1, 0)], "sitemap")
    assert (c["sum_old_before"], c["sum_new_before"], c["sum_old_after"], c["sum_new_after"]) == (4.0, 0.5, 1.5, 2.0)
    assert c["new_gain"] == pytest.approx(1.5) and c["new_minus_old_after"] == pytest.approx(0.5)
    assert c["passed"] is True and c["heads"] == [[2, 1], [1, 0]] and c["head_source"] == "sitemap"
    assert c["events"] == {"attn_old_before": [0, 2], "mlp_old_before": [1], "attn_new_after": [0, 1],
                           "mlp_new_after": [0]}
    da[1, 0] = [1.0, 0.0]  # old after 2.0 = new after 2.0: a tie fails
    assert mech.extraction_check(None, before, readout(da), [(2, 1), (1, 0)], "sitemap")["passed"] is False


def test_extraction_check_ranks_heads_by_old_direct_logit_before():
    db = np.zeros((4, 3, 2))
    for (l, h), v in {(3, 2): 5.0, (0, 1): 4.0, (2, 0): 3.0, (1, 1): 2.9}.items():
        db[l, h, 0] = v
    c = mech.extraction_check(None, readout(db), readout(np.zeros((4, 3, 2))), None, "direct_logit_before")
    assert c["heads"] == [[3, 2], [0, 1], [2, 0]][:mech.TOP_HEADS]
    assert c["passed"] is False and c["new_gain"] == 0.0  # an edit that changed nothing


# --- enrichment -------------------------------------------------------------------------------------------------------
def test_enrichment_layers_read():
    assert mech.enrichment_layers(0, 6) == [1, 2, 3, 4, 5]   # leaving layers 0 .. 4 (= L-2)
    assert mech.enrichment_layers(4, 6) == [5]
    assert mech.enrichment_layers(5, 6) == [6]               # the last layer: the final output only


def test_enrichment_rule_thresholds():
    top, f = mech.ENRICHMENT_MAX_RANK, mech.ENRICHMENT_MIN_FACTOR
    far = int((top + 1) * f) + 10
    assert mech.enrichment_rule(far, top, 10.0, 10.0)
    assert not mech.enrichment_rule(far * 10, top + 1, 10.0, 10.0)           # rank just too high
    a = 9
    b = int((a + 1) * f) - 1                                                # (a + 1) * f == b + 1
    assert mech.enrichment_rule(b, a, 10.0, 10.0)
    assert not mech.enrichment_rule(b - 1, a, 10.0, 10.0)                    # improved just too little
    assert mech.enrichment_rule(int(f) - 1, 0, 10.0, 10.0)                   # rank 0 counts as rank + 1 = 1
    assert mech.enrichment_rule(far, 0, 10.0, 10.5)                          # old target fell: fine
    assert not mech.enrichment_rule(far, 0, 10.0, 10.0 - EPS)                # old target improved: fails


@pytest.mark.parametrize("args", [(1000, 0, NAN, 1.0), (1000, 0, 1.0, NAN)])
def test_enrichment_rule_fails_on_missing_numbers(args):
    assert mech.enrichment_rule(*args) is False


def ranks(old, new):
    return np.stack([np.asarray(old), np.asarray(new)], axis=1)


def test_enrichment_check_reads_the_layers_after_the_edit():
    L = 5  # rows 0..5: row l = entering layer l, row 5 the final output
    before = readout(np.zeros((L, 1, 2)), ranks=ranks([3, 3, 3, 3, 3, 0], [900, 800, 700, 600, 650, 1]))
    after = readout(np.zeros((L, 1, 2)), ranks=ranks([3, 5, 6, 2, 9, 0], [900, 790, 100, 174, 150, 0]))
    c = mech.enrichment_check(before, after, 1, 2, "tok")
    # edit at layer 1: rows 2..4 (leaving layers 1..3); the final output row 5 (rank 0 after) is not read
    assert c["layers_read"] == [1, 3]
    assert c["new_best_rank_before"] == 600 and c["new_best_rank_after"] == 100
    assert c["old_median_rank_before"] == 3.0 and c["old_median_rank_after"] == 6.0
    assert c["new_rank_at_layer_before"] == 700 and c["new_rank_at_layer_after"] == 100
    assert c["passed"] is (101 * mech.ENRICHMENT_MIN_FACTOR <= 601) is True
    last = mech.enrichment_check(before, after, L - 1, 2, "tok")  # the last layer reads the final output
    assert last["layers_read"] == [L - 1, L - 1] and last["new_best_rank_after"] == 0


def test_enrichment_not_applicable_without_an_mlp_layer():
    c = mech.enrichment_check({}, {}, None, 0, "tok")
    assert c["applicable"] is False and c["passed"] is None and "MLP" in c["reason"]


# --- locality ---------------------------------------------------------------------------------------------------------
def test_relative_change():
    assert mech.relative_change(0.5, 0.6) == pytest.approx(0.2)
    assert mech.relative_change(0.5, 0.25) == pytest.approx(-0.5)
    assert mech.relative_change(0.0, 0.3) == 0.0  # no relative change can be measured from p = 0
    assert mech.relative_change(NAN, 0.3) == 0.0  # nor from a missing p: the neighbour is judged by its sites only


def test_locality_rule_thresholds():
    m = mech.LOCALITY_MAX_REL_CHANGE
    assert mech.locality_rule([True, True], [m, -m])
    assert not mech.locality_rule([True, True], [m, m + EPS])
    assert not mech.locality_rule([True, True], [-m - EPS, 0.0])
    assert not mech.locality_rule([True, False], [0.0, 0.0])
    assert not mech.locality_rule([True], [NAN])
    with pytest.raises(ValueError):
        mech.locality_rule([True, True], [0.0])


def neighbour(p, layer=3, head=(2, 1), prompt="The Louvre is in"):
    return {"prompt": prompt, "true_target": " Paris", "p_true": p, "top_mlp_layer": layer, "top_head": list(head)}


def test_locality_check_per_neighbour():
    m = mech.LOCALITY_MAX_REL_CHANGE
    before = {"neighbours": [neighbour(0.4), neighbour(0.2, prompt="Big Ben is in")]}
    inside = {"neighbours": [neighbour(0.4 * (1 - m) + 1e-9), neighbour(0.2 * (1 + m) - 1e-9)]}
    c = mech.locality_check(before, inside)
    assert c["passed"] is True and c["neighbours"] == 2 and c["same_sites"] == 2
    assert c["max_abs_relative_change"] == pytest.approx(m)
    outside = {"neighbours": [neighbour(0.4), neighbour(0.2 * (1 + m) + 1e-6)]}
    assert mech.locality_check(before, outside)["passed"] is False
    moved_layer = {"neighbours": [neighbour(0.4), neighbour(0.2, layer=4)]}
    moved_head = {"neighbours": [neighbour(0.4, head=(2, 0)), neighbour(0.2)]}
    for after in (moved_layer, moved_head):
        c = mech.locality_check(before, after)
        assert c["passed"] is False and c["same_sites"] == 1


def test_locality_not_applicable_without_neighbours():
    c = mech.locality_check({"neighbours": []}, {"neighbours": []})
    assert c["applicable"] is False and c["passed"] is None


# --- the combination --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("verdicts,passed", [
    ([True, True, True, True], True),
    ([True, True, True, False], False),
    ([False, True, True, True], False),
    ([True, True, None, None], True),   # enrichment and locality not applicable
    ([True, False, None, None], False),
    ([None, None, None, None], False),  # nothing applicable: no evidence, no pass
    ([], False),
])
def test_overall_rule(verdicts, passed):
    assert mech.overall_rule(verdicts) is passed


def test_rules_text_names_the_thresholds():
    assert f"{mech.KNOCKOUT_MIN_LOGODDS:g}" in mech.RULES["knockout"]
    assert f"{mech.KNOCKOUT_MIN_CORR:g}" in mech.RULES["knockout"]
    assert str(mech.ENRICHMENT_MAX_RANK) in mech.RULES["enrichment"]
    assert f"{mech.LOCALITY_MAX_REL_CHANGE:.0%}" in mech.RULES["locality"]
    assert f"{mech.SUFFICIENCY_MIN_LOGODDS:g}" in mech.RULES["sufficiency"]
    assert f"{mech.NECESSITY_MIN_LOGODDS:g}" in mech.RULES["necessity"]
    assert f"{mech.OV_MIN_GAIN:g}" in mech.RULES["ov_read"]
    assert set(mech.RULES) == {"knockout", "extraction", "sufficiency", "necessity", "ov_read", "enrichment",
                               "locality"}
    assert set(mech.IN_RULE) <= set(mech.RULES)


# --- causal enrichment (sufficiency, necessity, OV read) --------------------------------------------------------
def test_causal_rules_thresholds_and_nan():
    for rule, t in ((mech.sufficiency_rule, mech.SUFFICIENCY_MIN_LOGODDS),
                    (mech.necessity_rule, mech.NECESSITY_MIN_LOGODDS), (mech.ov_rule, mech.OV_MIN_GAIN)):
        assert rule(t) is True and rule(t + 1.0) is True
        assert rule(t - EPS) is False and rule(NAN) is False and rule(-abs(t) - 1) is False


def test_fraction():
    assert mech.fraction(1.0, 4.0) == 0.25 and mech.fraction(-2.0, 4.0) == -0.5
    assert math.isnan(mech.fraction(1.0, 0.0))


def _causal_states(p_before, p_after, patched_before, patched_after):
    """Measurements as `measure` + `cross_patch` leave them: p = [p(old), p(new)]."""
    before = {"readout": {"p": [0.5, p_before]}, "patched": [0.1, patched_before]}
    after = {"readout": {"p": [0.1, p_after]}, "patched": [0.4, patched_after]}
    return before, after


SETUP = mech.MechanismSetup(None, " Rome", 3, 2, None, [])


def test_sufficiency_and_necessity_checks_by_hand():
    lo = lambda p: math.log(p / (1 - p))  # noqa: E731
    # a subject-keyed edit: the edited state alone carries the new target, the unedited one removes it
    before, after = _causal_states(0.01, 0.9, 0.8, 0.02)
    s, n = mech.sufficiency_check(before, after, SETUP), mech.necessity_check(before, after, SETUP)
    assert s["logodds_gain"] == pytest.approx(lo(0.8) - lo(0.01)) and s["passed"] is True
    assert s["share_of_edit"] == pytest.approx((lo(0.8) - lo(0.01)) / (lo(0.9) - lo(0.01)))
    assert n["logodds_drop"] == pytest.approx(lo(0.9) - lo(0.02)) and n["passed"] is True
    # a shortcut at the last token: patching the subject state changes nothing either way
    before, after = _causal_states(0.01, 0.9, 0.01, 0.9)
    s, n = mech.sufficiency_check(before, after, SETUP), mech.necessity_check(before, after, SETUP)
    assert s["logodds_gain"] == pytest.approx(0.0) and s["passed"] is False
    assert n["logodds_drop"] == pytest.approx(0.0) and n["passed"] is False
    # just inside / just outside each threshold
    p0 = 0.01
    for margin, passed in ((1e-4, True), (-1e-4, False)):
        target = lo(p0) + mech.SUFFICIENCY_MIN_LOGODDS + margin
        px = 1 / (1 + math.exp(-target))
        before, after = _causal_states(p0, 0.9, px, 0.9)
        assert mech.sufficiency_check(before, after, SETUP)["passed"] is passed
        target = lo(0.9) - mech.NECESSITY_MIN_LOGODDS - margin
        before, after = _causal_states(p0, 0.9, p0, 1 / (1 + math.exp(-target)))
        assert mech.necessity_check(before, after, SETUP)["passed"] is passed


def test_causal_checks_not_applicable_without_a_layer():
    setup = mech.MechanismSetup(None, " Rome", None, 2, None, [])
    before, after = {"readout": {"p": [0.5, 0.1]}, "patched": None}, {"readout": {"p": [0.1, 0.9]}, "patched": None}
    for check in (mech.sufficiency_check, mech.necessity_check):
        c = check(before, after, setup)
        assert c["applicable"] is False and c["passed"] is None


def test_ov_check_by_hand():
    heads = [[20, 1], [23, 4]]
    before = {"ov": [[2.0, -1.0], [1.0, 0.0]], "ov_heads": heads}  # per head [old, new]
    after = {"ov": [[1.0, 1.5], [0.5, 2.0]], "ov_heads": heads}
    c = mech.ov_check(before, after, 3)
    assert c["new_minus_old_before"] == pytest.approx(-3.0 + -1.0)
    assert c["new_minus_old_after"] == pytest.approx(0.5 + 1.5)
    assert c["gain"] == pytest.approx(6.0) and c["passed"] is (6.0 >= mech.OV_MIN_GAIN)
    assert c["evidence"]["per_head"][1] == {"layer": 23, "head": 4, "old_before": 1.0, "new_before": 0.0,
                                            "old_after": 0.5, "new_after": 2.0}
    same = mech.ov_check(before, before, 3)
    assert same["gain"] == 0.0 and same["passed"] is False

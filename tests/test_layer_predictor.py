"""The edit-layer predictors (no trial edits) and the scoring of predictors against recorded sweeps."""

from __future__ import annotations

import math

import pytest
import torch

import tiny
from locedit.core.facts import EditRequest, Fact
from locedit.editing.layer_predictor import (gradient_scores, reach_ratio, restrict_to_band, rome_reach_scores,
                                             target_gradients, target_nll)
from locedit.errors import FactError, LoceditError
from locedit.study.prediction import DEPTH, fact_outcome, preferred_band, score_predictors

FACT = Fact("Eiffel Tower", "The Eiffel Tower is located in the city of", "Paris",
            meta={"paraphrases": ["The Eiffel Tower is in", "Eiffel Tower is located in"],
                  "neighborhood": ["The Louvre is in", "Big Ben is in", "The Colosseum is in"]})
REQUEST = EditRequest(FACT, "Rome")


def _weights(lm) -> list[torch.Tensor]:
    return [p.detach().clone() for p in lm.model.parameters()]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_each_predictor_gives_one_finite_score_per_layer(family):
    lm = tiny.lm(family)
    before = _weights(lm)
    for scores in (gradient_scores(lm, REQUEST), rome_reach_scores(lm, REQUEST)):
        assert scores.layers == tuple(range(lm.num_layers))
        for name, values in scores.scores.items():
            assert len(values) == lm.num_layers, name
            assert all(math.isfinite(v) for v in values), name
        assert scores.best(next(iter(scores.scores))) in scores.layers
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(lm)))  # no weight changed
    assert all(p.grad is None for p in lm.model.parameters())  # and no parameter got a gradient


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_gradient_equals_finite_difference(family):
    lm = tiny.lm(family)
    grads, _ = target_gradients(lm, REQUEST, layers=[0, 2])  # the last layer: 0 (its key position is not read later)
    eps = 1e-2
    with torch.no_grad():
        for layer, g in grads.items():
            assert g.norm() > 0
            direction = g / g.norm()
            plus = target_nll(lm, REQUEST, {layer: eps * direction})
            minus = target_nll(lm, REQUEST, {layer: -eps * direction})
            fd = float(plus - minus) / (2 * eps)  # directional derivative along ĝ = ‖g‖
            assert fd == pytest.approx(float(g.norm()), rel=2e-2)
            other = torch.randn(g.shape, generator=torch.Generator().manual_seed(layer))
            other = other / other.norm()
            fd_other = float(target_nll(lm, REQUEST, {layer: eps * other})
                             - target_nll(lm, REQUEST, {layer: -eps * other})) / (2 * eps)
            assert fd_other == pytest.approx(float(g @ other), abs=2e-2 * float(g.norm()))
    scores = gradient_scores(lm, REQUEST, layers=[0, 2])
    assert scores.scores["grad_norm"] == pytest.approx([float(grads[l].norm()) for l in sorted(grads)])


def test_reach_ratio_is_one_for_the_edit_key_and_paraphrase_equal_to_prompt():
    torch.manual_seed(0)
    A = torch.randn(16, 16)
    C = A @ A.T / 16 + 0.1 * torch.eye(16)
    k = torch.randn(16)
    keys = torch.stack([k, 2 * k, torch.randn(16)])
    r = reach_ratio(C, k, keys)
    assert float(r[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(r[1]) == pytest.approx(2.0, abs=1e-6)
    lm = tiny.lm("llama")
    # a "paraphrase" that is the edit prompt itself has the edit key at its subject's last token: reach 1
    own = rome_reach_scores(lm, REQUEST, paraphrases=[FACT.prompt])
    assert own.scores["paraphrase"] == pytest.approx([1.0] * lm.num_layers, abs=1e-4)
    assert all(n <= -1.0 + 1e-4 for n in rome_reach_scores(lm, REQUEST, neighbours=[FACT.prompt]).scores["neighbour"])


def test_reach_scores_need_probes():
    lm = tiny.lm("gpt2")
    with pytest.raises(FactError, match="paraphrases and neighbourhood"):
        rome_reach_scores(lm, EditRequest(Fact("Eiffel Tower", FACT.prompt, "Paris"), "Rome"))


def test_restrict_to_band_ranks_outside_below_inside():
    out = restrict_to_band([0.1, 0.9, 0.5, 0.3, 2.0], [0, 1, 2, 3, 4], (1, 3))
    assert out[1:4] == [0.9, 0.5, 0.3]
    assert max(out[0], out[4]) < min(out[1:4])
    assert preferred_band([{"layer": 0, "S": 0.6}, {"layer": 1, "S": 0.8}, {"layer": 4, "S": 0.75},
                           {"layer": 8, "S": 0.5}]) == (1, 4)
    with pytest.raises(LoceditError, match="no calibration sweep rows"):
        preferred_band([{"layer": 0, "S": None}])


# a hand-made sweep: fact a's best layer is 2, fact b's is 0; predictor p ranks a's layers in S order
TABLE = [
    {"fact": "a", "layer": 0, "S": 0.2, "p": 0.0, "q": 3.0},
    {"fact": "a", "layer": 1, "S": 0.5, "p": 1.0, "q": 2.0},
    {"fact": "a", "layer": 2, "S": 0.9, "p": 2.0, "q": 1.0},
    {"fact": "a", "layer": 5, "S": 0.1, "p": -1.0, "q": 0.0},
    {"fact": "b", "layer": 0, "S": 1.0, "p": 0.0, "q": 9.0},
    {"fact": "b", "layer": 1, "S": 0.7, "p": 5.0, "q": 1.0},
    {"fact": "b", "layer": 2, "S": 0.6, "p": 1.0, "q": 0.0},
    {"fact": "b", "layer": 5, "S": 0.4, "p": 2.0, "q": -1.0},
]


def test_fact_outcome_hits_within_tolerance():
    a = [r for r in TABLE if r["fact"] == "a"]
    b = [r for r in TABLE if r["fact"] == "b"]
    assert fact_outcome(a, "p") == {"best": 2, "predicted": 2, "hit": True, "hit_S": True, "regret": 0.0}
    out = fact_outcome(b, "p")  # picks layer 1, best is 0: a ±1 hit but not the best S
    assert (out["predicted"], out["hit"], out["hit_S"]) == (1, True, False)
    assert out["regret"] == pytest.approx(0.3)
    assert fact_outcome(b, "p", tolerance=0)["hit"] is False
    assert fact_outcome(a, DEPTH)["predicted"] == 0 and fact_outcome(a, DEPTH)["hit"] is False


def test_score_predictors_on_a_hand_made_table():
    res = score_predictors(TABLE, ["p", "q"])
    p, q, depth = (res["predictors"][k] for k in ("p", "q", DEPTH))
    assert res["facts"] == 2
    assert p["hit"]["mean"] == 1.0 and q["hit"]["mean"] == 0.5 and depth["hit"]["mean"] == 0.5
    # within-fact Spearman with S: p 1.0 on a, -0.4 on b; q (and depth, the same order) 0.2 on a, 1.0 on b
    assert p["spearman"]["mean"] == pytest.approx((1.0 - 0.4) / 2)
    assert q["spearman"]["mean"] == pytest.approx((0.2 + 1.0) / 2)
    assert depth["spearman"]["mean"] == pytest.approx((0.2 + 1.0) / 2)
    assert p["hit_minus_depth"]["mean"] == pytest.approx(0.5)
    # p's tops: a 0.9 (= best), b 0.7 (best 1.0); depth's: a 0.2, b 1.0 -> regrets 0.3/2 vs 0.7/2
    assert p["regret"]["mean"] == pytest.approx(0.15) and depth["regret"]["mean"] == pytest.approx(0.35)
    assert p["regret_minus_depth"]["mean"] == pytest.approx(-0.2)
    assert p["hit_S_minus_depth"]["mean"] == pytest.approx(0.0)
    assert q["spearman_minus_depth"]["mean"] == pytest.approx(0.0)

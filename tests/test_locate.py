"""locate on a tiny model: structure, ranking order, evidence, aggregation; and the pass planner."""

import random


import tiny
from locedit import Fact
from locedit.core.engine.run import plan_chunks
from locedit.localization.sites import SiteMap, locate, site_positions

FACT = Fact("Eiffel Tower", "The Eiffel Tower is located in the city of")


def test_locate_ranks_and_recommends():
    lm = tiny.lm("llama", tokenizer_kind="metaspace")
    sites = locate(lm, FACT)
    d = sites.to_dict()
    enc = lm.encode(FACT)
    assert [m["score"] for m in d["mlp_layers"]] == sorted((m["score"] for m in d["mlp_layers"]), reverse=True)
    assert [h["score"] for h in d["heads"]] == sorted((h["score"] for h in d["heads"]), reverse=True)
    assert sorted(m["layer"] for m in d["mlp_layers"]) == list(range(lm.num_layers))
    assert all(0 <= h["layer"] < lm.num_layers and 0 <= h["head"] < lm.num_heads for h in d["heads"])
    assert d["carrier"]["position"] in enc.positions.subject
    assert d["recommendation"]["rank_one"]["layers"] == [d["mlp_layers"][0]["layer"]]
    assert d["recommendation"]["head_edit"]["heads"][0] == [d["heads"][0]["layer"], d["heads"][0]["head"]]
    assert all(0 <= m["score"] <= 1 for m in d["mlp_layers"])
    # the best MLP layer's score is built from its evidence: knocking it out must hurt or restoring it help
    best = d["mlp_layers"][0]
    assert best["knockout_change"] < 0 or best["trace_effect"] > 0 or best["layer_knockout_change"] < 0
    assert sites.summary().count("\n") >= 4


def test_site_positions_leave_out_the_sink():
    lm = tiny.lm("llama", tokenizer_kind="bytelevel")  # no BOS: a subject at the start includes position 0
    enc = lm.encode(Fact("Eiffel Tower", "Eiffel Tower is in the city of"))
    assert enc.subject_start == 0 and 0 not in site_positions(enc)
    single = lm.encode(Fact("R", "R is"))
    assert site_positions(single) == list(single.positions.subject)


def test_aggregate_counts_top_sites():
    dicts = [{"fact": {"relation": r}, "mlp_layers": [{"layer": l}], "heads": [{"layer": 1, "head": h}]}
             for r, l, h in [("a", 2, 0), ("a", 2, 1), ("b", 3, 1)]]
    agg = SiteMap.aggregate(dicts)
    assert agg["top_mlp_layer"] == {"2": 2, "3": 1} and agg["top_head"] == {"L1H1": 2, "L1H0": 1}
    assert agg["by_relation"]["a"]["n"] == 2 and agg["by_relation"]["b"]["top_mlp_layer"] == {"3": 1}


def test_plan_chunks_cover_every_row_once():
    rng = random.Random(0)
    points = [(rng.randrange(12), rng.randrange(-1, 8)) for _ in range(700)]
    chunks = plan_chunks(points, 12, 8, 2, max_rows=100)
    members = sorted(i for rows, _, _ in chunks for i in rows)
    assert members == list(range(700))
    for rows, p0, l0 in chunks:
        assert len(rows) <= 100
        assert all(points[i][0] >= p0 and max(points[i][1], 0) >= l0 for i in rows)
    single = plan_chunks([(5, 3)] * 10, 12, 8)
    assert single == [(list(range(10)), 5, 3)]


def test_summary_names_a_measured_edit_layer(monkeypatch):
    from locedit.editing import measured

    lm = tiny.lm("llama", tokenizer_kind="metaspace")
    assert "measured" not in locate(lm, FACT).summary()
    monkeypatch.setitem(measured.MEASURED_LAYERS, lm.name, measured.MeasuredLayer(1, "subject_last", lm.num_layers, "t"))
    sites = locate(lm, FACT)
    assert "measured edit layer" in sites.summary() and str(sites.recommendation["rank_one"]["located_layers"]) in \
        sites.summary()

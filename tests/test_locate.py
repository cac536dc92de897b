"""locate on a tiny model: structure, ranking order, evidence, aggregation; and the pass planner."""

import contextlib
import random
import warnings

import numpy as np
import pytest
import torch

import tiny
from locedit import Fact, FactError, Head
from locedit.core.engine.run import plan_chunks
from locedit.localization.sites import SiteMap, locate, locate_batch, site_positions

FACT = Fact("Eiffel Tower", "The Eiffel Tower is located in the city of")


def test_locate_ranks_and_recommends():
    lm = tiny.lm("llama", tokenizer_kind="metaspace")
    sites = locate(lm, FACT)
    d = sites.to_dict()
    enc = lm.encode(FACT)
    assert sorted(m["layer"] for m in d["mlp_layers"]) == list(range(lm.num_layers))
    assert all(0 <= h["layer"] < lm.num_layers and 0 <= h["head"] < lm.num_heads for h in d["heads"])
    assert d["carrier"]["position"] in enc.positions.subject
    assert d["recommendation"]["rank_one"]["layers"] == [d["mlp_layers"][0]["layer"]]
    assert d["recommendation"]["head_edit"]["heads"][0] == [d["heads"][0]["layer"], d["heads"][0]["head"]]
    assert sites.recommendation["head_edit"]["heads"][0] == Head(d["heads"][0]["layer"], d["heads"][0]["head"])
    assert all(0 <= m["score"] <= 1 for m in d["mlp_layers"])
    # the ranking equals one recomputed from the recorded evidence with the documented weights
    ev = d["evidence"]
    cell = np.nan_to_num(np.clip(-np.array(ev["mlp_knockout_change"]), 0, None))
    trace = np.nan_to_num(np.clip(np.array(ev["mlp_trace_effect"]), 0, None))
    layer = np.nan_to_num(np.clip(-np.array(ev["mlp_layer_knockout_change"]), 0, None))
    score = 0.4 * cell / cell.max() + 0.3 * trace / trace.max() + 0.3 * layer[None, :] / layer.max()
    expected = sorted(range(lm.num_layers), key=lambda l: -score[:, l].max())
    assert [m["layer"] for m in d["mlp_layers"]] == expected
    assert [m["score"] for m in d["mlp_layers"]] == pytest.approx([score[:, l].max() for l in expected], abs=1e-9)
    assert sites.summary().count("\n") >= 4


def _candidates(lm, prompt_fact: Fact) -> list[Fact]:
    """The fact with each of a few given targets whose first tokens differ."""
    facts, seen = [], set()
    for word in (" Paris", " Rome", " London", " Apple", " city", " Music", " Tower", " capital", " language"):
        fact = Fact(prompt_fact.subject, prompt_fact.prompt, word)
        token = lm.encode(fact).target_id
        if token not in seen:
            seen.add(token)
            facts.append(fact)
    return facts


def _p(lm, enc, token_id: int) -> float:
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([enc.input_ids])).logits[0, -1].float().softmax(-1)[token_id].item()


def _most_hurt(lm, knockout_hook) -> tuple[Fact, float]:
    """The candidate target whose p drops most (relative) under `knockout_hook` (a context manager), and the drop."""
    facts = _candidates(lm, FACT)
    encs = [lm.encode(f) for f in facts]
    clean = [_p(lm, e, e.target_id) for e in encs]
    with knockout_hook():
        knocked = [_p(lm, e, e.target_id) for e in encs]
    changes = [(k - c) / c for c, k in zip(clean, knocked)]
    best = int(np.argmin(changes))
    return facts[best], changes[best]


def test_locate_finds_the_only_mlp_layer_left():
    """A hand-built case: every MLP but layer 2's is zeroed, and the target is the candidate that layer's MLP
    supports most; the top MLP layer must be 2 and the recommended rank-one edit layer with it."""
    lm = tiny.lm("llama", tokenizer_kind="metaspace")
    live = 2
    with torch.no_grad():
        for i, block in enumerate(lm.model.model.layers):
            if i != live:
                block.mlp.down_proj.weight.zero_()
    sites_at = site_positions(lm.encode(FACT))

    @contextlib.contextmanager
    def zero_live_mlp():
        def hook(module, args, output):
            output = output.clone()
            output[:, sites_at] = 0
            return output
        handle = lm.model.model.layers[live].mlp.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    fact, change = _most_hurt(lm, zero_live_mlp)
    assert change < -0.05  # the case is what it claims: this MLP matters for this target
    d = locate(lm, fact).to_dict()
    assert d["target_source"] == "given" and d["target_id"] == lm.encode(fact).target_id
    assert d["mlp_layers"][0]["layer"] == live
    assert d["recommendation"]["rank_one"]["located_layers"] == [live]
    others = [m for m in d["mlp_layers"] if m["layer"] != live]
    assert all(abs(m["layer_knockout_change"]) < 1e-3 and abs(m["knockout_change"]) < 1e-3 for m in others)


def test_locate_finds_the_only_head_left():
    """A hand-built case: every head's output projection is zeroed but L2H1's, and the target is the candidate
    that head supports most at the last position; the top extraction head must be L2H1."""
    lm = tiny.lm("llama", tokenizer_kind="metaspace")
    live, dim = Head(2, 1), lm.model.config.hidden_size // lm.num_heads
    with torch.no_grad():
        for i, block in enumerate(lm.model.model.layers):
            for h in range(lm.num_heads):
                if (i, h) != live:
                    block.self_attn.o_proj.weight[:, h * dim:(h + 1) * dim] = 0

    @contextlib.contextmanager
    def zero_live_head():
        def pre(module, args):
            x = args[0].clone()
            x[:, -1, live.head * dim:(live.head + 1) * dim] = 0
            return (x,)
        handle = lm.model.model.layers[live.layer].self_attn.o_proj.register_forward_pre_hook(pre)
        try:
            yield
        finally:
            handle.remove()

    fact, change = _most_hurt(lm, zero_live_head)
    assert change < -0.05
    sites = locate(lm, fact)
    d = sites.to_dict()
    assert Head(d["heads"][0]["layer"], d["heads"][0]["head"]) == live
    assert sites.recommendation["head_edit"]["heads"][0] == live and "L2H1" in sites.summary()
    assert all(abs(h["direct_logit"]) < 1e-4 and abs(h["output_knockout_change"]) < 1e-3 for h in d["heads"][1:])


def test_locate_refuses_a_prompt_that_ends_with_its_subject():
    lm = tiny.lm("llama", tokenizer_kind="metaspace")
    only_subject = Fact("Eiffel Tower", "The Eiffel Tower")
    with pytest.raises(FactError, match="no relation after the subject"):
        locate(lm, only_subject)
    with pytest.raises(FactError, match="no relation after the subject"):
        locate_batch(lm, [FACT, only_subject])


def test_locate_warns_of_a_long_prompt_and_shows_progress(monkeypatch, capsys):
    from locedit.localization import sites as sites_module

    lm = tiny.lm("llama", tokenizer_kind="metaspace")
    n = len(lm.encode(FACT))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet = locate(lm, FACT, progress=False)
    assert not [w for w in caught if "long prompt" in str(w.message)]
    assert "locate" not in capsys.readouterr().err
    monkeypatch.setattr(sites_module, "LONG_PROMPT", n - 1)
    with pytest.warns(UserWarning, match=f"long prompt \\({n} tokens.*intervention rows"):
        loud = locate(lm, FACT, progress=True)
    err = capsys.readouterr().err
    assert "locate" in err and "/7" in err  # the bar over locate's seven stages
    assert loud.to_dict()["mlp_layers"] == quiet.to_dict()["mlp_layers"]  # progress changes no number


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


def test_summary_names_a_calibrated_edit_layer(tmp_path, monkeypatch):
    from locedit.editing.calibration import Calibration, install_calibration
    from locedit.editing.fingerprint import weights_fingerprint

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    lm = tiny.lm("llama", tokenizer_kind="metaspace")
    assert "calibrated" not in locate(lm, FACT).summary()
    install_calibration(Calibration(weights_fingerprint(lm), {"name": lm.name},
                                    {"rome": {"layers": [1], "key_position": "subject_last"}}, evidence="t"))
    sites = locate(lm, FACT)
    assert "calibrated edit layer" in sites.summary() and str(sites.recommendation["rank_one"]["located_layers"]) in \
        sites.summary()

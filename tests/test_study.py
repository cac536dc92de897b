"""The study's library (locedit.study, locedit.core.statistics) on synthetic data (no model, fast)."""

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np

import locedit.study as study
from locedit.core.statistics import bootstrap_mean, hase_regression, paired_difference


def _items(n_per_relation=(10, 7, 3, 1)):
    return [{"id": f"{r}-{i}", "relation": f"rel{r}"} for r, n in enumerate(n_per_relation) for i in range(n)]


def test_split_is_deterministic_and_order_free():
    items = _items()
    a = study.split_facts(items)
    b = study.split_facts(list(reversed(items)))
    assert [x["id"] for x in a[0]] == [x["id"] for x in b[0]]
    assert [x["id"] for x in a[1]] == [x["id"] for x in b[1]]


def test_split_is_stratified_and_disjoint():
    items = _items()
    tuning, held = study.split_facts(items, tuning_fraction=0.3)
    assert not {x["id"] for x in tuning} & {x["id"] for x in held}
    assert len(tuning) + len(held) == len(items)
    t = Counter(x["relation"] for x in tuning)
    assert t == {"rel0": 3, "rel1": 2, "rel2": 1}   # round(0.3 n) per relation; a singleton relation stays held out
    # adding facts to one relation never moves another relation's facts
    more = items + [{"id": "0-extra", "relation": "rel0"}]
    t2, _ = study.split_facts(more)
    assert {x["id"] for x in t2 if x["relation"] != "rel0"} == {x["id"] for x in tuning if x["relation"] != "rel0"}


def test_stratified_subset_round_robin():
    chosen = study.stratified_subset(_items(), 6)
    assert Counter(x["relation"] for x in chosen) == {"rel0": 2, "rel1": 2, "rel2": 1, "rel3": 1}
    assert chosen == study.stratified_subset(_items(), 6)


def test_bootstrap_ci_contains_mean_and_handles_edge_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, 200)
    mean, lo, hi = bootstrap_mean(x)
    assert lo < mean < hi and lo < 1.0 < hi and hi - lo < 0.6
    assert bootstrap_mean([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert bootstrap_mean([1.0]) == (1.0, None, None)
    assert bootstrap_mean([None]) == (None, None, None)


def test_paired_difference_uses_only_shared_keys_and_detects_a_shift():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, 60)
    a = {i: float(base[i] + 0.5 + rng.normal(0, 0.05)) for i in range(60)}
    b = {i: float(base[i]) for i in range(60)}
    b[99] = 100.0          # unpaired: ignored
    a[5] = None            # missing on one side: ignored
    d = paired_difference(a, b)
    assert d["n"] == 59
    assert d["low"] > 0.4 and d["high"] < 0.6 and d["excludes_zero"]
    assert d["wins"] == 59 and d["losses"] == 0
    same = paired_difference(b, dict(b))
    assert same["mean"] == 0 and same["ties"] == 61 and not same["excludes_zero"]


def test_hase_regression_separates_layer_from_score():
    rng = np.random.default_rng(2)
    rows_layer, rows_score = [], []
    for f in range(20):
        for layer in range(0, 12, 3):
            score = float(rng.uniform())
            rows_layer.append({"fact": f, "layer": layer, "loc_score": score,
                               "S": 1.0 - layer / 12 + rng.normal(0, 0.01)})       # layer explains everything
            rows_score.append({"fact": f, "layer": layer, "loc_score": score,
                               "S": score + rng.normal(0, 0.01)})                   # the score does
    a = hase_regression(rows_layer)
    assert a["r2_layer"] > 0.95 and a["r2_increment"] < 0.01 and a["r2_score"] < 0.2
    b = hase_regression(rows_score)
    assert b["r2_layer"] < 0.2 and b["r2_increment"] > 0.8 and b["cv_r2_layer+score"] > 0.8
    assert hase_regression(rows_layer[:2]) == {"n": 2}


def test_random_policies_are_seeded_and_valid():
    assert study.random_layer("7", 30) == study.random_layer("7", 30)
    assert 0 <= study.random_layer("7", 30) < 30
    located = [[23, 4], [23, 5], [29, 1]]
    same = study.random_heads("7", located, 30, 9, same_layers=True)
    assert [h[0] for h in same] == [23, 23, 29]
    assert not {tuple(h) for h in same} & {tuple(h) for h in located}
    assert len({tuple(h) for h in same}) == 3
    anyl = study.random_heads("7", located, 30, 9, same_layers=False)
    assert anyl == study.random_heads("7", located, 30, 9, same_layers=False)
    assert len({tuple(h) for h in anyl}) == 3 and not {tuple(h) for h in anyl} & {tuple(h) for h in located}


def test_oracle_pick_and_fixed_choice():
    rows = [{"S": 0.5, "PS": 1, "ES": 1, "NS": 1, "EM": 0.1, "layer": 0},
            {"S": 0.8, "PS": 0.5, "ES": 1, "NS": 1, "EM": 0.2, "layer": 3},
            {"S": 0.8, "PS": 0.7, "ES": 1, "NS": 1, "EM": 0.0, "layer": 6}]
    assert study.best_row(rows)["layer"] == 6
    table_rows = {f"tuning|{f}|L{l}": {"phase": "tuning", "fact": f, "layer": l, "S": s, "ES": 1, "PS": s, "NS": 1}
                  for f in ("a", "b") for l, s in ((0, 0.2), (3, 0.9), (6, 0.5))}
    table_rows["tuning|zzz|L6"] = {"phase": "tuning", "fact": "zzz", "layer": 6, "S": 1.0, "ES": 1, "PS": 1, "NS": 1}
    fixed, table = study.choose_fixed(table_rows, {"a", "b"})   # a fact outside the tuning split never counts
    assert fixed == 3 and table[6]["n"] == 2
    tie = {f"tuning|{f}|L{l}": {"phase": "tuning", "fact": f, "layer": l, "S": 0.5, "ES": 1, "PS": 1, "NS": 1,
                                "EM": em, "PM": 0.0, "NM": 0.0}
           for f in ("a", "b") for l, em in ((0, 0.1), (5, 0.3))}
    assert study.choose_fixed(tie, {"a", "b"})[0] == 5     # equal S, PS, ES: the larger summed margin wins


def test_fixed_choice_uses_only_facts_swept_at_every_layer():
    # fact "c" was swept only at layer 6 (an interrupted sweep) where it scores 1.0: it must not pull layer 6 up
    rows = {f"tuning|{f}|L{l}": {"phase": "tuning", "fact": f, "layer": l, "S": s, "ES": 1, "PS": s, "NS": 1}
            for f in ("a", "b") for l, s in ((0, 0.2), (3, 0.6), (6, 0.5))}
    rows["tuning|c|L6"] = {"phase": "tuning", "fact": "c", "layer": 6, "S": 1.0, "ES": 1, "PS": 1, "NS": 1}
    fixed, table = study.choose_fixed(rows, {"a", "b", "c"})
    assert fixed == 3 and table[6]["n"] == 2


def test_fixed_rows_are_keyed_by_their_layer(tmp_path):
    # a fixed row made at an earlier tuning's layer (old key without the layer) is read under a key naming it, so a
    # re-tuned fixed layer re-runs the fact instead of reusing it
    old = {"key": "heldout|7|fixed", "phase": "heldout", "policy": "fixed", "fact": "7", "layer": 5, "S": 1.0}
    located = {"key": "heldout|7|located", "phase": "heldout", "policy": "located", "fact": "7", "layer": 0, "S": 0.5}
    (tmp_path / "rows-1.jsonl").write_text(json.dumps(old) + "\n" + json.dumps(located) + "\n")
    rows = study.read_rows(tmp_path)
    assert study.policy_key("7", "fixed", 5) in rows and study.policy_key("7", "fixed", 2) not in rows
    assert "heldout|7|located" in rows and study.policy_key("7", "located", 0) == "heldout|7|located"


def test_within_fact_correlation_compares_locate_score_with_depth():
    # fact a: S follows the score and falls with depth; fact b: S follows the score but rises with depth;
    # fact c: the same S at every layer (nothing to rank), counted apart
    rows = []
    for layer, score, s in ((0, 0.9, 1.0), (5, 0.5, 0.6), (10, 0.1, 0.2)):
        rows.append({"fact": "a", "layer": layer, "loc_score": score, "S": s})
    for layer, score, s in ((0, 0.1, 0.2), (5, 0.5, 0.6), (10, 0.9, 1.0)):
        rows.append({"fact": "b", "layer": layer, "loc_score": score, "S": s})
    for layer in (0, 5, 10):
        rows.append({"fact": "c", "layer": layer, "loc_score": 0.5 + layer / 100, "S": 0.5})
    w = study.within_fact_correlation(rows)
    assert (w["facts"], w["flat"], w["n"]) == (3, 1, 2)
    assert w["per_fact_score"] == {"a": 1.0, "b": 1.0}
    assert w["per_fact_depth"] == {"a": 1.0, "b": -1.0}
    assert w["score"]["mean"] == 1.0 and w["depth"]["mean"] == 0.0
    assert w["score_minus_depth"]["n"] == 2 and w["score_minus_depth"]["mean"] == 1.0


def test_sequential_chain_orders_known_facts_first_and_skips_probes():
    split = {"tuning": ["t1", "t2", "t3"], "held_out": ["h1", "h2", "h3", "h4"],
             "relation": {"t1": "a", "t2": "b", "t3": "a", "h1": "a", "h2": "b", "h3": "a", "h4": "b"}}
    extra = [{"id": f"u{i}", "relation": "a" if i % 2 else "b"} for i in range(5)]
    chain = study.sequential_chain(split, extra, 8, probes=["t2"])
    assert len(chain) == len(set(chain)) == 8
    assert set(chain[:4]) == {"h1", "h2", "h3", "h4"} and set(chain[4:6]) == {"t1", "t3"}
    assert "t2" not in chain and all(c.startswith("u") for c in chain[6:])
    assert study.sequential_chain(split, extra, 3, probes=[]) == chain[:3]  # a shorter chain is a prefix


def test_latest_chains_keeps_each_methods_longest_chain():
    rows = [{"policy": "memit", "n_edits": n, "S": 0.9} for n in (1, 5, 10)]  # an older chain without a name
    rows += [{"policy": "memit", "chain": "200@L1", "n_edits": n, "S": 0.5} for n in (20, 1, 200)]
    rows += [{"policy": "rome", "chain": "200@L1", "n_edits": n, "S": 0.7} for n in (1, 20)]
    out = study.latest_chains(rows)
    assert [p["n_edits"] for p in out["memit"]] == [1, 20, 200] and {p["S"] for p in out["memit"]} == {0.5}
    assert [p["n_edits"] for p in out["rome"]] == [1, 20]
    assert study.sequential_key("200@L1", "rome", 20) != study.sequential_key("10@L5", "rome", 20)


def test_chain_complete_needs_a_checkpoint_that_attempted_every_fact():
    rows = [{"phase": "sequential", "chain": "200@L1", "policy": "memit", "n_edits": 197, "attempted": 200},
            {"phase": "sequential", "chain": "200@L1", "policy": "rome", "n_edits": 120, "attempted": 123}]
    assert study.chain_complete(rows, "200@L1", "memit", 200)  # 3 edits skipped, still the whole chain
    assert not study.chain_complete(rows, "200@L1", "rome", 200)  # cut off at 123 facts
    assert not study.chain_complete(rows, "300@L1", "memit", 300)


def test_read_rows_keeps_the_newer_row_of_a_rerun(tmp_path):
    key = "sequential|200@L1|rome|20"
    (tmp_path / "rows-9.jsonl").write_text(json.dumps({"key": key, "S": 0.2, "t": 2.0}) + "\n")
    (tmp_path / "rows-10.jsonl").write_text(json.dumps({"key": key, "S": 0.1, "t": 1.0}) + "\nnot json\n")
    assert study.read_rows(tmp_path)[key]["S"] == 0.2


def test_paired_by_layer_band_splits_by_the_first_policys_layer():
    a = {"f1": {"layer": 1, "S": 1.0}, "f2": {"layer": 3, "S": 0.5}, "f3": {"layer": 4, "S": 0.7},
         "f4": {"layer": 9, "S": 0.0}, "f5": {"layer": 2, "S": 0.9}}
    b = {f: {"layer": 1, "S": 0.8} for f in ("f1", "f2", "f3", "f4")}  # f5 has no fixed row
    out = study.paired_by_layer_band(a, b, ((1, 1), (2, 4), (5, 29)))
    assert list(out) == ["1", "2–4", "5–29"]
    assert out["1"]["n"] == 1 and abs(out["1"]["mean"] - 0.2) < 1e-9
    assert out["2–4"]["n"] == 2 and abs(out["2–4"]["mean"] - (-0.2)) < 1e-9 and out["2–4"]["losses"] == 2
    assert out["5–29"]["n"] == 1 and out["5–29"]["mean"] == -0.8


def _sitemap(mlp_layers, located=(3,), heads=((5, 1), (6, 2))):
    return SimpleNamespace(mlp_layers=[{"layer": l, "score": s} for l, s in mlp_layers],
                           recommendation={"rank_one": {"layers": [9], "located_layers": list(located)},
                                           "head_edit": {"heads": [list(h) for h in heads]}},
                           heads=[{"layer": 5, "head": 1, "score": 0.7}])


def test_policy_sites_follow_the_sitemap_and_the_model_size():
    sm = _sitemap([(0, 0.9), (3, 0.5), (7, 0.1)], located=(0,))
    plan = study.policies.policy_sites(sm, "f1", fixed_layer=2, num_layers=12)
    assert plan["located"] == (0, "carrier") and plan["located_subject_last"] == (0, "subject_last")
    assert plan["located_no_l0"] == (3, "carrier")        # the best-ranked MLP layer other than 0
    assert plan["fixed"] == (2, "subject_last") and plan["fixed_carrier"] == (2, "carrier")
    assert plan["random"] == (study.random_layer("f1", 12), "carrier") and 0 <= plan["random"][0] < 12
    assert study.policies.loc_features(sm, 3)["loc_rank"] == 1 and study.policies.loc_features(sm, 5)["loc_rank"] is None
    heads = study.policies.head_sites(sm, "f1", num_layers=12, num_heads=4)
    assert heads["head_located"] == [[5, 1], [6, 2]] and [h[0] for h in heads["head_random_same_layers"]] == [5, 6]
    assert study.policies.head_scores(sm, heads["head_located"]) == [0.7, None]


def test_layer_bands_end_at_the_models_last_layer():
    assert study.layer_bands(30) == ((1, 1), (2, 4), (5, 29))
    assert study.layer_bands(12)[-1] == (5, 11)


def _heldout(fact, policy, layer, s):
    return {"key": study.policy_key(fact, policy, layer), "phase": "heldout", "policy": policy, "fact": fact,
            "relation": "r", "subject": fact, "layer": layer, "S": s, "ES": 1.0, "PS": s, "NS": s}


def test_summarize_pairs_policies_a_minus_b_and_bands_by_model_size():
    rows = {}
    for f, (s1, s6) in (("a", (0.9, 0.5)), ("b", (0.7, 0.3))):
        for l, v in ((1, s1), (6, s6)):
            rows[f"tuning|{f}|L{l}"] = {"key": f"tuning|{f}|L{l}", "phase": "tuning", "fact": f, "layer": l,
                                        "S": v, "ES": 1, "PS": v, "NS": 1}
    for i, f in enumerate(("h1", "h2", "h3")):
        for row in (_heldout(f, "located_no_l0", 8 + i, 0.9), _heldout(f, "fixed", 1, 0.6),
                    _heldout(f, "located", 0, 0.4), _heldout(f, "fixed", 6, 0.0)):  # fixed at an untuned layer
            rows[row["key"]] = row
    s = study.summarize(rows, {"argv": []}, ["a", "b"], ["h1", "h2", "h3"], num_layers=12)
    assert s["fixed_layer"] == 1 and s["policies"]["fixed"]["n"] == 3
    d = s["paired"]["located - fixed"]["S"]
    assert d["n"] == 3 and abs(d["mean"] - (0.4 - 0.6)) < 1e-9 and d["losses"] == 3 and d["wins"] == 0
    assert list(s["no_l0_minus_fixed_by_band"]) == ["5–11"]
    band = s["no_l0_minus_fixed_by_band"]["5–11"]
    assert band["n"] == 3 and abs(band["mean"] - 0.3) < 1e-9
    assert study.summarize(rows, {"argv": []}, ["a", "b"], ["h1"], num_layers=12, fixed_layer=6)[
        "paired"]["located - fixed"]["S"]["mean"] == 0.4                   # the override picks the layer-6 rows
    md = study.markdown(s)
    assert md.startswith("# Does localization inform editing?") and "| located - fixed | 3 |" in md


def test_probe_inputs_and_edit_metrics_of_two_snapshots():
    from locedit import Fact
    from locedit.study.measure import edit_metrics, probe_inputs

    fact = Fact("Eiffel Tower", "The Eiffel Tower is in", "Paris",
                meta={"target_new": "Rome ", "paraphrases": ["Where is the Eiffel Tower? In"],
                      "neighborhood": ["The Louvre is in", "Notre-Dame is in"]})
    inputs = probe_inputs(fact)
    assert (inputs.new, inputs.true) == (" Rome", " Paris") and len(inputs.prompts) == 2
    assert inputs.prefixed == ["The Eiffel Tower is in Rome. The Louvre is in",
                               "The Eiffel Tower is in Rome. Notre-Dame is in"]
    # probs: (new, true) for the prompt, the paraphrase, then each neighbour
    before = {"probs": [0.1, 0.6, 0.1, 0.5, 0.1, 0.7, 0.2, 0.6], "k": 2, "nt": None, "GE": None, "ppl": 10.0,
              "gens": [" Paris, France"]}
    after = {"probs": [0.8, 0.1, 0.3, 0.4, 0.1, 0.7, 0.5, 0.3], "k": 2, "nt": None, "GE": None, "ppl": 11.0,
             "gens": [" Rome, Italy"]}
    m = edit_metrics(fact, before, after)
    assert (m["ES"], m["PS"], m["NS"], m["NS_before"]) == (1.0, 0.0, 0.5, 1.0)
    assert m["S"] == 0.0 and abs(m["EM"] - 0.7) < 1e-12 and abs(m["PM"] + 0.1) < 1e-12
    assert abs(m["rewrite_score"] - (0.8 - 0.1) / 0.9) < 1e-12 and abs(m["ppl_drift"] - 0.1) < 1e-12
    assert m["gen_efficacy"] == 1.0 and m["NKL"] is None and m["GE_delta"] is None

"""Ripple probes (RippleEdits): the knowledge table and its rules (malformed rows -> one DatasetError), probe building
(logical generalisation, composition, relation specificity, what is skipped), user probes, scoring against an
independent `target_probs`, the hooks into verify (reported, not in the pass rule), evaluate and the report, and one
real edit on SmolLM2."""

import json

import pytest

import tiny
from locedit import Fact
from locedit.errors import DatasetError, LoceditError
from locedit.verification import metrics as M
from locedit.verification import ripple as R
from locedit.verification.evaluate import METRICS, summarize
from test_verify import ToyEdit, true_fact

RULES = [R.Rule("P131", "P17", "logical_generalisation", "{} is located in the country of", "P17"),
         R.Rule("P17", "P37", "composition", "The official language of the country where {} is located is"),
         R.Rule("P17", "P36", "composition", "The capital of the country where {} is located is")]
ROWS = [("Eiffel Tower", "P131", "Paris", "The Eiffel Tower is located in the city of"),
        ("Eiffel Tower", "P17", "France", "The Eiffel Tower is located in the country of"),
        ("Eiffel Tower", "P127", "City of Paris", "The Eiffel Tower is owned by the"),
        ("Eiffel Tower", "P138", "Gustave Eiffel", "The Eiffel Tower is named after"),
        ("Beats Music", "P127", "Apple", "Beats Music is owned by"),
        ("Instagram", "P127", "Meta", "Instagram is owned by"),
        ("Paris", "P17", "France", "Paris is located in the country of"),
        ("Rome", "P17", "Italy", "Rome is located in the country of"),
        ("Lyon", "P17", "France", "Lyon is located in the country of"),
        ("France", "P36", "Paris", "The capital of France is"),
        ("Italy", "P36", "Rome", "The capital of Italy is"),
        ("France", "P37", "French", "The official language of France is"),
        ("Italy", "P37", "Italian", "The official language of Italy is")]


def table(rows=ROWS, rules=RULES):
    return R.KnowledgeTable([R.TableFact(*r, source=f"t:{i}") for i, r in enumerate(rows)], rules,
                            {"P17": "country", "P36": "capital"})


def eiffel(subject="Eiffel Tower", relation=None):
    return Fact(subject, "The Eiffel Tower is located in the city of", " Paris", relation)


# --- reading the table -----------------------------------------------------------------------------------------------
def write_table(tmp_path, lines, rules=None):
    path = tmp_path / "table.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rules_path = tmp_path / "rules.json"
    rules_path.write_text(json.dumps(rules if rules is not None else
                                     {"rules": [vars(r) for r in RULES], "relations": {"P17": "country"}}))
    return path, rules_path


GOOD = json.dumps({"subject": "Rome", "relation": "P17", "object": "Italy", "prompt": "Rome is in"})


def test_read_table_round_trip(tmp_path):
    t = R.read_table(*write_table(tmp_path, [GOOD, "", GOOD.replace("Rome", "Milan")]))
    assert [f.subject for f in t.facts] == ["Rome", "Milan"]
    assert t.get("rome", "P17").object == "Italy" and t.get("Rome", "P36") is None
    assert t.facts[1].source == "table.jsonl:3" and t.name("P17") == "country" and t.name("P99") == "P99"
    assert len(t.rules) == 3 and t.rules[0].implies == "P17" and t.rules[1].implies is None


@pytest.mark.parametrize("line, words", [
    ('{"subject": "Rome", "relation": "P17", "prompt": "Rome is in"}', ["line 2", "'object'"]),
    ('{"subject": "Rome", "relation": "P17", "object": "  ", "prompt": "Rome is in"}', ["line 2", "'object'"]),
    ('{"subject": "Rome", "relation": 17, "object": "Italy", "prompt": "Rome is in"}', ["line 2", "'relation'"]),
    ('{"subject": "Rome", "relation": "P17", "object": "Italy"', ["line 2", "not valid JSON"]),
    ('["Rome", "P17", "Italy"]', ["line 2", "JSON object"]),
    (GOOD.replace("Italy", "Lazio"), ["two objects", "'Italy'", "'Lazio'"]),
])
def test_malformed_table_row_is_one_dataset_error(tmp_path, line, words):
    with pytest.raises(DatasetError) as e:
        R.read_table(*write_table(tmp_path, [GOOD, line]))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_missing_or_empty_table_and_bad_rules(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        R.read_table(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="no rows"):
        R.read_table(*write_table(tmp_path, [""]))
    bad_rules = [({"rules": [{"first": "P1", "then": "P2", "kind": "guess", "template": "{} is"}]}, "kind 'guess'"),
                 ({"rules": [{"first": "P1", "then": "P2", "kind": "composition", "template": "no slot"}]},
                  "exactly once"),
                 ({"rules": [{"then": "P2", "kind": "composition", "template": "{} is"}]}, "'first'"),
                 ({"rules": "P1"}, "list 'rules'")]
    for rules, words in bad_rules:
        with pytest.raises(DatasetError, match=words):
            R.read_table(*write_table(tmp_path, [GOOD], rules))


def test_packaged_table_and_rules():
    t = R.default_table()
    assert len(t.facts) > 1000
    assert all(r.first in t.names and r.then in t.names for r in t.rules)
    for r in t.rules:
        assert r.kind in R.RULE_KINDS and r.template.count("{}") == 1
    # the README's demo edit gets its logical-generalisation probe from the table
    fact = Fact("The Eiffel Tower", "The Eiffel Tower is located in the city of", " Paris")
    probes, info = R.probes_for(fact, " Rome")
    assert info["relation"] == "P131"
    lg = [p for p in probes if p.kind == "logical_generalisation"]
    assert [(p.prompt, p.expected, p.alternatives) for p in lg] == [
        ("The Eiffel Tower is located in the country of", "Italy", ("France",))]


# --- building probes -------------------------------------------------------------------------------------------------
def test_probes_for_an_edit_of_the_city():
    probes, info = R.probes_for(eiffel(), " Rome", table())
    assert info["relation"] == "P131"
    by_kind = {k: [p for p in probes if p.kind == k] for k in R.KINDS}
    [lg] = by_kind["logical_generalisation"]
    assert (lg.prompt, lg.expected, lg.alternatives) == ("The Eiffel Tower is located in the country of", "Italy",
                                                         ("France",))
    assert lg.because == "Rome P17 Italy (before: Paris P17 France)"
    assert lg.second_hop == "Rome is located in the country of"
    assert not by_kind["composition"] and not by_kind["given"]  # no P131 composition rule here
    # relation specificity: the subject's other relations, not the edited one nor the one it implies (P17)
    rs = by_kind["relation_specificity"]
    assert [(p.prompt, p.expected) for p in rs] == [("The Eiffel Tower is owned by the", "City of Paris")]
    assert rs[0].alternatives == ("Apple", "Meta")  # the relation's other objects; P138 has no other: skipped
    assert info["skipped"] == {"relation with one object in the table": 1}


def test_probes_for_an_edit_of_the_country():
    COUNTRY = Fact("Eiffel Tower", "The Eiffel Tower is located in the country of", " France")  # relation from table
    probes, info = R.probes_for(COUNTRY, " Italy", table())
    comp = {p.prompt: (p.expected, p.alternatives) for p in probes if p.kind == "composition"}
    assert comp == {"The official language of the country where the Eiffel Tower is located is": ("Italian",
                                                                                                   ("French",)),
                    "The capital of the country where the Eiffel Tower is located is": ("Rome", ("Paris",))}
    # P131 implies P17: an edit of the country leaves the city undetermined, so it is no specificity probe
    assert [p.expected for p in probes if p.kind == "relation_specificity"] == ["City of Paris"]
    assert R.probes_for(COUNTRY, " Italy", table(), max_probes=1)[0][0].kind == "composition"
    assert len([p for p in R.probes_for(COUNTRY, " Italy", table(), max_probes=1)[0]
                if p.kind == "composition"]) == 1


def test_probes_skip_same_answers_and_unknown_objects():
    probes, info = R.probes_for(eiffel(), " Lyon", table())  # Lyon and Paris are both in France
    assert not [p for p in probes if p.kind == "logical_generalisation"]
    assert info["skipped"] == {"same answer before and after": 1, "relation with one object in the table": 1}
    probes, info = R.probes_for(eiffel(), " Berlin", table())  # Berlin is not in the table
    assert not [p for p in probes if p.kind != "relation_specificity"]
    assert info["skipped"]["new object has no country in the table"] == 1


def test_edited_relation_from_the_fact_or_the_table():
    t = table()
    assert R.edited_relation(t, eiffel()) == "P131"                    # (subject, ?, Paris) in the table
    assert R.edited_relation(t, eiffel(relation="P17")) == "P17"       # a relation id the table knows
    assert R.edited_relation(t, eiffel(relation="landmark_city")) == "P131"
    assert R.edited_relation(t, Fact("Big Ben", "Big Ben is in", " London")) is None
    probes, info = R.probes_for(Fact("Big Ben", "Big Ben is in", " London"), " Rome", t)
    assert probes == [] and "edited fact not in the knowledge table" in info["skipped"]


def test_subject_phrase_and_fill():
    assert R.subject_phrase(eiffel()) == "the Eiffel Tower"
    assert R.subject_phrase(Fact("Eiffel Tower", "Eiffel Tower is in", " Paris")) == "Eiffel Tower"
    assert R.subject_phrase(Fact("Eiffel Tower", "The Eiffel Tower is in", " Paris")) == "the Eiffel Tower"
    assert R.subject_phrase(Fact("Louvre", "Tourists who visit the Louvre go to", " Paris")) == "the Louvre"
    assert R.fill("{} is located in", "the Eiffel Tower") == "The Eiffel Tower is located in"
    assert R.fill("The language where {} is", "The Eiffel Tower") == "The language where the Eiffel Tower is"
    assert R.subject_key(" The  Eiffel Tower") == R.subject_key("eiffel tower") == "eiffel tower"


def test_given_probes():
    got = R.given_probes([("Rome is in", " Italy"), ("Rome is in", "Italy", "France"),
                          ("Rome is in", "Italy", ["France", "Spain"]), R.RippleProbe("composition", "p", "x")])
    assert [(p.kind, p.expected, p.alternatives) for p in got] == [
        ("given", "Italy", ()), ("given", "Italy", ("France",)), ("given", "Italy", ("France", "Spain")),
        ("composition", "x", ())]
    for bad in (["Rome is in"], [("Rome is in",)], [("Rome is in", "")], [("p", "x", [""])], [("p", 3)]):
        with pytest.raises(LoceditError, match="ripple probe"):
            R.given_probes(bad)
    assert R.verify_probes([eiffel()], [" Rome"], False) == ([], {})


# --- scoring ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_models():
    return tiny.lm("llama", "metaspace", seed=0), tiny.lm("llama", "metaspace", seed=1)


def test_score_against_target_probs(two_models):
    lm, _ = two_models
    probes = [R.RippleProbe("composition", "The capital of Italy is", "Rome", ("Paris", "London")),
              R.RippleProbe("relation_specificity", "Big Ben is in", "London", ("Paris",))]
    got = R.score(lm, probes)
    for p, g in zip(probes, got):
        ref = M.target_probs(lm, [(p.prompt, " " + t) for t in (p.expected, *p.alternatives)])
        assert g["p_expected"] == pytest.approx(float(ref[0]), rel=1e-5)
        assert g["p_alternative"] == pytest.approx(float(ref[1:].max()), rel=1e-5)
        assert g["best_alternative"] == p.alternatives[int(ref[1:].argmax())]
        assert g["success"] == bool(ref[0] > ref[1:].max())


def test_measure_before_and_after_and_the_model_alternative(two_models):
    a, b = two_models
    probes = [R.RippleProbe("logical_generalisation", "The capital of Italy is", "Rome", ("Paris",),
                            second_hop="The Colosseum is in"),
              R.RippleProbe("given", "The Colosseum is in", "Rome")]
    d = R.measure(a, b, probes, info={"relation": "P131"})
    hop = R.score(a, [R.RippleProbe("x", "The Colosseum is in", "Rome", ("Paris",))])[0]["success"]
    assert d["probes"][0]["second_hop_known"] == hop and d["probes"][1]["second_hop_known"] is None
    assert d["rates_second_hop_known"]["logical_generalisation"] == (
        float(d["probes"][0]["success_after"]) if hop else None)
    top = a.predict(Fact("The Colosseum", "The Colosseum is in"), k=5)
    first = M.target_ids(a, "The Colosseum is in", " Rome")[0]
    want = next(t.token.strip() for t in top if t.token_id != first and t.token.strip())
    assert d["probes"][1]["alternatives"] == [want]   # the unedited model's top-1 (not Rome's first token)
    resolved = [probes[0], R.RippleProbe("given", "The Colosseum is in", "Rome", (want,))]
    for when, lm in (("before", a), ("after", b)):
        ref = R.score(lm, resolved)
        assert [p[f"success_{when}"] for p in d["probes"]] == [r["success"] for r in ref]
        assert [p[f"p_expected_{when}"] for p in d["probes"]] == pytest.approx([r["p_expected"] for r in ref])
        assert d["rates" if when == "after" else "rates_before"]["given"] == float(ref[1]["success"])
    assert d["counts"] == {"logical_generalisation": 1, "composition": 0, "relation_specificity": 0, "given": 1}
    assert d["rates"]["composition"] is None and d["in_rule"] is False and d["relation"] == "P131"
    assert "not part of the pass rule" in R.ripple_lines(d)[0]
    assert R.ripple_lines(None) == [] and R.ripple_html({"probes": []}) == []


# --- hooks -----------------------------------------------------------------------------------------------------------
def test_verify_reports_ripple_outside_the_pass_rule(two_models):
    from locedit.verification import verify
    from locedit.verification.report import verification_report

    lm = two_models[0]
    fact = true_fact(lm)
    edit = ToyEdit(lm, fact, " Rome", layer=3)
    probes = [("The capital of Italy is", "Rome", "Paris"), ("Big Ben is in", "London")]
    ver = verify(lm, edit, mechanism=False, ripple=probes)
    plain = verify(lm, edit, mechanism=False, ripple=False)
    assert not edit.is_applied
    assert plain.ripple is None and "ripple" not in plain.to_dict()
    d = ver.to_dict()
    assert d["ripple"]["counts"]["given"] == 2 and d["ripple"]["source"] == "given"
    assert ver.passed == plain.passed and ver.verdict == plain.verdict  # not part of the pass rule
    # the numbers are the edited and the unedited model's
    with edit.applied(lm):
        after = R.score(lm, [R.RippleProbe("given", *probes[0][:2], (probes[0][2],))])[0]
    assert d["ripple"]["probes"][0]["p_expected_after"] == pytest.approx(after["p_expected"], rel=1e-5)
    assert "ripple (before -> after): given" in ver.summary()
    assert "Ripple effects (RippleEdits)" in verification_report(d)
    # the default: the knowledge table's probes (none for this random model's fact)
    assert verify(lm, edit, mechanism=False).ripple is None


def test_evaluate_aggregates_ripple_rates():
    names = dict(METRICS)
    assert names["ripple_composition"] == ("ripple", "rates", "composition")
    results = [{"ripple": {"rates": {"composition": 1.0, "logical_generalisation": None},
                           "rates_before": {"composition": 0.0}}},
               {"ripple": {"rates": {"composition": 0.5, "logical_generalisation": 0.0},
                           "rates_before": {"composition": 0.5}}},
               {}]
    s = summarize(results)
    assert s["ripple_composition"]["mean"] == 0.75 and s["ripple_composition"]["n"] == 2
    assert s["ripple_logical_generalisation"]["n"] == 1 and s["ripple_composition_before"]["mean"] == 0.25
    assert "ripple_relation_specificity" not in s


# --- the real model --------------------------------------------------------------------------------------------------
def test_rome_edit_on_smollm2_reports_ripple(smollm2, eiffel):
    import locedit
    from locedit import EditRequest
    from locedit.verification import verify

    edit = locedit.edit(smollm2, EditRequest(eiffel, " Rome"))
    try:
        ver = verify(smollm2, edit, mechanism=False)
    finally:
        edit.revert()
    r = ver.to_dict()["ripple"]
    [lg] = [p for p in r["probes"] if p["kind"] == "logical_generalisation"]
    assert lg["prompt"] == "The Eiffel Tower is located in the country of" and lg["expected"] == "Italy"
    assert lg["success_before"] is False           # the unedited model prefers France
    assert lg["p_expected_after"] > lg["p_expected_before"]   # the edit moves the implied country towards Italy
    assert r["in_rule"] is False and 0.0 <= r["rates"]["logical_generalisation"] <= 1.0
    assert "ripple (before -> after)" in ver.summary()

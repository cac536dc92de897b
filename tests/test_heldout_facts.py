"""recipes/build_heldout_facts.py's pieces on synthetic records (no model), and the committed held-out file."""

import importlib.util
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from locedit.core.datasets import curated_facts, read_facts

ROOT = Path(__file__).resolve().parent.parent
_PATH = ROOT / "recipes" / "build_heldout_facts.py"
_spec = importlib.util.spec_from_file_location("build_heldout_facts", _PATH)
build = importlib.util.module_from_spec(_spec)
sys.modules["build_heldout_facts"] = build  # dataclasses look their module up while the file runs
_spec.loader.exec_module(build)
Record = build.Record

HELDOUT = ROOT / "data" / "facts" / "heldout" / "facts.jsonl"


def _pairs(sizes=(10, 7, 3, 1, 20)):
    return [(f"subject {r}-{i}", f"P{r}") for r, n in enumerate(sizes) for i in range(n)]


def test_split_is_stable_and_order_free():
    pairs = _pairs()
    a = build.split_of(pairs)
    b = build.split_of(list(reversed(pairs)))
    assert a == b
    assert set(a.values()) == {"tuning", "heldout"}


def test_split_is_stratified_by_relation():
    split = build.split_of(_pairs())
    tuning = Counter(rel for (_, rel), s in split.items() if s == "tuning")
    totals = Counter(rel for _, rel in split)
    for rel, n in totals.items():
        assert tuning[rel] == int(0.3 * n + 0.5), (rel, n, tuning[rel])


def test_split_of_a_relation_ignores_other_relations():
    base = build.split_of(_pairs((10, 7)))
    more = build.split_of(_pairs((10, 7)) + [(f"extra {i}", "P99") for i in range(13)])
    assert all(more[p] == s for p, s in base.items())


def _record(subject, relation, attribute, template="{} is in"):
    return Record("test", subject, subject, template, attribute, relation=relation)


def test_neighbours_share_relation_and_attribute_and_never_the_subject():
    me = _record("Lyon", "P17", "France")
    pool = [me, _record("Lyon", "P17", "France", "{} lies in"),  # the same subject in another row
            _record("Lyon Airport", "P17", "France"),  # contains the subject: a give-away
            _record("Nice", "P17", "France"), _record("Toulouse", "P17", "France"),
            _record("Metz", "P17", "France"), _record("Turin", "P17", "Italy"),
            _record("Brest", "P131", "France"), _record("Lille", "P17", "France")]
    known = {("Lille", "P17"), ("Metz", "P17")}
    got = build.pick_neighbours(me, pool, known, k=10)
    names = [r.subject for r in got]
    assert sorted(names) == ["Lille", "Metz", "Nice", "Toulouse"]
    assert set(names[:2]) == {"Lille", "Metz"}  # model-known neighbours come first
    assert [r.subject for r in build.pick_neighbours(me, pool, known, k=2)] == names[:2]
    pairs = build.neighbourhood_prompts(me, got, ["{} lies in", "{} is in"])
    assert [nb for _, nb in pairs] == got
    prompts = [p for p, _ in pairs]
    assert prompts and all("Lyon" not in p for p in prompts)
    assert prompts[:2] == [f"{names[0]} is in", f"{names[1]} lies in"]  # the fact's own (common) template first
    odd = _record("Lyon", "P17", "France", "{} was founded in 43 BC in")  # a prompt written for Lyon alone
    assert [p for p, _ in build.neighbourhood_prompts(odd, got[:2], ["{} lies in", "{} is in"])] == [
        f"{names[0]} lies in", f"{names[1]} is in"]


def test_match_template_takes_the_most_specific_one():
    templates = ["{} is in", "{} is located in", "{}, in"]
    assert build.match_template("Lyon is located in", templates) == ("{} is located in", "Lyon")
    assert build.match_template("Lyon, in", templates) == ("{}, in", "Lyon")
    assert build.match_template("Lyon lies in", templates) is None


def test_relations_spread_from_seeds_through_locality_prompts():
    seeds = {"{} is a citizen of": Counter({"P27": 3}), "{} is developed by": Counter({"P176": 1, "P178": 1})}
    records = [Record("cf", str(i), f"Person {i}", "{} holds a passport of", "France",
                      locality=f"Other {i} is a citizen of") for i in range(4)]
    records.append(Record("cf", "9", "Widget", "{} is developed by", "Sony", locality="Gadget, made by"))
    labels = build.infer_relations(records, seeds)
    assert labels["{} holds a passport of"] == "P27"
    assert "{} is developed by" not in labels  # an ambiguous seed names no relation
    build.assign_relations(records, labels)
    assert [r.relation for r in records] == ["P27"] * 4 + [None]


def test_new_target_is_another_attribute_with_another_first_token():
    first_tokens = {"France": 1, "French Guiana": 1, "Italy": 2, "Spain": 3}
    first, attributes = first_tokens.__getitem__, list(first_tokens)
    me = _record("Lyon", "P17", "France")
    picks = {build.pick_new_target(_record(f"city {i}", "P17", "France"), attributes, first) for i in range(40)}
    assert picks == {"Italy", "Spain"}
    assert build.pick_new_target(me, ["France", "French Guiana"], first) is None
    assert build.pick_new_target(me, attributes, first) == build.pick_new_target(me, attributes[::-1], first)
    relation = ["France"] * 3 + ["Italy"] * 3 + ["Spain"]  # Spain: a value only one record carries
    assert {build.pick_new_target(_record(f"city {i}", "P17", "France"), relation, first, min_count=3)
            for i in range(40)} == {"Italy"}


# --- the committed file --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def heldout_rows():
    if not HELDOUT.is_file():
        pytest.fail(f"{HELDOUT} is missing: run recipes/build_heldout_facts.py")
    return [json.loads(line) for line in HELDOUT.read_text(encoding="utf-8").splitlines()]


def test_committed_file_reads_unchanged(heldout_rows):
    ff = read_facts(HELDOUT)
    assert ff.format == "counterfact" and not ff.errors
    assert len(ff) == len(heldout_rows) >= 200
    for fact, row in zip(ff, heldout_rows):
        assert fact.relation == row["relation_id"]
        assert fact.meta["target_new"] and fact.meta["target_new"] != fact.target
        assert fact.meta["paraphrases"] and all(fact.subject in p for p in fact.meta["paraphrases"])


def test_committed_file_has_no_curated_subject(heldout_rows):
    curated = {f.subject.casefold() for f in curated_facts()}
    ours = {r["requested_rewrite"]["subject"].casefold() for r in heldout_rows}
    assert not curated & ours


def test_committed_split_is_the_hash_split(heldout_rows):
    pairs = [(r["requested_rewrite"]["subject"], r["relation_id"]) for r in heldout_rows]
    assert len(set(pairs)) == len(pairs)
    expected = build.split_of(pairs)
    assert [r["split"] for r in heldout_rows] == [expected[p] for p in pairs]
    assert 0.25 < sum(r["split"] == "tuning" for r in heldout_rows) / len(heldout_rows) < 0.35


def test_committed_neighbours_are_same_relation_same_attribute(heldout_rows):
    if not build.DEFAULT_DATA.is_dir():
        pytest.skip("the public source files (../shared/data) are not here")
    records, _, _ = build.candidates(build.DEFAULT_DATA)
    attributes = defaultdict(set)  # a (subject, relation) may have records in several source files
    for r in records:
        attributes[r.subject, r.relation].add(r.attribute)
    for r in heldout_rows:
        subject, relation = r["requested_rewrite"]["subject"], r["relation_id"]
        true = r["requested_rewrite"]["target_true"]["str"]
        assert true in attributes[subject, relation]
        assert len(r["neighborhood_prompts"]) == len(r["neighborhood_subjects"]) == len(r["neighborhood_known"])
        for prompt, nb in zip(r["neighborhood_prompts"], r["neighborhood_subjects"]):
            assert nb != subject and nb in prompt and subject not in prompt
            assert true in attributes[nb, relation]

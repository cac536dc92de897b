"""Dataset reading (known_1000, CounterFact, EasyEdit, curated), known-fact filtering and the resumable runner."""

import json

import numpy as np
import pytest
import torch

import tiny
from locedit import Fact
from locedit.core.datasets import curated_facts, curated_facts_path, known_facts, read_facts
from locedit.errors import DatasetError, FactError, LoceditError
from locedit.localization import runner
from locedit.localization.knockout import attention_knockout
from locedit.localization.runner import aggregate_series, resolve_analysis, run_dataset


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def messages(ff):
    return {e.id: e.message for e in ff.errors}


# --- known_1000 -------------------------------------------------------------------------------------------------------
KNOWN = [
    {"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica", "template": "{} is located in the continent",
     "prediction": " of Antarctica", "prompt": "Vinson Massif is located in the continent of", "relation_id": "P30"},
    {"known_id": 1, "subject": "Beats Music", "attribute": "Apple", "prompt": "Beats Music is owned by"},
    {"known_id": 2, "attribute": "Paris", "prompt": "The Louvre is in"},                               # no subject
    {"known_id": 3, "subject": "Big Ben", "attribute": "London", "prompt": "The clock tower is in"},   # not in prompt
    {"known_id": 4, "subject": "Rome", "attribute": 7, "prompt": "Rome is the capital of"},            # wrong type
    {"known_id": 5, "subject": "Rome", "attribute": "Italy", "prompt": ""},                            # empty prompt
    {"known_id": 6, "subject": ["Rome"], "attribute": "Italy", "prompt": "Rome is in"},                # wrong type
]


def test_known_1000(tmp_path):
    ff = read_facts(write_json(tmp_path / "known_1000.json", KNOWN))
    assert ff.format == "known"
    assert [f.meta["id"] for f in ff.facts] == ["0", "1"]
    first = ff.facts[0]
    assert (first.subject, first.prompt, first.target, first.relation) == (
        "Vinson Massif", "Vinson Massif is located in the continent of", "Antarctica", "P30")
    assert first.meta == {"id": "0", "target_new": None, "paraphrases": [], "neighborhood": [],
                          "source_format": "known"}
    assert ff.facts[1].relation is None
    msg = messages(ff)
    assert set(msg) == {"2", "3", "4", "5", "6"}
    assert "missing field 'subject'" in msg["2"]
    assert "does not occur in prompt" in msg["3"]
    assert "'attribute' must be a string" in msg["4"] and "int" in msg["4"]
    assert "'prompt' is empty" in msg["5"]
    assert "'subject' must be a string" in msg["6"]
    assert [e.index for e in ff.errors] == [2, 3, 4, 5, 6]
    assert all(e.line is None for e in ff.errors)
    assert "row 3 (id 3)" in str(ff.errors[1])


# --- CounterFact ------------------------------------------------------------------------------------------------------
def cf_row(case_id, subject, prompt, true, new, **extra):
    return {"case_id": case_id, "pararel_idx": 1,
            "requested_rewrite": {"prompt": prompt, "relation_id": "P17", "subject": subject,
                                  "target_true": {"str": true, "id": "Q1"}, "target_new": {"str": new, "id": "Q2"}},
            "paraphrase_prompts": [f"Some text. {subject} is in"], "neighborhood_prompts": ["Rome is in"],
            "attribute_prompts": [], "generation_prompts": [f"{subject} is"], **extra}


def counterfact_rows():
    bad_type = cf_row(12, "Paris", "{} is the capital of", "France", "Spain")
    bad_type["requested_rewrite"]["target_true"] = {"str": 5}
    missing = cf_row(13, "Oslo", "{} is the capital of", "Norway", "Spain")
    del missing["requested_rewrite"]["subject"]
    return [
        cf_row(10, "Danielle Darrieux", "The mother tongue of {} is", "French", "English"),
        cf_row(11, "Toko Yasuda", "{}, who plays the", "guitar", "piano"),
        bad_type,
        missing,
        '{"case_id": 14, "requested_rewrite": {"prompt": "{} is',                 # truncated line
        [1, 2],                                                                   # not an object
        cf_row(10, "Berlin", "{} is the capital of", "Germany", "Spain"),        # duplicate id
        cf_row(15, "Madrid", "The city of Lisbon is in", "Spain", "Italy"),      # subject not in prompt
    ]


def test_counterfact_jsonl(tmp_path):
    ff = read_facts(write_jsonl(tmp_path / "cf.jsonl", counterfact_rows()))
    assert ff.format == "counterfact"
    assert [f.meta["id"] for f in ff.facts] == ["10", "11"]
    fact = ff.facts[0]
    assert fact.prompt == "The mother tongue of Danielle Darrieux is"
    assert (fact.target, fact.relation) == ("French", "P17")
    assert fact.meta["target_new"] == "English"
    assert fact.meta["paraphrases"] == ["Some text. Danielle Darrieux is in"]
    assert fact.meta["neighborhood"] == ["Rome is in"]
    assert fact.meta["source_format"] == "counterfact"
    by_line = {e.line: e for e in ff.errors}
    assert set(by_line) == {3, 4, 5, 6, 7, 8}
    assert "target_true' must be a string" in by_line[3].message
    assert "missing field 'requested_rewrite.subject'" in by_line[4].message
    assert "not valid JSON" in by_line[5].message
    assert "must be a JSON object" in by_line[6].message
    assert "duplicate id '10'" in by_line[7].message
    assert "does not occur in prompt" in by_line[8].message and by_line[8].id == "15"


def test_counterfact_json_list_and_no_case_id(tmp_path):
    rows = [cf_row(None, "Toko Yasuda", "{}, who plays the", "guitar", "piano"),
            cf_row(None, "Danielle Darrieux", "The mother tongue of {} is", "French", "English")]
    for row in rows:
        del row["case_id"]
    ff = read_facts(write_json(tmp_path / "cf.json", rows))
    assert ff.format == "counterfact" and not ff.errors
    assert [f.meta["id"] for f in ff.facts] == ["0", "1"]


# --- EasyEdit ---------------------------------------------------------------------------------------------------------
EASYEDIT = [
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "ground_truth": ["French", "French language"], "target_new": "English",
     "rephrase_prompt": "Danielle Darrieux speaks", "locality_prompt": "The mother tongue of Léon Blum is",
     "locality_ground_truth": ["French"]},
    {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "ground_truth": "guitar", "target_new": "piano"},
    {"prompt": "Rome is the capital of", "subject": "Rome", "target_new": "France"},                 # no truth
    {"prompt": "Rome is the capital of", "subject": "Rome", "ground_truth": [], "target_new": "x"},  # empty list
    {"prompt": "Oslo is the capital of", "subject": "Bergen", "ground_truth": "Norway", "target_new": "x"},
    {"prompt": 3, "subject": "Rome", "ground_truth": "Italy", "target_new": "x"},
]


def test_easyedit(tmp_path):
    ff = read_facts(write_json(tmp_path / "easyedit.json", EASYEDIT))
    assert ff.format == "easyedit"
    assert [f.meta["id"] for f in ff.facts] == ["0", "1"]
    first, second = ff.facts
    assert first.target == "French" and second.target == "guitar"
    assert first.meta["target_new"] == "English"
    assert first.meta["paraphrases"] == ["Danielle Darrieux speaks"]
    assert first.meta["neighborhood"] == ["The mother tongue of Léon Blum is"]
    assert second.meta["paraphrases"] == [] and second.meta["source_format"] == "easyedit"
    msg = messages(ff)
    assert "missing field 'ground_truth'" in msg["2"]
    assert "'ground_truth' is an empty list" in msg["3"]
    assert "does not occur in prompt" in msg["4"]
    assert "'prompt' must be a string" in msg["5"]


def test_explicit_format_and_jsonl_easyedit(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", EASYEDIT[:2])
    assert len(read_facts(path, format="easyedit")) == 2
    forced = read_facts(path, format="known")
    assert not forced.facts and all("missing field 'attribute'" in e.message for e in forced.errors)
    with pytest.raises(DatasetError, match="unknown dataset format 'wikidata'"):
        read_facts(path, format="wikidata")


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    ("this is not json\nnor this\n", "neither a JSON list nor JSON lines"),
    ('[{"question": "q", "answer": "a"}]', "unknown dataset format"),
    ("", "is empty"),
    ('"a string"', "JSON str"),
])
def test_unreadable_files_raise(tmp_path, content, match):
    path = tmp_path / "data.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError, match=match) as info:
        read_facts(path)
    assert "data.json" in str(info.value)


# --- plain rows: subject, prompt[, target][, target_new] (JSONL, JSON, CSV) ------------------------------------------
PLAIN = [
    {"subject": "Rome", "prompt": "Rome is the capital of"},
    {"subject": "Paris", "prompt": "{} is in", "target": "France", "target_new": "Italy", "relation": "P17",
     "paraphrases": ["Paris lies in"], "neighborhood": ["Lyon is in"]},
    {"prompt": "Oslo is in", "target": "Norway"},                                 # no subject
    {"subject": "Bergen"},                                                        # no prompt
    {"id": "x", "subject": "Madrid", "prompt": "Lisbon is in"},                   # subject not in prompt
]


@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_plain_rows(tmp_path, kind):
    path = (write_jsonl if kind == "jsonl" else write_json)(tmp_path / f"plain.{kind}", PLAIN)
    ff = read_facts(path)
    assert ff.format == "plain"
    assert [(f.subject, f.prompt, f.target) for f in ff] == [
        ("Rome", "Rome is the capital of", None), ("Paris", "Paris is in", "France")]
    second = ff.facts[1]
    assert second.relation == "P17" and second.meta["target_new"] == "Italy"
    assert second.meta["paraphrases"] == ["Paris lies in"] and second.meta["neighborhood"] == ["Lyon is in"]
    assert ff.facts[0].meta == {"id": "0", "target_new": None, "paraphrases": [], "neighborhood": [],
                                "source_format": "plain"}
    errors = {e.index: str(e) for e in ff.errors}
    where = "line" if kind == "jsonl" else "row"
    assert errors[2] == f"{where} {3 if kind == 'jsonl' else 2} (id 2): missing field 'subject'"
    assert errors[3].endswith("missing field 'prompt'") and "(id 3)" in errors[3]
    assert "(id x)" in errors[4] and "does not occur in prompt" in errors[4]


def test_plain_csv(tmp_path):
    path = tmp_path / "facts.csv"
    path.write_text("subject,prompt,target,target_new\n"
                    "Rome,Rome is the capital of,,\n"
                    "Paris,\"Paris, the city, is in\",France,Italy\n"
                    ",Oslo is in,Norway,Sweden\n")
    ff = read_facts(path)
    assert ff.format == "plain"
    assert [(f.subject, f.prompt, f.target, f.meta["target_new"]) for f in ff] == [
        ("Rome", "Rome is the capital of", None, None), ("Paris", "Paris, the city, is in", "France", "Italy")]
    assert [str(e) for e in ff.errors] == ["line 4 (id 2): missing field 'subject'"]
    (tmp_path / "header.csv").write_text("subject,prompt\n")
    with pytest.raises(DatasetError, match="no rows"):
        read_facts(tmp_path / "header.csv")


def test_plain_does_not_steal_other_formats(tmp_path):
    # a CounterFact or EasyEdit file with a plain-looking first row keeps its format
    rows = [{"subject": "Rome", "prompt": "Rome is in"}] + [cf_row(1, "Toko Yasuda", "{}, who plays the", "guitar",
                                                                   "piano")]
    assert read_facts(write_jsonl(tmp_path / "mixed.jsonl", rows)).format == "counterfact"
    assert read_facts(write_json(tmp_path / "e.json", EASYEDIT)).format == "easyedit"
    ff = read_facts(write_json(tmp_path / "e2.json", [EASYEDIT[0]]))
    assert ff.facts[0].meta["neighborhood_targets"] == ["French"]


def test_curated_file():
    path = curated_facts_path()
    assert path.is_file()
    ff = curated_facts()
    assert ff.format == "counterfact" and ff.errors == [] and len(ff) >= 300
    assert len({f.meta["id"] for f in ff}) == len(ff)
    assert all(f.meta["target_new"] and f.meta["paraphrases"] and f.meta["neighborhood"] for f in ff)
    repo_copy = path.parent.parent.parent / "data" / "facts" / "facts.jsonl"
    if repo_copy.is_file() and repo_copy != path:  # the packaged copy must match the repository's file
        assert repo_copy.read_bytes() == path.read_bytes()


# --- known_facts ------------------------------------------------------------------------------------------------------
PROMPTS = [("Eiffel Tower", "The Eiffel Tower is located in the city of"), ("France", "The capital of France is"),
           ("Beats Music", "Beats Music is owned by"), ("Michael Jordan", "Michael Jordan plays"),
           ("Colosseum", "The Colosseum is in"), ("Brazil", "The official language of Brazil is"),
           ("Japan", "The currency of Japan is the"), ("Jimi Hendrix", "Jimi Hendrix played the")]
TARGETS = ["Paris", "Rome", "Apple", "basketball"]


@pytest.fixture(scope="module")
def knowing_lm():
    """A tiny llama whose unembedding is nudged so that some prompts predict one of TARGETS as top-1."""
    lm = tiny.lm("llama")
    head = lm.adapter.unembed_module(lm.model).weight
    with torch.no_grad():
        for (subject, prompt), target in zip(PROMPTS[::2], TARGETS):
            enc = lm.encode(Fact(subject, prompt, target))
            out = lm.model(input_ids=torch.tensor([enc.input_ids]), output_hidden_states=True)
            hidden = out.hidden_states[-1][0, -1]
            head[enc.target_id] += 3 * hidden / hidden.norm() ** 2 * 10
    return lm


def tiny_facts():
    return [Fact(s, p, t, relation="r", meta={"id": f"{i}-{j}"})
            for i, (s, p) in enumerate(PROMPTS) for j, t in enumerate(TARGETS)]


def test_known_facts_matches_predict_loop(knowing_lm):
    facts = tiny_facts() + [Fact("Rome", "Rome is the capital of")]  # no target: dropped
    manual = [f for f in facts if f.target is not None
              and knowing_lm.encode(f).target_id == knowing_lm.predict(f)[0].token_id]
    assert 0 < len(manual) < len(facts) - 1
    for batch in (1, 3, 32):
        assert known_facts(knowing_lm, facts, batch=batch, progress=False) == manual
    top3 = [f for f in facts if f.target is not None
            and knowing_lm.encode(f).target_id in [p.token_id for p in knowing_lm.predict(f, 3)]]
    assert known_facts(knowing_lm, facts, top_k=3, progress=False) == top3
    assert len(top3) >= len(manual)


def test_known_facts_smollm2(smollm2):
    facts = curated_facts().facts[:60]
    kept = known_facts(smollm2, facts, progress=False)
    assert kept
    for fact in kept:
        assert smollm2.encode(fact).target_id == smollm2.predict(fact)[0].token_id


# --- runner -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return tiny.lm("llama")


def runner_facts():
    return [Fact(s, p, None, meta={"id": f"f{i}"}) for i, (s, p) in enumerate(PROMPTS[:5])]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_runner_writes_resumes_and_repairs(llama, tmp_path):
    out = tmp_path / "runs" / "knockout.jsonl"
    facts = runner_facts()
    first = run_dataset(llama, "knockout", facts, out, progress=False)
    lines = read_jsonl(out)
    assert len(lines) == len(facts) == first.ran == len(first.results)
    assert first.skipped == 0 and not first.errors and not first.repaired
    assert [line["id"] for line in lines] == [f"f{i}" for i in range(5)]
    assert lines[0]["result"]["analysis"] == "attention_knockout"
    assert lines[0]["fact"]["prompt"] == PROMPTS[0][1]
    assert lines[0]["analysis_fn"] == "locedit.localization.knockout:attention_knockout"

    again = run_dataset(llama, attention_knockout, facts, out, progress=False)  # same analysis as a callable
    assert (again.skipped, again.ran) == (5, 0)
    assert again.results == first.results

    # an interruption mid-write: the last line is cut in half
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:-1]) + text[-1][: len(text[-1]) // 2])
    repaired = run_dataset(llama, "knockout", facts, out, progress=False)
    assert repaired.repaired and (repaired.skipped, repaired.ran) == (4, 1)
    lines = read_jsonl(out)
    assert [line["id"] for line in lines] == [f"f{i}" for i in range(5)]
    assert lines[-1]["result"] == first.results[-1]["result"]


def test_runner_error_lines_and_propagation(llama, tmp_path):
    def flaky(lm, fact, **options):
        if fact.meta["id"] == "f1":
            raise FactError("this fact is bad")
        if fact.meta["id"] == "f3" and options.get("explode"):
            raise RuntimeError("a bug")
        return attention_knockout(lm, fact, window=options.get("window", 9))

    out = tmp_path / "flaky.jsonl"
    run = run_dataset(llama, flaky, runner_facts(), out, progress=False)
    assert len(read_jsonl(out)) == 5 and len(run.results) == 4
    assert run.errors == [line for line in read_jsonl(out) if "error" in line]
    assert run.errors[0]["id"] == "f1" and run.errors[0]["error"] == "FactError: this fact is bad"
    assert run_dataset(llama, flaky, runner_facts(), out, progress=False).skipped == 5

    out2 = tmp_path / "explode.jsonl"
    with pytest.raises(RuntimeError, match="a bug"):
        run_dataset(llama, flaky, runner_facts(), out2, options={"explode": True}, progress=False)
    assert [line["id"] for line in read_jsonl(out2)] == ["f0", "f1", "f2"]
    with pytest.raises(DatasetError, match="use another output file"):
        run_dataset(llama, flaky, runner_facts(), out2, options={"window": 3}, progress=False)


def test_dataset_run_is_a_result(llama, tmp_path):
    from locedit.core.results import Result

    def flaky(lm, fact, **options):
        if fact.meta["id"] == "f1":
            raise FactError("this fact is bad")
        return attention_knockout(lm, fact, window=3)

    run = run_dataset(llama, flaky, runner_facts(), tmp_path / "k.jsonl", progress=False)
    assert isinstance(run, Result)
    data = run.to_dict()
    assert data["counts"] == {"results": 4, "errors": 1, "skipped": 0, "ran": 5, "repaired": False, "known": None}
    assert data["errors"] == [{"id": "f1", "error": "FactError: this fact is bad"}]
    assert data["aggregate"]["attention_knockout"]["n"] == 4
    assert "4 results, 1 errors; 5 ran now, 0 were already done" in run.summary()
    saved = json.loads(run.save(tmp_path / "run.json").read_text())
    assert saved["counts"]["results"] == 4 and "<b>DatasetRun</b>" in run._repr_html_()
    fig = run.plot()
    assert len(fig.axes) >= 1


def test_runner_aggregate_matches_numpy(llama, tmp_path):
    run = run_dataset(llama, "knockout", runner_facts(), tmp_path / "k.jsonl", options={"window": 3},
                      progress=False)
    summary = run.aggregate()["attention_knockout"]
    assert summary["n"] == 5 and summary["window"] == [3]
    for group in ("subject", "non_subject", "last"):
        series = np.array([r["result"]["relative_change"][group] for r in run.results])
        stats = summary["relative_change"][group]
        assert stats["n"] == 5 and len(stats["mean"]) == llama.num_layers
        np.testing.assert_allclose(stats["mean"], series.mean(0), rtol=1e-9, atol=1e-9)
        from scipy import stats as st
        half = st.t.ppf(0.975, 4) * series.std(0, ddof=1) / np.sqrt(5)
        np.testing.assert_allclose(stats["ci95"], half, rtol=1e-9, atol=1e-9)


def test_aggregate_series_generic():
    rows = [{"result": {"a": [1.0, 2.0], "d": {"x": [1, 3], "y": [2, 2]}}},
            {"a": [3.0, None], "d": {"x": [3, 5]}},
            {"result": {"b": 1}}]
    a = aggregate_series(rows, "a")
    assert a["n"] == 2 and a["mean"] == [2.0, 2.0]
    d = aggregate_series(rows, ("d",))
    assert d["x"]["mean"] == [2.0, 4.0] and d["x"]["n"] == 2 and d["y"]["n"] == 1
    assert aggregate_series(rows, "missing") == {"mean": [], "ci95": [], "n": 0}
    with pytest.raises(LoceditError, match="different lengths"):
        aggregate_series([{"a": [1]}, {"a": [1, 2]}], "a")
    generic = runner.aggregate_all_series([{"result": {"analysis": "x", "p": [1.0, 3.0], "s": "t"}},
                                           {"result": {"analysis": "x", "p": [3.0, 5.0], "s": "u"}}])
    assert generic["n"] == 2 and generic["p"]["mean"] == [2.0, 4.0] and "s" not in generic


def test_registry(monkeypatch):
    spec, fn = resolve_analysis("knockout")
    assert fn is attention_knockout and spec == "locedit.localization.knockout:attention_knockout"
    for name in ("attribute_rate", "sublayer", "extraction", "heads", "patching", "trace"):
        assert name in runner.ANALYSES
    with pytest.raises(LoceditError, match="unknown analysis 'nope'"):
        resolve_analysis("nope")
    monkeypatch.setitem(runner.ANALYSES, "ghost", "locedit.localization.ghost_module:ghost")
    with pytest.raises(LoceditError, match="ghost_module"):
        resolve_analysis("ghost")
    monkeypatch.setitem(runner.ANALYSES, "ghost", "locedit.localization.knockout:no_such_function")
    with pytest.raises(LoceditError, match="no_such_function"):
        resolve_analysis("ghost")


def test_runner_only_known(knowing_lm, tmp_path):
    facts = tiny_facts()
    known = known_facts(knowing_lm, facts, progress=False)
    run = run_dataset(knowing_lm, "knockout", facts, tmp_path / "known.jsonl", only_known=True, progress=False)
    assert run.known == len(known) and [r["id"] for r in run.results] == [f.meta["id"] for f in known]

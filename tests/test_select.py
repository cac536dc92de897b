"""Per-fact site selection (`sites="select"`) and key-consistent template tokenization, on every tiny family."""

from __future__ import annotations

import pytest
import torch

import tiny
import locedit
from locedit.core.facts import EditRequest, Fact
from locedit.editing.edit import applied_edits
from locedit.editing.select import Selection, best_trial, probe_score, probe_snapshot, selection_probes
from locedit.editing.templates import context_templates
from locedit.editing.values import templated_prompts
from locedit.errors import EditError, LoceditError

FAST = {"v_num_grad_steps": 6, "clamp_norm_factor": 10, "context_template_length_params": [[3, 2]],
        "mom2_adjustment": False}
SUBJECTS = ["Eiffel Tower", "Beats Music", "Michael Jordan", "Jimi Hendrix", "Big Ben", "Colosseum", "Louvre",
            "Microsoft", "Brazil", "Japan", "Toyota", "Danielle Darrieux", "Apple", "Italy", "Mount Fuji", "Nile"]
TEMPLATES = ["{} is located in the city of", "The city of the {} is", "{} is owned by", "The capital of {} is",
             "{} was founded by", "{} is in", "The language of {} is", "{} was made by", "People of {} speak"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))


def pool_facts(lm) -> list[Fact]:
    """Facts of one relation that a random tiny model 'knows': each target is its own top-1 token."""
    out = []
    for template in TEMPLATES:
        for subject in SUBJECTS:
            prompt = template.format(subject)
            top = lm.predict(Fact(subject, prompt, None), k=5)
            if top[0].token.strip() and lm.encode(Fact(subject, prompt, top[0].token)).target_id == top[0].token_id:
                new = next(t.token.strip() for t in top[1:] if t.token.strip() not in ("", top[0].token.strip()))
                out.append(Fact(subject, prompt, top[0].token, "rel", {"id": prompt, "target_new": new}))
    first = out[0].subject
    assert len({f.subject for f in out}) >= 3, lm.adapter.family  # other subjects to draw neighbours from
    return sorted(out, key=lambda f: f.subject != first)


def request_and_pool(lm):
    pool = pool_facts(lm)
    fact = pool[0]
    meta = {**fact.meta, "paraphrases": [t.format(fact.subject) for t in TEMPLATES[1:3]],
            "neighborhood": [fact.prompt.replace(fact.subject, s) for s in SUBJECTS if s != fact.subject][:2]}
    fact = Fact(fact.subject, fact.prompt, fact.target, "rel", meta)
    return EditRequest(fact, " " + meta["target_new"]), pool


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_select_trial_edits_the_shortlist_and_keeps_the_best_on_selection_probes(family):
    lm = tiny.lm(family)
    request, pool = request_and_pool(lm)
    before = [p.detach().clone() for p in lm.model.parameters()]
    e = locedit.edit(lm, request, sites=Selection(pool=pool, max_trials=3), hparams=FAST)
    sel = e.sites["selection"]
    assert e.is_applied and applied_edits(lm) == [e] and e.sites["layer_source"] == "selected"
    assert 1 <= len(sel["trials"]) <= 3 and e.timings["trial_edits"] == len(sel["trials"])
    assert sel["chosen"] == best_trial(sel["trials"])
    chosen = sel["trials"][sel["chosen"]]
    assert e.layers == chosen["layers"] and e.sites["key_position"] == chosen["key_position"]
    assert len({(t["layer"], t["key_position"]) for t in sel["trials"]}) == len(sel["trials"])
    # the selection probes are never the evaluation's prompts
    evaluation = {request.fact.prompt, *request.fact.meta["paraphrases"], *request.fact.meta["neighborhood"]}
    assert not evaluation & set(sel["probes"]["paraphrases"] + sel["probes"]["neighbours"])
    # the chosen edit is the trial's: its selection score reproduces the table's
    with e.reverted():  # the probes and the baseline come from the unedited model
        probes = selection_probes(lm, request.fact, request.new_target_text(), pool)
        clean = probe_snapshot(lm, request.fact, probes)
    assert probes.paraphrases == sel["probes"]["paraphrases"]
    after = probe_snapshot(lm, request.fact, probes)
    assert probe_score(clean, after)["S_sel"] == pytest.approx(chosen["S_sel"])
    e.revert()
    assert all(torch.equal(a, b) for a, b in zip(before, lm.model.parameters()))  # bit-exact


def test_selection_probes_are_built_from_the_pool_and_prefixes():
    lm = tiny.lm("llama")
    request, pool = request_and_pool(lm)
    fact = request.fact
    probes = selection_probes(lm, fact, request.new_target_text(), pool, n_paraphrases=4, n_neighbours=3)
    assert probes.sources["pool"] == "given" and probes.sources["neighbour_source"] == "same relation"
    assert len(probes.paraphrases) == 4 and probes.sources["relation_templates"] >= 1
    rome = context_templates(lm, [[5, 10], [10, 10]], 0)
    assert all(fact.subject in p for p in probes.paraphrases)
    assert not {t.format(fact.prompt) for t in rome} & set(probes.paraphrases)
    assert 1 <= len(probes.neighbours) <= 3
    pool_by_prompt = {f.prompt: f for f in pool}
    for prompt, true in probes.neighbours:  # known facts of other subjects, with their own true target
        assert fact.subject not in prompt and pool_by_prompt[prompt].target_text() == true
    with pytest.raises(EditError, match="selection probes"):  # nobody known of that relation or any other
        selection_probes(lm, fact, request.new_target_text(), [])


def test_best_trial_prefers_s_then_low_nkl_then_the_shortlist_order():
    trials = [{"S_sel": 0.5, "NKL_sel": 0.1}, {"S_sel": 0.8, "NKL_sel": 0.9}, {"S_sel": 0.8, "NKL_sel": 0.3},
              {"S_sel": 0.8, "NKL_sel": 0.3}, {"S_sel": None, "NKL_sel": None}]
    assert best_trial(trials) == 2
    with pytest.raises(EditError):
        best_trial([{"S_sel": None}])


def test_select_refuses_what_it_cannot_do():
    lm = tiny.lm("gpt2")
    request, pool = request_and_pool(lm)
    with pytest.raises(EditError, match="layers"):
        locedit.edit(lm, request, sites="select", layers=[1])
    with pytest.raises(EditError, match="'select'"):
        locedit.edit(lm, request, sites="selected")
    with pytest.raises(EditError, match="one request"):
        locedit.edit(lm, [request, request], sites="select")
    with pytest.raises(EditError, match="rome, ft"):
        locedit.edit(lm, request, sites=Selection(pool=pool), method="head")
    assert applied_edits(lm) == []


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_prompt_tokens_give_every_template_the_bare_prompts_key_token(family):
    lm = tiny.lm(family)
    fact = Fact("Beats Music", "Beats Music is owned by")
    templates = ["{}", "Some text here. {}", "Another one. {}"]
    bare = lm.encode(fact)
    for rule in ("subject_last", "carrier", "last"):
        rows, keys, texts = templated_prompts(lm, fact, templates, rule, 0, "prompt")
        tail = len(bare.input_ids) - next(i for i, t in enumerate(bare.input_ids)
                                          if t not in set(lm.tokenizer.all_special_ids))
        for row, key in zip(rows, keys):
            assert row[-tail:] == list(bare.input_ids[-tail:])  # the bare prompt's own tokens after the prefix
            assert row[key] == rows[0][keys[0]]  # the same key token in every template
            assert len(row) - key == len(rows[0]) - keys[0]
        assert texts[1].endswith("\n" + fact.prompt)
    with pytest.raises(LoceditError, match="template_tokens"):
        templated_prompts(lm, fact, templates, "subject_last", 0, "words")


def test_text_tokens_change_a_leading_subjects_token_and_prompt_tokens_do_not():
    lm = tiny.lm("llama")  # byte-level tokenizer without BOS: "Beats" and " Beats" are different tokens
    fact = Fact("Beats", "Beats is owned by")
    templates = ["{}", "Some text here. {}"]
    (r0, r1), (k0, k1), _ = templated_prompts(lm, fact, templates, "subject_last", None, "text")
    if lm.tokenizer("Beats")["input_ids"][-1:] != lm.tokenizer(" Beats")["input_ids"][-1:]:
        assert r0[k0] != r1[k1]
    (p0, p1), (j0, j1), _ = templated_prompts(lm, fact, templates, "subject_last", None, "prompt")
    assert p0[j0] == p1[j1]
    e = locedit.edit(lm, EditRequest(Fact("Beats", "Beats is owned by", None), " xyz"), layers=[1],
                     key_position="subject_last", hparams={**FAST, "template_tokens": "prompt"})
    assert e.hparams["template_tokens"] == "prompt"
    e.revert()


def test_cli_sites_select_prints_the_trials_and_writes_the_chosen_edit(tmp_path, capsys):
    import json

    from locedit.cli.main import main

    model_dir = tiny.save(tmp_path / "model", "llama")
    lm = locedit.load(str(model_dir))
    request, pool = request_and_pool(lm)
    (tmp_path / "pool.jsonl").write_text("".join(
        json.dumps({"subject": f.subject, "prompt": f.prompt, "target": f.target.strip(), "relation": "rel",
                    "target_new": f.meta["target_new"]}) + "\n" for f in pool))
    (tmp_path / "hp.json").write_text(json.dumps(FAST))
    fact = request.fact
    args = ["edit", "--model", str(model_dir), "--subject", fact.subject, "--prompt", fact.prompt,
            "--new-target", request.new_target, "--hparams", str(tmp_path / "hp.json"), "--out", str(tmp_path / "e")]
    assert main(args + ["--sites", "select", "--select-pool", str(tmp_path / "pool.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "selected by" in out and out.count(" trial layer ") >= 1 and out.count(" * trial layer ") == 1
    saved = json.loads((tmp_path / "e" / "edit.json").read_text())
    assert saved["sites"]["layer_source"] == "selected"
    assert main(args + ["--select-pool", str(tmp_path / "pool.jsonl")]) == 2  # the pool needs --sites select
    assert main(args + ["--sites", "select", "--layers", "1"]) == 2  # select chooses the layer itself

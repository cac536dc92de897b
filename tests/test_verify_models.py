"""Verifying a model edited by another tool (`verify_models`, `locedit verify --base/--edited`): the weight diff
finds a locedit edit's rank-1 change at its layer from a `save_model` directory, a hand-made rank-2 change, and a
plain fine-tuning step's many high-rank changes; incompatible models are refused; verify and verify_models share
one implementation (same numbers); the verdict and the exit statuses."""

import json

import pytest
import torch

import locedit
import tiny
from locedit import EditRequest, Fact
from locedit.cli.main import main
from locedit.errors import ModelMismatchError
from locedit.verification import verify, verify_models
from locedit.verification.verdict import behaviour_verdict, exit_status, mechanism_verdict
from locedit.verification.weight_diff import describe_parameter, numerical_rank, weight_diff

PROMPT = "The Eiffel Tower is located in the city of"
NEIGHBOURS = ["The Louvre is in"]
PARAPHRASES = ["Eiffel Tower is in the city of"]
FAST = dict(generation_tokens=3, fluency_tokens=4)


def true_fact(lm):
    return Fact("Eiffel Tower", PROMPT, lm.predict(Fact("Eiffel Tower", PROMPT))[0].token)


def new_target(lm, fact):
    return next(c for c in (" guitar", " Apple", " London", " Rome") if c.strip() != fact.target.strip())


def snapshot(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def unchanged(lm, snap):
    return all(torch.equal(p, snap[n]) for n, p in lm.model.named_parameters())


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("base"), "llama", "metaspace")


@pytest.fixture(scope="module")
def rome_dir(base_dir, tmp_path_factory):
    """A `save_model` directory of a locedit ROME edit at layer 1."""
    lm = locedit.load(str(base_dir))
    fact = true_fact(lm)
    edit = locedit.edit(lm, EditRequest(fact, new_target(lm, fact)), layers=[1], key_position="subject_last")
    path = tmp_path_factory.mktemp("rome")
    locedit.save_model(lm, path)
    edit.revert()
    return path


def test_numerical_rank_by_hand():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(20, 3, generator=g), torch.randn(30, 3, generator=g)
    rank, s = numerical_rank(u @ v.T)
    assert rank == 3 and len(s) == 5 and s[3] < 1e-3 * s[0]
    assert numerical_rank(torch.zeros(4, 5)) == (0, [])
    assert numerical_rank(torch.outer(torch.ones(6), torch.arange(1.0, 8.0)))[0] == 1


def test_locedit_edit_saved_with_save_model_is_rank_one_at_its_layer(base_dir, rome_dir):
    base, edited = locedit.load(str(base_dir)), locedit.load(str(rome_dir))
    diff = weight_diff(base, edited)
    assert len(diff) == 1, [d["name"] for d in diff]
    (d,) = diff
    assert d["layer"] == 1 and d["part"] == "MLP output projection" and d["rank"] == 1
    assert d["where"] == "layer 1 MLP output projection" and d["name"] == "model.layers.1.mlp.down_proj.weight"


def test_verify_models_matches_verify_of_the_same_edit(base_dir):
    """One implementation: the base/edited pair measures what verify(lm, edit) measures on the same edit."""
    lm = locedit.load(str(base_dir))
    fact = true_fact(lm)
    request = EditRequest(fact, new_target(lm, fact))
    edit = locedit.edit(lm, request, layers=[1], key_position="subject_last")
    try:
        by_edit = verify(lm, edit, neighborhood=NEIGHBOURS, paraphrases=PARAPHRASES, **FAST)
        edited = locedit.load((tiny.model("llama"), tiny.tokenizer("metaspace")))
        edited.model.load_state_dict(lm.model.state_dict())  # the edited weights, in a second model
    finally:
        edit.revert()
    snap_base, snap_edited = snapshot(lm), snapshot(edited)
    by_models = verify_models(lm, edited, request, neighborhood=NEIGHBOURS, paraphrases=PARAPHRASES, **FAST)
    assert unchanged(lm, snap_base) and unchanged(edited, snap_edited)
    assert by_models.sites["layers"] == [1] and by_models.method == "external"
    for key in ("efficacy_score", "efficacy_magnitude", "paraphrase_score", "neighborhood_score",
                "neighborhood_kl", "perplexity"):
        assert by_models.behaviour[key] == pytest.approx(by_edit.behaviour[key], rel=1e-4, abs=1e-6), key
    for check, key in (("extraction", "new_minus_old_after"), ("enrichment", "new_best_rank_after"),
                       ("knockout", "subject_logodds_drop_after"), ("sufficiency", "logodds_gain"),
                       ("necessity", "logodds_drop"), ("ov_read", "gain")):
        assert by_models.mechanism[check][key] == pytest.approx(by_edit.mechanism[check][key], rel=1e-3,
                                                                abs=1e-4), check
    assert by_models.passed == by_edit.passed
    d = json.loads(json.dumps(by_models.to_dict()))
    assert d["weight_diff"][0]["rank"] == 1 and "weights: 1 tensor(s) differ" in by_models.summary()


def test_hand_made_rank_two_change(base_dir):
    base, edited = locedit.load(str(base_dir)), locedit.load(str(base_dir))
    w = edited.adapter.layer_part(edited.model, 2, edited.adapter.mlp_down).weight
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w.add_(torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g) * 0.3)
    diff = weight_diff(base, edited)
    assert [(d["where"], d["rank"]) for d in diff] == [("layer 2 MLP output projection", 2)]
    fact = true_fact(base)
    ver = verify_models(base, edited, EditRequest(Fact(fact.subject, fact.prompt), new_target(base, fact)),
                        neighborhood=NEIGHBOURS, **FAST)
    assert ver.facts[0]["true_target"] == fact.target_text()  # the base model's top-1
    assert ver.mechanism["enrichment"]["layer"] == 2 and ver.sites["layers"] == [2]
    assert set(ver.verdict["mechanism"]["checks"]) == {"knockout", "extraction", "sufficiency", "necessity", "ov_read",
                                                       "enrichment", "locality"}
    assert ver.mechanism["sufficiency"]["layer"] == 2 and ver.mechanism["necessity"]["applicable"]


def test_one_fine_tuning_step_changes_many_tensors_at_high_rank(base_dir, tmp_path):
    model = tiny.model("llama")
    tok = tiny.tokenizer("metaspace")
    model.train()
    ids = tok("The Eiffel Tower is located in the city of Rome. Big Ben is in London.", return_tensors="pt")
    optim = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(**ids, labels=ids["input_ids"]).loss
    loss.backward()
    optim.step()
    model.eval()
    model.save_pretrained(tmp_path / "ft")
    tok.save_pretrained(tmp_path / "ft")
    base, edited = locedit.load(str(base_dir)), locedit.load(str(tmp_path / "ft"))
    diff = weight_diff(base, edited)
    two_d = [d for d in diff if d["rank"] is not None]
    assert len(diff) > 20 and len(two_d) > 10
    assert max(d["rank"] for d in two_d) > 4  # a gradient step over a dozen tokens is no rank-one edit
    assert {d["layer"] for d in diff if d["layer"] is not None} == set(range(base.num_layers))
    assert any(d["part"] == "token embedding" for d in diff)
    fact = true_fact(base)
    ver = verify_models(base, edited, EditRequest(fact, " Rome" if fact.target.strip() != "Rome" else " London"),
                        mechanism=False, **FAST)
    assert ver.mechanism is None and ver.sites["layers"] == list(range(base.num_layers))


def test_incompatible_models_are_refused(base_dir):
    base = locedit.load(str(base_dir))
    with pytest.raises(ModelMismatchError, match="architecture"):
        weight_diff(base, tiny.lm("gpt2", "bytelevel"))
    other_vocab = locedit.load((tiny.model("llama"), tiny.tokenizer("bytelevel")))
    with pytest.raises(ModelMismatchError, match="vocabular"):
        weight_diff(base, other_vocab)


def test_describe_parameter_in_words(base_dir):
    lm = locedit.load(str(base_dir))
    assert describe_parameter(lm, "model.layers.3.self_attn.o_proj.weight")["where"] == \
        "layer 3 attention output projection"
    assert describe_parameter(lm, "model.layers.0.self_attn.v_proj.weight")["where"] == \
        "layer 0 attention value projection"
    assert describe_parameter(lm, "model.embed_tokens.weight")["part"] == "token embedding"
    gpt2 = tiny.lm("gpt2", "bytelevel")  # Conv1D names, fused QKV
    assert describe_parameter(gpt2, "transformer.h.2.mlp.c_proj.weight") == {
        "layer": 2, "part": "MLP output projection", "where": "layer 2 MLP output projection"}
    assert describe_parameter(gpt2, "transformer.h.0.attn.c_attn.weight")["part"] == \
        "attention query/key/value projection"


# --- the verdict ------------------------------------------------------------------------------------------------------
def behaviour(es=1.0, gen=True, ps=1.0, ns=1.0, ns_before=1.0, pre=0.4, nkl=0.3, passed=True):
    return {"efficacy_score": es, "generation_efficacy_prompt": gen, "paraphrase_score": ps,
            "neighborhood_score": ns, "neighborhood_score_prefixed": pre, "neighborhood_kl": nkl, "passed": passed,
            "before": {"neighborhood_score": ns_before, "neighborhood_score_prefixed": 1.0}}


def test_behaviour_verdict_scores_and_reported_ns_plus_and_nkl():
    v = behaviour_verdict(behaviour(), 0.1)
    by_name = {c["name"]: c for c in v["checks"]}
    assert v["passed"] is True and all(c["passed"] for c in v["checks"])
    assert by_name["neighborhood_score_drop"]["score"] == 0.0
    reported = {c["name"]: c for c in v["reported"]}
    assert reported["neighborhood_score_prefixed_drop"]["score"] == pytest.approx(0.6)
    assert reported["neighborhood_kl"]["score"] == pytest.approx(0.3)
    assert all(c["in_rule"] is False and c["passed"] is None for c in v["reported"])  # not in the rule yet
    failed = behaviour_verdict(behaviour(ps=0.0, ns=0.5, passed=False), 0.1)
    by_name = {c["name"]: c for c in failed["checks"]}
    assert by_name["paraphrase_score"]["passed"] is False and by_name["neighborhood_score_drop"]["passed"] is False
    assert by_name["efficacy_score"]["passed"] is True and failed["passed"] is False
    no_para = behaviour_verdict(behaviour(ps=None, ns=None), 0.1)
    assert [c["name"] for c in no_para["checks"]] == ["efficacy_score", "generation_efficacy_prompt"]


def test_mechanism_verdict_and_exit_status():
    m = {"knockout": {"subject_logodds_drop_after": 2.5, "passed": True, "rule": "r"},
         "extraction": {"new_minus_old_after": -1.0, "passed": False, "rule": "r"},
         "enrichment": {"applicable": False, "passed": None, "rule": "r"},
         "locality": {"max_abs_relative_change": 0.1, "applicable": True, "passed": True, "rule": "r"},
         "passed": False}
    v = mechanism_verdict(m)
    assert v["passed"] is False and v["checks"]["knockout"]["score"] == 2.5
    assert v["checks"]["extraction"]["passed"] is False and v["checks"]["enrichment"]["applicable"] is False
    assert v["checks"]["enrichment"]["score"] is None and mechanism_verdict(None) is None
    assert exit_status(True) == 0 and exit_status(False) == 1


# --- the command line ---------------------------------------------------------------------------------------------
def test_cli_verify_base_and_edited(base_dir, rome_dir, tmp_path, capsys):
    base = locedit.load(str(base_dir))
    fact = true_fact(base)
    out = tmp_path / "v"
    code = main(["verify", "--base", str(base_dir), "--edited", str(rome_dir), "--subject", fact.subject,
                 "--prompt", fact.prompt, "--new-target", new_target(base, fact), "--neighbor", NEIGHBOURS[0],
                 "--out", str(out)])
    printed = capsys.readouterr().out
    d = json.loads((out / "verification.json").read_text())
    assert code == (0 if d["passed"] else 1) and code == d["verdict"]["exit_status"], printed
    assert d["weight_diff"][0]["where"] == "layer 1 MLP output projection" and d["weight_diff"][0]["rank"] == 1
    assert "layer 1 MLP output projection" in printed and "verdict (behaviour)" in printed
    html = (out / "report.html").read_text()
    assert "Where was it edited" in html and "layer 1 MLP output projection" in html and "Verdict, with scores" in html


def test_cli_verify_exit_status_follows_the_verdict(base_dir, tmp_path, capsys):
    """The same model as base and edited: no change, so the edit failed (ES = 0) and the status is 1."""
    base = locedit.load(str(base_dir))
    fact = true_fact(base)
    code = main(["verify", "--base", str(base_dir), "--edited", str(base_dir), "--subject", fact.subject,
                 "--prompt", fact.prompt, "--new-target", new_target(base, fact), "--no-mechanism",
                 "--out", str(tmp_path / "same")])
    printed = capsys.readouterr().out
    assert code == 1 and "weights: the two models are identical" in printed and "verdict: FAILED" in printed


@pytest.mark.parametrize("extra, pattern", [
    (["--edited", "EDITED", "--subject", "Eiffel Tower", "--prompt", PROMPT], "--new-target"),
    (["--edited", "EDITED", "--subject", "Big Ben", "--prompt", PROMPT, "--new-target", " Rome"], "does not occur"),
    (["--edited", "MISSING", "--subject", "Eiffel Tower", "--prompt", PROMPT, "--new-target", " Rome"],
     "does not exist"),
    (["--edit", "EDITED"], "--base"),
])
def test_cli_verify_user_errors_exit_2(base_dir, rome_dir, tmp_path, capsys, extra, pattern):
    extra = [str(rome_dir) if x == "EDITED" else str(tmp_path / "nope") if x == "MISSING" else x for x in extra]
    out = tmp_path / "o"
    code = main(["verify", "--base", str(base_dir), *extra, "--out", str(out)])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("locedit: error")]
    assert code == 2 and len(lines) == 1 and pattern in lines[0], err
    assert not out.exists()  # nothing half-written


def test_cli_verify_refuses_mismatched_models(base_dir, tmp_path, capsys):
    other = tiny.save(tmp_path / "gpt2", "gpt2", "metaspace")
    code = main(["verify", "--base", str(base_dir), "--edited", str(other), "--subject", "Eiffel Tower",
                 "--prompt", PROMPT, "--new-target", " Rome", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("locedit: error") == 1 and "architecture" in err
    assert not (tmp_path / "o").exists()


def test_help_documents_the_exit_status(capsys):
    for verb in ("verify", "edit"):
        assert main([verb, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "exit status: 0" in text and "1" in text and "2 for a user error" in text


# --- SmolLM2 -------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # the real model, loaded twice (base and the saved edited copy)
def test_smollm2_rome_edit_saved_and_verified_against_its_base(smollm2, eiffel, tmp_path):
    before = snapshot(smollm2)
    request = EditRequest(eiffel, " Rome")
    edit = locedit.edit(smollm2, request)  # the measured default layer and key position
    try:
        locedit.save_model(smollm2, tmp_path / "edited")
    finally:
        edit.revert()
    assert unchanged(smollm2, before)
    edited = locedit.load(str(tmp_path / "edited"))
    ver = verify_models(smollm2, edited, request, neighborhood=["The Louvre is located in the city of"],
                        paraphrases=["The Eiffel Tower can be found in the city of"], fluency_tokens=10)
    assert unchanged(smollm2, before)
    (d,) = ver.weight_diff
    assert d["rank"] == 1 and d["where"] == f"layer {edit.layers[0]} MLP output projection"
    assert ver.sites["layers"] == edit.layers and ver.mechanism["enrichment"]["layer"] == edit.layers[0]
    b = ver.behaviour
    assert b["before"]["efficacy_score"] == 0.0 and b["efficacy_score"] == 1.0
    for name in ("knockout", "extraction", "sufficiency", "necessity", "ov_read", "enrichment", "locality"):
        assert ver.mechanism[name]["passed"] is not None, name
        assert ver.verdict["mechanism"]["checks"][name]["score"] is not None, name
    assert ver.exit_status == (0 if ver.passed else 1)
    assert f"layer {edit.layers[0]} MLP output projection" in ver.summary()


def test_cli_verify_needs_an_edit_or_two_models(base_dir, capsys):
    assert main(["verify"]) == 2
    assert "give --edit DIR" in capsys.readouterr().err
    assert main(["verify", "--edited", str(base_dir), "--subject", "Eiffel Tower", "--prompt", PROMPT,
                 "--new-target", " Rome"]) == 2
    assert "give --base" in capsys.readouterr().err
    assert main(["verify", "--base", str(base_dir), "--edited", str(base_dir), "--model", str(base_dir)]) == 2
    assert "--model is for --edit" in capsys.readouterr().err

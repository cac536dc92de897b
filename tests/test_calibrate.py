"""Calibration keyed by the weights: `calibrate` on tiny models, the stored file, its use by `edit` and `locate`
however the weights were loaded, none for other weights (with the warning), export/import, the CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import locedit
import tiny
from locedit import EditRequest, Fact
from locedit.editing.calibrate import calibrate, coarse_layers
from locedit.editing.calibration import calibration_for, calibration_path, from_dict, load_calibration
from locedit.editing.fingerprint import weights_fingerprint
from locedit.editing.hparams import read_hparams
from locedit.errors import CalibrationError

FAST = {"v_lr": 0.5, "v_num_grad_steps": 10, "clamp_norm_factor": 10, "context_template_length_params": [[3, 2]],
        "mom2_adjustment": False}
SUBJECTS = ["Eiffel Tower", "Beats Music", "Michael Jordan", "Jimi Hendrix", "Big Ben", "Colosseum", "Louvre",
            "Microsoft", "Brazil", "Japan", "France", "Italy"]
TEMPLATES = ["{} is located in the city of", "The city of the {} is", "{} is owned by", "{} plays",
             "The capital of {} is", "The official language of {} is", "The currency of {} is", "{} was founded by", "{} is in",
             "{} Apple city located", "The {} is in", "{} played the",
             "The city of the {}", "The owner of {}"]  # last: prompts ending with the subject (locate refuses them)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))


def known(lm, count: int = 2) -> list[Fact]:
    """Facts a random tiny model 'knows' (their target is its top-1 token, one that encodes back to itself), with
    another token as the new target, other templates as paraphrases and other subjects as neighbours."""
    out = []
    for template in TEMPLATES:
        for subject in SUBJECTS:
            prompt = template.format(subject)
            top = lm.predict(Fact(subject, prompt, None), k=5)
            if not top[0].token.strip() or lm.encode(Fact(subject, prompt, top[0].token)).target_id != top[0].token_id:
                continue
            others = [t.format(subject) for t in TEMPLATES if t != template][:2]
            neighbours = [template.format(s) for s in SUBJECTS if s != subject][:2]
            out.append(Fact(subject, prompt, top[0].token, "test",
                            {"id": prompt, "target_new": next(t.token.strip() for t in top[1:] if t.token.strip()
                                                              not in ("", top[0].token.strip())),
                             "paraphrases": others,
                             "neighborhood": neighbours}))
            if len(out) == count:
                return out
    raise AssertionError(f"only {len(out)} known facts for {lm.adapter.family}")


def test_calibrate_writes_the_calibration_of_these_weights_and_edits_use_it(tmp_path):
    lm = tiny.lm("llama")
    facts = known(lm)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    cal = calibrate(lm, facts, n=2, stride=2, hparams={"rome": FAST}, out=tmp_path / "run", progress=False)
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())  # every trial reverted
    stages = {r["stage"] for r in cal.sweep}
    assert {r["layer"] for r in cal.sweep if r["stage"] == "coarse"} == {0, 2} and "fine±1" in stages
    assert len(cal.sweep) == 3 and all(r["n"] == 2 for r in cal.sweep)  # coarse 0, 2 + one or two neighbours
    rome = cal.chosen["rome"]
    best = max(cal.sweep, key=lambda r: r["S"])
    assert rome["layers"] == best["layers"] and rome["key_position"] == "subject_last"
    assert rome["S"]["mean"] == pytest.approx(best["S"]) and rome["n"] == 2
    path = calibration_path(weights_fingerprint(lm))
    assert path.is_file() and (tmp_path / "run" / "calibration.json").is_file()
    assert load_calibration(path).to_dict() == cal.to_dict()
    assert len((tmp_path / "run" / "trials.jsonl").read_text().splitlines()) == 2 * len(cal.sweep)

    fact = facts[0]
    sites = locedit.locate(lm, fact).recommendation["rank_one"]
    assert sites["source"] == "calibrated" and sites["layers"] == rome["layers"]
    assert "calibrated edit layer" in locedit.locate(lm, fact).summary()
    import locedit.localization.sites as sites_module

    def no_locate(*a, **k):
        raise AssertionError("edit located a fact whose weights have a calibrated site")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sites_module, "locate", no_locate)
        e = locedit.edit(lm, EditRequest(fact, " " + fact.meta["target_new"]), hparams=FAST)
    try:
        assert e.layers == rome["layers"] and e.sites["layer_source"] == "calibrated"
        assert e.sites["key_position"] == "subject_last" and e.sites["located"] is False
    finally:
        e.revert()

    # the same weights saved and loaded from a directory: the same default site
    directory = locedit.save_model(lm, tmp_path / "saved")
    again = locedit.load(str(directory))
    assert again.name != lm.name and weights_fingerprint(again) == weights_fingerprint(lm)
    rec = locedit.locate(again, fact).recommendation["rank_one"]
    assert rec["source"] == "calibrated" and rec["layers"] == rome["layers"]

    # weights that differ in one element: no calibration, the located layer and one warning naming the command
    weight = again.adapter.layer_part(again.model, 3, again.adapter.mlp_down).weight
    with torch.no_grad():
        weight[0, 0] += 1.0
    assert calibration_for(again) is None
    with pytest.warns(UserWarning, match="locedit calibrate"):
        rec = locedit.locate(again, fact).recommendation["rank_one"]
    assert rec["source"] == "located" and rec["layers"] == rec["located_layers"]


def test_the_fingerprint_covers_the_weights_not_an_applied_edit_or_the_dtype():
    lm = tiny.lm("gpt2")
    fp = weights_fingerprint(lm)
    fact = known(lm, 1)[0]
    e = locedit.edit(lm, EditRequest(fact, " " + fact.meta["target_new"]), method="rome", layers=[1],
                     key_position="subject_last", hparams=FAST)
    assert weights_fingerprint(lm) == fp and e.is_applied  # the unedited weights, the edit stays applied
    edited = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    assert weights_fingerprint(lm) == fp  # again, from the cache of the edited state
    assert all(torch.equal(edited[n], p) for n, p in lm.model.named_parameters())
    e.revert()
    assert weights_fingerprint(lm) == fp
    other = tiny.lm("gpt2", seed=1)
    assert weights_fingerprint(other) != fp
    half = tiny.lm("gpt2")
    half.model.to(torch.bfloat16)
    as_float = tiny.lm("gpt2")
    as_float.model.to(torch.bfloat16).to(torch.float32)  # bfloat16 values held as float32: the same weights
    assert weights_fingerprint(half) == weights_fingerprint(as_float) != fp


def test_calibration_resumes_from_its_trial_table_and_stops_at_the_budget(tmp_path, monkeypatch):
    lm = tiny.lm("qwen2")
    facts = known(lm)
    cal = calibrate(lm, facts, n=2, layers=[1, 2], hparams={"rome": FAST}, out=tmp_path / "run", install=False,
                    progress=False)
    assert calibration_for(lm) is None  # install=False leaves the cache alone
    from locedit.editing import api

    def refuse(*args, **kwargs):
        raise AssertionError("a stored trial was recomputed")

    monkeypatch.setattr(api, "edit", refuse)
    again = calibrate(lm, facts, n=2, layers=[1, 2], hparams={"rome": FAST}, out=tmp_path / "run", budget=0,
                      install=False, progress=False)
    assert again.chosen == cal.chosen and again.complete
    with pytest.raises(CalibrationError, match="budget"):
        calibrate(lm, facts, n=2, layers=[3], hparams={"rome": FAST}, out=tmp_path / "other", budget=0,
                  install=False, progress=False)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_every_family_runs_calibrate(family):
    lm = tiny.lm(family)
    cal = calibrate(lm, known(lm, 1), n=1, layers=[0, lm.num_layers - 1], hparams={"rome": FAST}, progress=False)
    assert [r["layer"] for r in cal.sweep] == [0, lm.num_layers - 1]
    assert all(r["S"] is not None and 0 <= r["S"] <= 1 for r in cal.sweep)
    assert cal.chosen["rome"]["layers"][0] in (0, lm.num_layers - 1)
    assert calibration_for(lm).chosen == cal.chosen


def test_memit_and_ft_use_their_own_calibrated_sites():
    lm = tiny.lm("llama")
    facts = known(lm)
    cal = calibrate(lm, facts[:1], n=1, methods=("rome", "ft"), layers=[2], hparams={"rome": FAST}, progress=False)
    assert cal.chosen["ft"]["layers"] == [2]
    e = locedit.edit(lm, EditRequest(facts[1], " " + facts[1].meta["target_new"]), method="ft")
    try:
        assert e.layers == [2] and e.sites["layer_source"] == "calibrated"
    finally:
        e.revert()


def test_easyedit_yaml_round_trips_through_read_hparams(tmp_path):
    lm = tiny.lm("llama")
    cal = calibrate(lm, known(lm, 1), n=1, layers=[1], hparams={"rome": FAST}, install=False, progress=False)
    path = tmp_path / "rome.yaml"
    path.write_text(cal.to_easyedit_yaml("rome"))
    with pytest.warns(UserWarning, match="model_name"):  # EasyEdit's model_name does not apply to locedit
        read = read_hparams(None, path)
    assert read.method == "rome" and read.layers == [1] and read.key_position == "subject_last"
    assert read.params.v_num_grad_steps == FAST["v_num_grad_steps"] and read.params.mom2_adjustment is False
    base = tmp_path / "easyedit.yaml"
    base.write_text("alg_name: ROME\nmodel_name: x\nlayers: [17]\nfact_token: subject_last\nv_lr: 0.25\n"
                    "rewrite_module_tmp: model.layers.{}.mlp.down_proj\n")
    merged = tmp_path / "merged.yaml"
    merged.write_text(cal.to_easyedit_yaml("rome", base=base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rewrite_module_tmp does not apply to locedit
        read = read_hparams(None, merged)
    assert read.layers == [1] and read.params.v_lr == 0.25
    with pytest.raises(CalibrationError, match="memit"):
        cal.to_easyedit_yaml("memit")


def test_calibration_files_are_checked(tmp_path):
    lm = tiny.lm("llama")
    cal = calibrate(lm, known(lm, 1), n=1, layers=[1], hparams={"rome": FAST}, install=False, progress=False)
    path = cal.save(tmp_path / "c.json")
    assert from_dict(json.loads(path.read_text())).chosen == cal.chosen
    bad = json.loads(path.read_text())
    bad["chosen"]["rome"]["key_position"] = "middle"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(CalibrationError, match="malformed"):
        load_calibration(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(CalibrationError, match="not a locedit calibration"):
        load_calibration(tmp_path / "other.json")
    with pytest.raises(CalibrationError, match="target_new"):
        calibrate(lm, [Fact("Eiffel Tower", "The city of the Eiffel Tower", " Paris")], n=1, progress=False)


def test_coarse_layers_step_through_the_model():
    assert coarse_layers(30) == [0, 5, 10, 15, 20, 25]
    assert coarse_layers(4, 2) == [0, 2] and coarse_layers(4, 1) == [0, 1, 2, 3]


def _counterfact_file(path, facts) -> str:
    rows = [{"case_id": i, "requested_rewrite": {"prompt": f.prompt.replace(f.subject, "{}"), "subject": f.subject,
                                                  "target_true": {"str": f.target.strip()},
                                                  "target_new": {"str": f.meta["target_new"]}},
             "paraphrase_prompts": f.meta["paraphrases"], "neighborhood_prompts": f.meta["neighborhood"]}
            for i, f in enumerate(facts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cli_calibrates_a_model_directory_and_imports_only_for_its_weights(tmp_path, capsys):
    from locedit.cli.main import main

    model = tiny.save(tmp_path / "model", "llama")
    lm = locedit.load(str(model))
    facts = _counterfact_file(tmp_path / "facts.jsonl", known(lm, 1))
    (tmp_path / "hp.json").write_text(json.dumps(FAST))
    out = tmp_path / "out"
    code = main(["calibrate", "--model", str(model), "--facts", facts, "--n", "1", "--layers", "0,2",
                 "--hparams", str(tmp_path / "hp.json"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "rome: layers [" in printed and "keyed at subject_last" in printed
    for name in ("calibration.json", "trials.jsonl", "easyedit-rome.yaml"):
        assert (out / name).is_file(), name
    cal = load_calibration(out / "calibration.json")
    assert calibration_for(lm).chosen == cal.chosen and [r["layer"] for r in cal.sweep] == [0, 2]
    assert read_hparams(None, out / "easyedit-rome.yaml", warn=False).layers == cal.chosen["rome"]["layers"]

    calibration_path(cal.fingerprint).unlink()
    assert calibration_for(lm) is None
    assert main(["calibrate", "--import", str(out / "calibration.json"), "--model", str(model)]) == 0
    assert calibration_for(lm).chosen == cal.chosen
    other = tiny.save(tmp_path / "other", "qwen2")
    assert main(["calibrate", "--import", str(out / "calibration.json"), "--model", str(other)]) == 2
    assert "calibration of other weights" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(model)]) == 2  # no --out


def test_key_positions_are_candidates_and_a_calibrated_carrier_key_is_used():
    lm = tiny.lm("llama")
    fact = known(lm, 1)[0]
    cal = calibrate(lm, [fact], n=1, layers=[1], key_positions=("subject_last", "carrier"), hparams={"rome": FAST},
                    progress=False)
    assert [(r["layer"], r["key_position"]) for r in cal.sweep] == [(1, "subject_last"), (1, "carrier")]
    chosen = cal.chosen["rome"]["key_position"]
    sites = locedit.locate(lm, fact)
    rec = sites.recommendation["rank_one"]
    assert rec["source"] == "calibrated" and rec["key_position"] == chosen
    carrier = sites.carrier["position"]
    assert rec["position"] == (carrier if chosen == "carrier" else lm.encode(fact).subject_end - 1)

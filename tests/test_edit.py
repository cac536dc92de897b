"""Editing on tiny random configs: the methods move the prediction, ROME's closed form holds, edits revert
bit-exactly, compose, save and load, refuse foreign models, and leave weights untouched when anything fails."""

import json

import pytest
import torch

import locedit
import tiny
from locedit import EditRequest, Fact
from locedit.editing import EditError, load_edit
from locedit.editing.stats import key_statistics

# Tiny random models need more room than ROME's GPT-2 XL settings (their subject states barely reach the last
# position); the subject sits at the end of the prompt so the key position is close to the prediction.
FAST = {"v_lr": 0.5, "v_num_grad_steps": 40, "clamp_norm_factor": 10, "context_template_length_params": [[3, 2]]}
FACT = Fact("Eiffel Tower", "The city of the Eiffel Tower", " Paris")
NEW = " the"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))


def _weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _same(lm, saved) -> bool:
    return all(torch.equal(saved[n], p) for n, p in lm.model.named_parameters())


def _p_new(lm, fact=FACT, new=NEW) -> float:
    enc = lm.encode(Fact(fact.subject, fact.prompt, new))
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([enc.input_ids])).logits[0, -1]
    return float(logits.softmax(-1)[enc.target_id])


# ROME fails to reach top-1 on these two post-norm tiny configs with FAST settings (see README, "Editing");
# they are checked to raise p(new) instead.
ROME_TOP1 = [f for f in tiny.FAMILIES if f not in ("gemma3", "olmo2")]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_rome_and_memit_edit_every_family(family):
    lm = tiny.lm(family)
    saved = _weights(lm)
    p0 = _p_new(lm)
    for method, layers in (("rome", [1]), ("memit", [1, 2])):
        edit = locedit.edit(lm, EditRequest(FACT, NEW),
                            method=method, layers=layers, key_position="subject_last", hparams=FAST)
        assert edit.is_applied and not _same(lm, saved)
        if method == "memit" or family in ROME_TOP1:
            assert lm.predict(FACT)[0].token == NEW, (family, method)
        else:
            assert _p_new(lm) > 2 * p0, (family, method)
        edit.revert()
        assert _same(lm, saved), f"{family} {method}: revert is not bit-exact"


# Head edits on tiny random models: the bare prompt only (no context templates: a head's output at the last position
# varies much more across contexts than an MLP key), the 4 heads of the last layer, more room to move.
HEAD_FAST = {"v_num_grad_steps": 100, "clamp_norm_factor": 100, "v_weight_decay": 0.05,
             "context_template_length_params": []}
HEAD_TOP1 = [f for f in tiny.FAMILIES if f != "gemma3"]  # gemma3's tiny config only raises p(new); see README


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_head_out_edits_every_family(family):
    lm = tiny.lm(family)
    saved = _weights(lm)
    p0 = _p_new(lm)
    edit = locedit.edit(lm, EditRequest(FACT, NEW),
                        method="head", heads=[(3, h) for h in range(4)], key_position="subject_last",
                        hparams={**HEAD_FAST, "mode": "out"})
    assert edit.sites["heads"] == [[3, 0], [3, 1], [3, 2], [3, 3]] and len(edit.deltas) == 1  # one W_O, rank 4
    assert edit.deltas[0].rank == 4
    if family in HEAD_TOP1:
        assert lm.predict(FACT)[0].token == NEW, family
    else:
        assert _p_new(lm) > 2 * p0, family
    edit.revert()
    assert _same(lm, saved)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "phi3"])
def test_head_value_edits_raise_the_new_target(family):
    """A value edit can only move a head's output inside W_O,h's column space (head_dim wide), so it is weaker
    than an output-projection edit; it must still raise p(new)."""
    lm = tiny.lm(family)
    saved = _weights(lm)
    p0 = _p_new(lm)
    edit = locedit.edit(lm, EditRequest(FACT, NEW), method="head", heads=[(2, 1), (3, 2)], key_position="subject_last",
                        hparams={**FAST, "mode": "value"})
    assert _p_new(lm) > p0, family
    edit.revert()
    assert _same(lm, saved)


def test_gqa_value_edit_is_noted():
    lm = tiny.lm("llama")  # 4 query heads share 2 kv heads
    edit = locedit.edit(lm, EditRequest(FACT, NEW), method="head", heads=[(2, 1)], key_position="subject_last",
                        hparams={**FAST, "mode": "value"})
    assert any("grouped-query" in n and "[0, 1]" in n for n in edit.notes)
    edit.revert()


def test_rome_closed_form_holds():
    lm = tiny.lm("gpt2")  # Conv1D weights, with a bias
    from locedit.editing.edit import Edit, geometry
    from locedit.editing.hparams import ROMEHyperParams
    from locedit.editing.rome import rome_update

    layer = 1
    stats = key_statistics(lm, layers=[layer], progress=False)
    hp = ROMEHyperParams(**FAST)
    result = rome_update(lm, FACT, NEW, layer, "subject_last", None, hp, stats.mlp[layer])
    module = lm.adapter.layer_part(lm.model, layer, lm.adapter.mlp_down)
    edit = Edit("rome", [FACT], [NEW], {"layers": [layer]}, {}, [result.delta],
                {"name": lm.name, "geometry": geometry(lm)})
    with edit.applied(lm), torch.no_grad():
        out = module(result.key[None])[0]
    assert torch.allclose(out, result.value, atol=1e-4 * max(1.0, float(result.value.abs().max())))
    # and the key is whitened by C: the update direction is C⁻¹k*, not k*
    u = result.delta.right[:, 0].double()
    expected = torch.linalg.solve(stats.mlp[layer].double(), result.key.double())
    assert torch.allclose(u, expected / expected.norm(), atol=1e-4)


def test_ft_changes_entries_within_the_constraint():
    lm = tiny.lm("llama")
    saved = _weights(lm)
    edit = locedit.edit(lm, EditRequest(FACT, NEW),
                        method="ft", layers=[1], hparams={"norm_constraint": 1e-2, "lr": 1e-2})
    delta = edit.deltas[0].dense
    assert delta.abs().max() <= 1e-2 + 1e-7 and delta.abs().max() > 0
    assert edit.losses[0][-1] < edit.losses[0][0]
    edit.revert()
    assert _same(lm, saved)


def test_save_load_apply_gives_the_same_logits(tmp_path):
    lm = tiny.lm("llama")
    ids = torch.tensor([lm.encode(FACT).input_ids])
    edit = locedit.edit(lm, EditRequest(FACT, NEW),
                        method="memit", layers=[1, 2], key_position="subject_last", hparams=FAST)
    with torch.no_grad():
        edited = lm.model(input_ids=ids).logits
    edit.save(tmp_path / "e")
    edit.revert()
    loaded = load_edit(tmp_path / "e")
    assert not loaded.is_applied and loaded.method == "memit" and loaded.new_targets == [NEW]
    assert sorted(loaded.keys) == [1, 2]
    fresh = tiny.lm("llama")  # the same weights, another object
    loaded.apply(fresh)
    with torch.no_grad():
        again = fresh.model(input_ids=ids).logits
    assert torch.allclose(edited, again, atol=1e-6)
    assert json.loads((tmp_path / "e" / "edit.json").read_text())["hparams"]["clamp_norm_factor"] == 10


def test_refuses_twice_and_foreign_models():
    lm = tiny.lm("llama")
    edit = locedit.edit(lm, EditRequest(FACT, NEW),
                        method="rome", layers=[1], key_position="subject_last", hparams=FAST)
    with pytest.raises(EditError, match="already applied"):
        edit.apply(lm)
    edit.revert()
    with pytest.raises(EditError, match="not applied"):
        edit.revert()
    other_seed = tiny.lm("llama", seed=1)
    saved = _weights(other_seed)
    with pytest.raises(EditError, match="other weights"):
        edit.apply(other_seed)
    assert _same(other_seed, saved)
    with pytest.raises(EditError, match="geometry"):
        edit.apply(tiny.lm("gpt2"))


def test_edits_compose_and_revert_in_order():
    lm = tiny.lm("llama")
    saved = _weights(lm)
    a = locedit.edit(lm, EditRequest(FACT, NEW), method="rome", layers=[1], key_position="subject_last", hparams=FAST)
    after_a = _weights(lm)
    other = Fact("Louvre", "The museum called the Louvre", " Paris")
    b = locedit.edit(lm, EditRequest(other, NEW), method="rome", layers=[1], key_position="subject_last", hparams=FAST)
    with pytest.raises(EditError, match="revert the later edit first"):
        a.revert()
    b.revert()
    assert _same(lm, after_a)
    a.revert()
    assert _same(lm, saved)
    # two edits computed on the unedited model stack on the same tensor, in either order
    c = locedit.edit(lm, EditRequest(other, NEW), method="rome", layers=[1], key_position="subject_last", hparams=FAST)
    c.revert()
    a.apply(lm)
    c.apply(lm)
    c.revert()
    a.revert()
    assert _same(lm, saved)


def test_failures_leave_weights_unchanged(monkeypatch):
    lm = tiny.lm("llama")
    saved = _weights(lm)
    from locedit.editing import memit

    calls = {"n": 0}
    real = memit.memit_factors

    def second_layer_nan(C, K, R, weight):
        calls["n"] += 1
        left, right = real(C, K, R, weight)
        return (left * float("nan"), right) if calls["n"] == 2 else (left, right)

    monkeypatch.setattr(memit, "memit_factors", second_layer_nan)
    with pytest.raises(EditError, match="non-finite"):
        locedit.edit(lm, EditRequest(FACT, NEW),
                     method="memit", layers=[1, 2], key_position="subject_last", hparams=FAST)
    assert _same(lm, saved) and not locedit.editing.applied_edits(lm)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    calls["n"] = 0
    monkeypatch.setattr(memit, "memit_factors", lambda C, K, R, w: (calls.__setitem__("n", calls["n"] + 1),
                                                                    real(C, K, R, w) if calls["n"] == 1
                                                                    else interrupted())[1])
    with pytest.raises(KeyboardInterrupt):
        locedit.edit(lm, EditRequest(FACT, NEW),
                     method="memit", layers=[1, 2], key_position="subject_last", hparams=FAST)
    assert _same(lm, saved)


def test_corrupt_or_foreign_edit_files_are_refused(tmp_path):
    lm = tiny.lm("llama")
    edit = locedit.edit(lm, EditRequest(FACT, NEW),
                        method="rome", layers=[1], key_position="subject_last", hparams=FAST)
    edit.revert()
    good = tmp_path / "good"
    edit.save(good)
    assert not [p for p in good.iterdir() if p.name.startswith(".")]  # no temporary files left
    load_edit(good)
    truncated = tmp_path / "truncated"
    edit.save(truncated)
    data = (truncated / "edit.safetensors").read_bytes()
    (truncated / "edit.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(EditError, match="does not match"):
        load_edit(truncated)
    broken = tmp_path / "broken"
    edit.save(broken)
    (broken / "edit.json").write_text("{not json")
    with pytest.raises(EditError, match="not valid JSON"):
        load_edit(broken)
    (broken / "edit.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(EditError, match="not a locedit edit"):
        load_edit(broken)
    with pytest.raises(EditError, match="missing"):
        load_edit(tmp_path / "nowhere")


def test_bad_requests_raise_clear_errors():
    lm = tiny.lm("llama")
    saved = _weights(lm)
    with pytest.raises(locedit.LoceditError, match="unknown editing method"):
        locedit.edit(lm, EditRequest(FACT, NEW), method="magic", layers=[1])
    with pytest.raises(locedit.LoceditError, match="empty"):
        locedit.edit(lm, EditRequest(FACT, "  "), layers=[1])
    with pytest.raises(locedit.LoceditError, match="own target|current target"):
        locedit.edit(lm, EditRequest(FACT, "Paris"), layers=[1])
    with pytest.raises(locedit.LoceditError, match="layer 9 does not exist"):
        locedit.edit(lm, EditRequest(FACT, NEW), layers=[9], key_position="subject_last")
    with pytest.raises(locedit.LoceditError, match="L1H7 does not exist"):
        locedit.edit(lm, EditRequest(FACT, NEW), method="head", heads=[(1, 7)], key_position="subject_last")
    with pytest.raises(locedit.LoceditError, match="unknown rome hyper-parameter"):
        locedit.edit(lm, EditRequest(FACT, NEW), layers=[1], key_position="subject_last", hparams={"v_lrr": 1})
    with pytest.raises(locedit.LoceditError, match="one fact at a time"):
        locedit.edit(lm, [EditRequest(FACT, NEW), EditRequest(FACT, NEW)], method="rome", layers=[1])
    assert _same(lm, saved)


def test_alphaedit_keeps_earlier_edits_keys(monkeypatch):
    from locedit.editing import memit

    lm = tiny.lm("llama")
    layers = [1, 2]
    stats = key_statistics(lm, layers=layers, progress=False)
    # everything counts as "null space" on a tiny model; a small ridge α lets the earlier keys dominate
    big = {**FAST, "nullspace": True, "nullspace_threshold": 1e9, "L2": 1e-2}
    a = locedit.edit(lm, [EditRequest(FACT, NEW)], method="memit", layers=layers, key_position="subject_last",
                          hparams=big, stats=stats)
    module = lm.adapter.layer_part(lm.model, 2, lm.adapter.mlp_down)
    key_a = a.keys[2][:, 0]
    with torch.no_grad():
        out_a = module(key_a[None])[0].clone()
    other = Fact("Louvre", "The museum called the Louvre", " Paris")

    def change_at_first_key() -> float:
        b = locedit.edit(lm, [EditRequest(other, " city")], method="memit", layers=layers, key_position="subject_last",
                              hparams=big, stats=stats)
        with torch.no_grad():
            moved = float((module(key_a[None])[0] - out_a).norm() / out_a.norm())
        b.revert()
        return moved

    with_history = change_at_first_key()
    monkeypatch.setattr(memit, "_previous_keys", lambda *args: None)  # AlphaEdit without the earlier edit's keys
    without_history = change_at_first_key()
    assert with_history < 0.5 * without_history, (with_history, without_history)
    a.revert()


def test_nullspace_energy_rule_keeps_the_low_energy_directions():
    from locedit.editing.rank_one import nullspace_projector, nullspace_summary

    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    eig = torch.tensor([1e-4, 2e-3, 8e-3, 0.09, 0.4, 0.5], dtype=torch.float64)  # sums to 1.0001
    C = (q * eig) @ q.T
    by_threshold = nullspace_summary(C, nullspace_projector(C, 1e-2))
    assert by_threshold["dims"] == 3 and by_threshold["energy_share"] == pytest.approx(0.0101 / 1.0001, rel=1e-6)
    by_energy = nullspace_summary(C, nullspace_projector(C, 1e-2, energy=0.005))  # 1e-4 + 2e-3 fits, + 8e-3 not
    assert by_energy["dims"] == 2 and by_energy["energy_share"] <= 0.005
    P = nullspace_projector(C, 1e-2, energy=0.005)
    assert torch.allclose(P @ P, P, atol=1e-10) and torch.allclose(P @ q[:, 4], torch.zeros(6, dtype=torch.float64),
                                                                   atol=1e-10)
    # the scale of the keys does not move the energy rule; it moves the threshold rule
    assert nullspace_summary(10 * C, nullspace_projector(10 * C, 1e-2, energy=0.005))["dims"] == 2
    assert nullspace_summary(10 * C, nullspace_projector(10 * C, 1e-2))["dims"] == 1
    for bad in (0.0, 1.5):
        with pytest.raises(locedit.LoceditError, match="nullspace_energy"):
            nullspace_projector(C, 1e-2, energy=bad)
    with pytest.raises(locedit.LoceditError, match="empty"):
        nullspace_projector(C, 1e-2, energy=1e-6)


def test_alphaedit_with_the_energy_rule_edits_and_stays_in_its_null_space():
    lm = tiny.lm("llama")
    layers = [1]
    stats = key_statistics(lm, layers=layers, progress=False)
    hp = {**FAST, "nullspace": True, "nullspace_energy": 0.5, "L2": 1e-2}
    e = locedit.edit(lm, [EditRequest(FACT, NEW)], method="memit", layers=layers, key_position="subject_last",
                     hparams=hp, stats=stats)
    from locedit.editing.rank_one import nullspace_projector

    P = nullspace_projector(stats.get("mlp", 1), 2e-2, energy=0.5)
    (delta,) = e.deltas
    D = delta.matrix().double()  # (out, in): every row lies in the null space, so D = D P
    assert float(D.norm()) > 0
    assert torch.allclose(D, D @ P, atol=1e-6 * float(D.norm()))
    e.revert()


def test_cli_edit_writes_the_edit_and_rejects_bad_input(tmp_path, capsys):
    from locedit.cli.main import main

    model_dir = tmp_path / "tiny"
    lm = tiny.lm("llama")
    lm.model.save_pretrained(str(model_dir))
    lm.tokenizer.save_pretrained(str(model_dir))
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(FAST))
    out = tmp_path / "edit"
    code = main(["edit", "--model", str(model_dir), "--subject", FACT.subject, "--prompt", FACT.prompt,
                 "--target", FACT.target, "--new-target", NEW, "--layers", "1", "--key-position", "subject_last",
                 "--hparams", str(hp), "--out", str(out), "--save-model", str(tmp_path / "edited")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "p(new" in printed and "layer(s) [1]" in printed
    edit = load_edit(out)
    assert edit.method == "rome" and edit.layers == [1]
    reloaded = locedit.load(str(tmp_path / "edited"))
    assert reloaded.predict(FACT)[0].token == NEW  # the saved model carries the edit
    capsys.readouterr()
    verified = tmp_path / "verified"
    code = main(["edit", "--model", str(model_dir), "--subject", FACT.subject, "--prompt", FACT.prompt,
                 "--target", FACT.target, "--new-target", NEW, "--layers", "1", "--key-position", "subject_last",
                 "--hparams", str(hp), "--out", str(verified), "--verify"])
    printed = capsys.readouterr().out
    assert (verified / "report.html").is_file() and (verified / "edit.json").is_file(), printed
    passed = json.loads((verified / "verification.json").read_text())["passed"]
    assert code == (0 if passed else 1), printed  # with --verify the status follows the verification
    for bad in (["--new-target", " "], ["--new-target", NEW, "--layers", "99"],
                ["--new-target", NEW, "--method", "head", "--heads", "x"]):
        target = tmp_path / "bad"
        code = main(["edit", "--model", str(model_dir), "--subject", FACT.subject, "--prompt", FACT.prompt,
                     "--target", FACT.target, "--key-position", "subject_last", "--out", str(target), *bad])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("locedit:")]
        assert code == 2 and len(errors) == 1 and errors[0].startswith("locedit: error:"), (bad, err)
        assert "Traceback" not in err
        assert not target.exists()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gpt_neox", "phi3"])
def test_value_loss_matches_a_plain_per_prompt_computation(family):
    """The optimisation's cached-prefix, left-aligned, few-logits forward gives the loss an independent
    per-prompt full forward gives, for the δ it returns."""
    from locedit.editing.hparams import ROMEHyperParams
    from locedit.editing.templates import context_templates
    from locedit.editing.values import Site, _encode_in_context, build_batch, key_position, optimize_values, \
        target_token_ids

    lm = tiny.lm(family)
    hp = ROMEHyperParams(**{**FAST, "v_num_grad_steps": 2})
    templates = context_templates(lm, hp.context_template_length_params, hp.seed)
    module = lm.adapter.layer_part(lm.model, 1, lm.adapter.mlp_down)
    batch = build_batch(lm, FACT, " city", templates, "subject_last", None, hp.kl_prompt)
    result = optimize_values(lm, batch, [Site("mlp_down", 1)], hp)
    delta = result.deltas[0]
    assert delta.norm() > 0

    def run(ids, position, add):
        def hook(m, a, out):
            out = out.clone()
            if add:
                out[0, position] += delta
            return out

        h = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return lm.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        finally:
            h.remove()

    target = target_token_ids(lm.tokenizer, FACT.prompt, " city")
    nlls = []
    for template in templates:
        text = template.format(FACT.prompt)
        enc = _encode_in_context(lm.tokenizer, FACT.subject, text, len(text) - len(FACT.prompt) + FACT.prompt.index(FACT.subject))
        ids = list(enc.input_ids) + target[:-1]
        lp = run(ids, key_position(enc, "subject_last", None), True)
        n = len(enc.input_ids)
        nlls.append(-torch.stack([lp[n - 1 + j, t] for j, t in enumerate(target)]).mean())
    kl_text = hp.kl_prompt.format(FACT.subject)
    kl_enc = _encode_in_context(lm.tokenizer, FACT.subject, kl_text, 0)
    kl_pos = key_position(kl_enc, "subject_last", None)
    before = run(list(kl_enc.input_ids), kl_pos, False)[kl_pos]
    after = run(list(kl_enc.input_ids), kl_pos, True)[kl_pos]
    kl = (after.exp() * (after - before)).sum()
    expected = torch.stack(nlls).mean() + hp.kl_factor * kl + \
        hp.v_weight_decay * delta.norm() / result.inits[0].norm() ** 2
    assert abs(result.losses[-1] - float(expected)) < 1e-4 * max(1.0, float(expected))


def test_memit_z_batched_across_facts_equals_one_by_one():
    lm = tiny.lm("llama")
    facts = [FACT, Fact("Louvre", "The museum called the Louvre", " Paris"),
             Fact("Rome", "The capital of Italy is Rome", " Paris")]
    targets = [NEW, " city", " the"]
    layers = [1, 2]
    stats = key_statistics(lm, layers=layers, progress=False)
    factors = {}
    for batch_facts in (1, 3):
        edit = locedit.edit(lm, [EditRequest(f, t) for f, t in zip(facts, targets)],
                            method="memit", layers=layers, key_position="subject_last",
                                 hparams={**FAST, "batch_facts": batch_facts}, stats=stats)
        factors[batch_facts] = [d.matrix() for d in edit.deltas]
        losses = edit.losses
        edit.revert()
        assert len(losses) == 3 and all(len(l) >= 1 for l in losses)
    for one, together in zip(factors[1], factors[3]):
        assert torch.allclose(one, together, atol=1e-4 * float(one.abs().max()))


def test_a_calibrated_edit_layer_becomes_the_recommendation_and_the_default():
    # weights with a calibration (locedit.editing.calibration): locate recommends its site (keeping the located
    # layer in located_layers) and edit(layers=None) edits there at its key position; other weights of the same
    # name and depth are not matched
    from locedit.editing.calibration import Calibration, install_calibration
    from locedit.editing.edit import geometry
    from locedit.editing.fingerprint import weights_fingerprint
    from locedit.localization.sites import locate

    lm = tiny.lm("llama")
    fact = Fact("Eiffel Tower", "The Eiffel Tower is located in the city of", " Paris")  # locate needs a relation
    with pytest.warns(UserWarning, match="locedit calibrate"):
        plain = locate(lm, fact).recommendation["rank_one"]
    assert plain["source"] == "located" and plain["layers"] == plain["located_layers"]
    layer = (plain["layers"][0] + 1) % lm.num_layers  # a layer locate did not choose
    install_calibration(Calibration(weights_fingerprint(lm), {"name": lm.name, "geometry": geometry(lm)},
                                    {"rome": {"layers": [layer], "key_position": "subject_last"}}, evidence="test"))
    rec = locate(lm, fact).recommendation["rank_one"]
    enc = lm.encode(fact)
    assert rec["source"] == "calibrated" and rec["layers"] == [layer]
    assert rec["located_layers"] == plain["layers"] and rec["position"] == enc.subject_end - 1
    e = locedit.edit(lm, EditRequest(fact, NEW), hparams=FAST)
    try:
        assert e.layers == [layer] and e.sites["key_position"] == "subject_last"
        assert e.sites["layer_source"] == "calibrated"
    finally:
        e.revert()
    other = tiny.lm("llama", seed=1)
    assert other.name == lm.name and other.num_layers == lm.num_layers
    assert locate(other, fact).recommendation["rank_one"]["source"] == "located"


def _mlp_keys(lm, fact, layer):
    from locedit.core.engine import Capture, run

    caps = run(lm, lm.encode(fact), capture=Capture(mlp_keys=True, layers=[layer])).captures
    return caps["mlp_keys", layer][0].float()


@pytest.mark.parametrize("method,layers", [("rome", [1]), ("memit", [1, 2])])
def test_key_position_last_is_a_control_keyed_at_the_last_token(method, layers):
    """key_position="last": the rank-one key is read at the prompt's last token, not at the subject."""
    lm = tiny.lm("llama")
    saved = _weights(lm)
    fact = Fact("Eiffel Tower", "The Eiffel Tower is in the city of", " Paris")  # the subject is not last
    keys = _mlp_keys(lm, fact, layers[-1])
    enc = lm.encode(fact)
    hp = {**FAST, "mom2_adjustment": False} if method == "rome" else FAST
    cosines = {}
    for rule in ("subject_last", "last"):
        edit = locedit.edit(lm, EditRequest(fact, NEW), method=method, layers=layers, key_position=rule, hparams=hp)
        assert edit.sites["key_position"] == rule
        u = edit.deltas[-1].right[:, 0].float()  # the update's input direction at the last edited layer
        cos = torch.nn.functional.cosine_similarity(keys, u[None].expand_as(keys), dim=-1).abs()
        cosines[rule] = (float(cos[len(enc) - 1]), float(cos[enc.subject_end - 1]))
        edit.revert()
        assert _same(lm, saved)
    if method == "rome":  # C = I: u is the template-averaged key itself
        last_at_last, last_at_subject = cosines["last"]
        subject_at_last, subject_at_subject = cosines["subject_last"]
        assert last_at_last > last_at_subject and subject_at_subject > subject_at_last
    assert cosines["last"] != cosines["subject_last"]


def test_key_position_is_checked():
    lm = tiny.lm("llama")
    saved = _weights(lm)
    with pytest.raises(EditError, match="key_position must be one of"):
        locedit.edit(lm, EditRequest(FACT, NEW), method="rome", layers=[1], key_position="first", hparams=FAST)
    with pytest.raises(EditError, match="ft has no key position"):
        locedit.edit(lm, EditRequest(FACT, NEW), method="ft", layers=[1], key_position="last")
    assert _same(lm, saved)

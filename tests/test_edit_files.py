"""Edit objects and files that cannot be misused (issue #15): one saved edit loaded twice is applied once, edits
compare by identity and every stack state reverts bit-exactly, a changed or inconsistent edit.json is refused,
ROME/MEMIT/EasyEdit hyper-parameter files are read as they are, and `locedit.edit` takes `EditRequest`s."""

import json
import random
import warnings
from pathlib import Path

import pytest
import torch

import locedit
import tiny
from locedit import EditRequest, Fact
from locedit.core.results import Result
from locedit.editing import EditError, load_edit, read_hparams
from locedit.editing.edit import content_sha256
from locedit.errors import HeadSpecError, InterventionError

FAST = {"v_lr": 0.5, "v_num_grad_steps": 40, "clamp_norm_factor": 10, "context_template_length_params": [[3, 2]]}
FACT = Fact("Eiffel Tower", "The city of the Eiffel Tower", " Paris")
OTHER = Fact("Louvre", "The museum called the Louvre", " Paris")
NEW = " the"
DATA = Path(__file__).parent / "data" / "hparams"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def lm():
    return tiny.lm("llama")


@pytest.fixture(scope="module")
def saved(lm, tmp_path_factory):
    """A ROME edit of FACT at layer 1, saved (not applied)."""
    e = locedit.edit(lm, EditRequest(FACT, NEW), method="rome", layers=[1], key_position="subject_last",
                     hparams=FAST)
    e.revert()
    return e.save(tmp_path_factory.mktemp("edit") / "rome")


def _weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _same(lm, weights) -> bool:
    return all(torch.equal(weights[n], p) for n, p in lm.model.named_parameters())


# --- 1. one saved edit applied twice -------------------------------------------------------------------------------
def test_a_file_loaded_twice_is_applied_once_and_the_model_restores(lm, saved):
    original = _weights(lm)
    a1, a2 = load_edit(saved), load_edit(saved)
    assert a1 != a2 and a1 == a1 and a2 not in [a1]  # identity, never a tensor comparison
    a1.apply(lm)
    after = _weights(lm)
    with pytest.raises(EditError, match="same content is already applied"):
        a2.apply(lm)
    assert _same(lm, after) and locedit.editing.applied_edits(lm) == [a1]
    with pytest.raises(EditError, match="not applied"):
        a2.revert()
    a1.revert()
    assert _same(lm, original) and not locedit.editing.applied_edits(lm)
    a2.apply(lm)  # once the first is reverted, the copy applies
    a2.revert()
    assert _same(lm, original)


def test_every_stack_state_reverts_bit_exactly(lm, saved):
    original = _weights(lm)
    a = load_edit(saved)
    b = locedit.edit(lm, EditRequest(OTHER, NEW), method="rome", layers=[1], key_position="subject_last",
                     hparams=FAST)
    b.revert()
    c = locedit.edit(lm, EditRequest(FACT, " city"), method="rome", layers=[2], key_position="subject_last",
                     hparams=FAST)
    c.revert()
    twin = load_edit(saved)  # the same content as a
    edits = {"a": a, "b": b, "c": c, "twin": twin}
    seen: dict[tuple, dict] = {(): original}
    rng = random.Random(0)
    refused = 0
    for _ in range(40):
        name = rng.choice(sorted(edits))
        e = edits[name]
        before = _weights(lm)
        try:
            e.revert() if e.is_applied else e.apply(lm)
        except EditError:
            refused += 1
            assert _same(lm, before), f"a refused {name} changed weights"
        state = tuple(id(x) for x in locedit.editing.applied_edits(lm))
        if state in seen:
            assert _same(lm, seen[state]), f"stack state {state} is not bit-exact"
        else:
            seen[state] = _weights(lm)
        assert not (a.is_applied and twin.is_applied)
    assert refused > 0 and len(seen) > 3
    for e in reversed(locedit.editing.applied_edits(lm)):
        e.revert()
    assert _same(lm, original)


# --- 2. edit.json is checked -------------------------------------------------------------------------------------
def _copy(saved, tmp_path, change, rehash: bool) -> Path:
    target = tmp_path / "copy"
    target.mkdir(parents=True)
    (target / "edit.safetensors").write_bytes((saved / "edit.safetensors").read_bytes())
    info = json.loads((saved / "edit.json").read_text())
    change(info)
    if rehash:  # a file changed consistently with its hash: the field checks must catch it
        info["content_sha256"] = content_sha256(info)
    (target / "edit.json").write_text(json.dumps(info))
    return target


def _set(path, value):
    def change(info):
        where = info
        for key in path[:-1]:
            where = where[key]
        where[path[-1]] = value
    return change


TAMPERINGS = {
    "method nonsense": (_set(["method"], "nonsense"), "unknown editing method"),
    "method memit": (_set(["method"], "memit"), None),  # valid on its own: only the content hash tells
    "layers [5]": (_set(["sites", "layers"], [5]), "sites.layers"),
    "layers [2]": (_set(["sites", "layers"], [2]), "not the layers of the changed parameters"),
    "layers [True]": (_set(["sites", "layers"], [True]), "sites.layers"),
    "new target": (_set(["new_targets"], [" Rome"]), None),
    "new target not a string": (_set(["new_targets"], [3]), "non-empty strings"),
    "two new targets": (_set(["new_targets"], [" the", " Rome"]), "1 facts but 2 new targets"),
    "fingerprint": (_set(["model", "tensors"], {}), "fingerprints"),
}


@pytest.mark.parametrize("case", sorted(TAMPERINGS))
def test_a_changed_edit_json_is_refused_with_one_line(saved, tmp_path, case):
    change, message = TAMPERINGS[case]
    with pytest.raises(EditError, match="changed after it was saved") as exc:
        load_edit(_copy(saved, tmp_path / "plain", change, rehash=False))
    assert "\n" not in str(exc.value)
    rehashed = _copy(saved, tmp_path / "rehashed", change, rehash=True)
    if message is None:
        load_edit(rehashed)  # a consistent, well-formed file: only its hash could tell it was changed
        return
    with pytest.raises(EditError, match=message) as exc:
        load_edit(rehashed)
    assert "\n" not in str(exc.value) and "edit.json" in str(exc.value)


def test_old_or_hashless_edit_files_are_refused(saved, tmp_path):
    with pytest.raises(EditError, match="changed after it was saved"):
        load_edit(_copy(saved, tmp_path / "a", lambda info: info.pop("content_sha256"), rehash=False))
    with pytest.raises(EditError, match="version 1"):
        load_edit(_copy(saved, tmp_path / "b", _set(["version"], 1), rehash=True))
    loaded = load_edit(saved)
    assert loaded.target_sources == ["given"] and loaded.layers == [1]


def test_cli_verify_refuses_a_tampered_edit(saved, tmp_path, capsys):
    from locedit.cli.main import main

    model_dir = tmp_path / "tiny"
    lm = tiny.lm("llama")
    lm.model.save_pretrained(str(model_dir))
    lm.tokenizer.save_pretrained(str(model_dir))
    tampered = _copy(saved, tmp_path / "t", _set(["sites", "layers"], [3]), rehash=False)
    code = main(["verify", "--model", str(model_dir), "--edit", str(tampered), "--no-mechanism"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("locedit:")]
    assert code == 2 and len(errors) == 1 and "changed after it was saved" in errors[0], err


# --- 3. hyper-parameter files of ROME, MEMIT and EasyEdit ----------------------------------------------------------
def _read(method, name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = read_hparams(method, DATA / name)
    caught = [w for w in caught if "ignored" in str(w.message)]
    assert len(caught) == 1 and "\n" not in str(caught[0].message), [str(w.message) for w in caught]
    return read, str(caught[0].message)


def test_easyedit_rome_file_is_read_as_it_is():
    read, warning = _read(None, "easyedit_rome_llama-7b.yaml")
    hp = read.params
    assert read.method == "rome" and read.layers == [5] and read.key_position == "subject_last"
    assert hp.v_lr == 0.5 and hp.v_weight_decay == 1e-3 and hp.mom2_adjustment is False  # YAML's "5e-1": a number
    assert hp.v_num_grad_steps == 25 and hp.context_template_length_params == [[5, 10], [10, 10]]
    for key in ("model_name", "device", "stats_dir", "mom2_dataset", "rewrite_module_tmp", "v_loss_layer",
                "model_parallel"):
        assert key in read.ignored and key in warning
    assert "own key statistics" in read.ignored["mom2_dataset"]
    assert "adapter" in read.ignored["rewrite_module_tmp"]
    assert "layers" not in read.ignored and "alg_name" not in read.ignored


@pytest.mark.parametrize("name, method, check", [
    ("easyedit_r-rome_llama-7b.yaml", "rome", lambda hp: hp.v_num_grad_steps == 25),
    ("easyedit_memit_llama-7b.yaml", "memit", lambda hp: hp.mom2_update_weight == 15000 and not hp.nullspace),
    ("easyedit_alphaedit_llama3-8b.yaml", "memit",
     lambda hp: hp.nullspace and hp.L2 == 1.0 and hp.nullspace_threshold == 0.02 and hp.v_lr == 0.1),
    ("easyedit_ft_llama-7b.yaml", "ft", lambda hp: hp.norm_constraint == float("inf") and hp.lr == 5e-4),
])
def test_easyedit_files_of_every_method_are_read(name, method, check):
    read, _ = _read(None, name)
    assert read.method == method and check(read.params), read


@pytest.mark.parametrize("name, method, layers", [
    ("rome_gpt2-xl.json", "rome", [17]), ("memit_gpt-j-6B.json", "memit", [3, 4, 5, 6, 7, 8]),
    ("rome_ft_gpt2-xl_constr.json", "ft", [0]),
])
def test_rome_and_memit_json_files_are_read(name, method, layers):
    read, _ = _read(method, name)  # these files name no algorithm: the caller's method applies
    assert read.method is None and read.layers == layers
    assert type(read.params).__name__.lower().startswith(method)


def test_hparams_that_ask_for_something_else_are_refused(tmp_path):
    with pytest.raises(EditError, match="holds memit hyper-parameters, but method='rome'"):
        read_hparams("rome", DATA / "easyedit_memit_llama-7b.yaml")
    cases = [({"alg_name": "EMMET"}, "locedit implements"), ({"fact_token": "last"}, "fact_token 'last'"),
             ({"v_lr": "fast"}, "v_lr must be a float"), ({"v_lrr": 1}, "unknown rome hyper-parameter"),
             ({"layer_selection": "random"}, "layer_selection='random' is not supported"),
             ({"layers": [1.5]}, "layers must be"), ({"mom2_adjustment": "yes"}, "must be a bool")]
    for data, message in cases:
        with pytest.raises(EditError, match=message):
            read_hparams("rome" if "layer_selection" not in data else "memit", data)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(EditError, match="not valid YAML"):
        read_hparams("rome", bad)


def test_an_easyedit_file_drives_an_edit(lm):
    original = _weights(lm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InterventionError, match="layer 5 does not exist"):  # the file's layers are used
            locedit.edit(lm, EditRequest(FACT, NEW), hparams=DATA / "easyedit_rome_llama-7b.yaml")
        e = locedit.edit(lm, EditRequest(FACT, NEW), layers=[1],
                         hparams=DATA / "easyedit_rome_llama-7b.yaml")
    try:
        assert e.method == "rome" and e.layers == [1] and e.sites["key_position"] == "subject_last"
        assert e.hparams["v_weight_decay"] == 1e-3 and e.hparams["mom2_adjustment"] is False
        assert e.hparams_ignored["layers"] == "layers= given to edit" and "model_name" in e.hparams_ignored
        assert "model_name" in e.to_dict()["hparams_ignored"]
    finally:
        e.revert()
    assert _same(lm, original)


# --- 4. the edit API ---------------------------------------------------------------------------------------------
def test_edit_takes_edit_requests_only(lm):
    original = _weights(lm)
    with pytest.raises(EditError, match=r"EditRequest\(fact, ' Rome'\)"):
        locedit.edit(lm, FACT, " Rome", layers=[1])
    with pytest.raises(EditError, match="EditRequest"):
        locedit.edit(lm, FACT, layers=[1])
    with pytest.raises(EditError, match="request 1 is a Fact"):
        locedit.edit(lm, [EditRequest(FACT, NEW), FACT], layers=[1])
    with pytest.raises(EditError, match="no edit requests"):
        locedit.edit(lm, [], layers=[1])
    with pytest.raises(InterventionError, match="layer 9 does not exist"):
        locedit.edit(lm, EditRequest(FACT, NEW), layers=[9], key_position="subject_last")
    with pytest.raises(InterventionError, match="L1H7 does not exist"):
        locedit.edit(lm, EditRequest(FACT, NEW), method="head", heads=["L1H7"], key_position="subject_last")
    with pytest.raises(HeadSpecError):
        locedit.edit(lm, EditRequest(FACT, NEW), method="head", heads=["head one"], key_position="subject_last")
    assert not hasattr(locedit, "edit_many") and _same(lm, original)


def test_heads_are_parsed_and_edits_are_results(lm, tmp_path):
    e = locedit.edit(lm, EditRequest(FACT, NEW), method="head", heads=["L3H0", "3.1", (3, 2)],
                     key_position="subject_last", hparams={"mode": "out", "context_template_length_params": [],
                                                           "v_num_grad_steps": 3})
    try:
        assert e.sites["heads"] == [[3, 0], [3, 1], [3, 2]] and e.layers == [3]
        assert isinstance(e, Result) and e.target_sources == ["given"]
        d = e.to_dict()
        assert d["applied"] is True and d["method"] == "head" and json.dumps(d)
        assert "head edit of 1 fact(s)" in e.summary() and "Eiffel" in e._repr_html_()
    finally:
        e.revert()
    load_edit(e.save(tmp_path / "h"))


def test_a_sequence_is_one_joint_memit_edit(lm):
    e = locedit.edit(lm, [EditRequest(FACT, NEW), EditRequest(OTHER, " city")], layers=[1, 2],
                     key_position="subject_last", hparams={**FAST, "v_num_grad_steps": 3})
    try:
        assert e.method == "memit" and len(e.facts) == 2 and e.new_targets == [NEW, " city"]
        assert e.target_sources == ["given", "given"]
    finally:
        e.revert()


def test_cli_edit_reads_an_easyedit_file(lm, tmp_path, capsys):
    from locedit.cli.main import main

    model_dir = tmp_path / "tiny"
    lm.model.save_pretrained(str(model_dir))
    lm.tokenizer.save_pretrained(str(model_dir))
    out = tmp_path / "edit"
    code = main(["edit", "--model", str(model_dir), "--subject", FACT.subject, "--prompt", FACT.prompt,
                 "--target", FACT.target, "--new-target", NEW, "--layers", "1",
                 "--hparams", str(DATA / "easyedit_rome_llama-7b.yaml"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    # the CLI prints library warnings as one `locedit: warning:` line each: one line lists the ignored keys
    assert sum(line.startswith("locedit: warning:") and "ignored" in line for line in err.splitlines()) == 1
    saved = load_edit(out)
    assert saved.method == "rome" and saved.layers == [1] and saved.hparams["v_weight_decay"] == 1e-3
    assert "device" in saved.hparams_ignored and saved.sites["key_position"] == "subject_last"

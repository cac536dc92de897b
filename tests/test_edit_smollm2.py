"""The issue's acceptance edit on the real SmolLM2 weights: Eiffel Tower -> Rome where `edit` puts it by default
(SmolLM2's weights have a calibration shipped with locedit; the located site is tested in test_verify_smollm2)."""

import pytest
import torch

import locedit
from locedit import Fact

PARAPHRASES = ["The Eiffel Tower can be found in the city of", "The city that is home to the Eiffel Tower is",
               "The Eiffel Tower is a famous landmark in the city of"]


def _top(lm, prompt: str, subject: str) -> str:
    return lm.predict(Fact(subject, prompt))[0].token


@pytest.fixture(scope="module")
def located_edit(smollm2, eiffel):
    before = {n: p.detach().clone() for n, p in smollm2.model.named_parameters()}
    # everything as locate recommends: layer and key position
    edit = locedit.edit(smollm2, locedit.EditRequest(eiffel, " Rome"))
    yield edit
    if edit.is_applied:
        edit.revert()
    assert all(torch.equal(before[n], p) for n, p in smollm2.model.named_parameters())


def test_default_rome_edit_moves_the_fact_and_spares_the_louvre(smollm2, eiffel, located_edit):
    edit = located_edit
    from locedit.editing.calibration import calibration_for

    site = calibration_for(smollm2).site("rome")
    assert site is not None and edit.sites["layer_source"] == "calibrated"
    assert edit.layers == site["layers"] and edit.sites["key_position"] == site["key_position"]
    assert _top(smollm2, eiffel.prompt, eiffel.subject) == " Rome"
    moved = sum(_top(smollm2, p, "Eiffel Tower") == " Rome" for p in PARAPHRASES)
    assert moved >= 2, moved
    assert _top(smollm2, "The Louvre is located in the city of", "Louvre") == " Paris"
    with edit.reverted():
        assert _top(smollm2, eiffel.prompt, eiffel.subject) == " Paris"
    assert _top(smollm2, eiffel.prompt, eiffel.subject) == " Rome"


def test_edited_model_saves_as_a_hugging_face_directory(smollm2, eiffel, located_edit, tmp_path):
    locedit.save_model(smollm2, tmp_path / "edited")
    reloaded = locedit.load(str(tmp_path / "edited"))
    assert _top(reloaded, eiffel.prompt, eiffel.subject) == " Rome"


def test_cli_edit_on_the_built_in_model(tmp_path, capsys, located_edit):
    from locedit.cli.main import main

    located_edit.revert()  # the CLI loads its own copy; keep the session model clean for other tests
    code = main(["edit", "--model", "smollm2-135m", "--subject", "The Eiffel Tower", "--prompt",
                 "The Eiffel Tower is located in the city of", "--new-target", " Rome", "--layers", "0",
                 "--key-position", "subject_last", "--out", str(tmp_path / "edit")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "p(new ' Rome')" in printed and (tmp_path / "edit" / "edit.json").is_file()
    assert locedit.load_edit(tmp_path / "edit").model["name"] == "smollm2-135m"


def test_smollm2s_shipped_calibration_is_keyed_by_its_weights(smollm2):
    # the package's calibration file is named by the fingerprint of the weights `locedit.load` gives, and names
    # the recorded study it comes from
    from locedit.editing.calibration import PACKAGED, load_calibration
    from locedit.editing.fingerprint import weights_fingerprint

    fingerprint = weights_fingerprint(smollm2)
    path = PACKAGED / f"{fingerprint}.json"
    assert path.is_file(), fingerprint
    cal = load_calibration(path)
    assert cal.fingerprint == fingerprint and cal.site("rome") == {**cal.site("rome"), "layers": [1],
                                                                  "key_position": "subject_last"}
    assert "data/results/study/" in cal.evidence

"""LocFT-BF on tiny models: it lowers the new targets' loss, changes only one layer's MLP output projection,
reverts bit-exactly, is deterministic, works in an editing session (which resumes to the same weights) and from
the CLI on CounterFact and zsRE files."""

import json
from pathlib import Path

import pytest
import torch

import locedit
import tiny
from locedit import EditRequest, Fact
from locedit.cli.main import main
from locedit.editing import EditSession, applied_edits
from locedit.editing.hparams import read_hparams
from locedit.editing.locft import DEFAULT_DEPTH, batch_loss, locft_layer, training_rows
from locedit.errors import EditError

DATA = Path(__file__).parent / "data"
HP = {"lr": 5e-2, "num_steps": 8, "batch_size": 2}
REQUESTS = [EditRequest(Fact("Eiffel Tower", "The city of the Eiffel Tower", " Paris"), " Rome"),
            EditRequest(Fact("Colosseum", "The Colosseum is in", " Rome"), " London"),
            EditRequest(Fact("Big Ben", "Big Ben is in", " London"), " Paris"),
            EditRequest(Fact("Louvre", "The museum called the Louvre", " Paris"), " Berlin")]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))


def _weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _loss(lm, requests):
    rows = training_rows(lm, [r.fact for r in requests], [r.new_target_text() for r in requests], True)
    with torch.no_grad():
        return float(batch_loss(lm, rows))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_locft_lowers_the_target_loss_changes_one_matrix_and_reverts_bit_exactly(family):
    lm = tiny.lm(family)
    original = _weights(lm)
    before = _loss(lm, REQUESTS)
    e = locedit.edit(lm, REQUESTS, method="locft", layers=[1], hparams=HP)
    after = _loss(lm, REQUESTS)
    assert after < 0.5 * before, (before, after)
    changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, original[n])]
    assert changed == [e.deltas[0].name] and ".1." in changed[0]
    assert e.losses[0][-1] < e.losses[0][0]  # the epoch losses fall
    e.revert()
    assert all(torch.equal(original[n], p) for n, p in lm.model.named_parameters())


def test_batched_loss_equals_each_request_alone():
    lm = tiny.lm("llama")
    rows = training_rows(lm, [r.fact for r in REQUESTS], [r.new_target_text() for r in REQUESTS], True)
    with torch.no_grad():
        alone = [float(batch_loss(lm, [r])) for r in rows]
        together = float(batch_loss(lm, rows))
    assert together == pytest.approx(sum(alone) / len(alone), rel=1e-4)  # left padding changes nothing
    assert rows[0][0][-1] == lm.tokenizer.eos_token_id  # the EOS the paper's code appends


def test_locft_is_deterministic_and_its_hparams_are_read():
    lm = tiny.lm("llama")
    a = locedit.edit(lm, REQUESTS, method="locft", layers=[1], hparams=HP)
    da = a.deltas[0].dense.clone()
    a.revert()
    b = locedit.edit(lm, REQUESTS, method="locft", layers=[1], hparams=HP)
    assert torch.equal(da, b.deltas[0].dense)
    b.revert()
    # LocFT's own YAML keys: `layer` is read as the layer, paths and model names are ignored
    read = read_hparams(None, {"alg_name": "LocFT-BF", "layer": 1, "lr": 5e-4, "batch_size": 100, "num_steps": 25,
                               "rewrite_module": "model.layers.{}.mlp.down_proj.weight"}, warn=False)
    assert read.method == "locft" and read.layers == [1] and read.params.batch_size == 100
    with pytest.raises(EditError, match="unknown locft"):
        read_hparams("locft", {"v_lr": 0.1})


def test_locft_layer_defaults_to_a_fraction_of_the_depth_without_a_calibrated_site():
    lm = tiny.lm("llama")
    layer, source = locft_layer(lm)
    assert source.startswith("default") and layer == round(DEFAULT_DEPTH * (lm.num_layers - 1))
    assert source == f"default ({DEFAULT_DEPTH:.0%} of the depth)"
    e = locedit.edit(lm, REQUESTS[:2], method="locft", hparams=HP)
    assert e.layers == [layer] and e.sites["layer_source"] == source
    e.revert()


def test_a_locft_session_trains_each_chunk_and_resumes_to_the_same_weights(tmp_path):
    full = tiny.lm("llama")
    original = _weights(full)
    whole = EditSession(full, tmp_path / "full", method="locft", hparams=HP, layers=[1], batch_size=2)
    report = whole.run(REQUESTS)
    assert (report.position, report.edited, report.skipped) == (4, 4, 0)
    expected = _weights(full)
    assert _loss(full, REQUESTS) < 0.7 * _loss(tiny.lm("llama"), REQUESTS)

    lm = tiny.lm("llama")
    first = EditSession(lm, tmp_path / "run", method="locft", hparams=HP, layers=[1], batch_size=2)
    assert first.run(REQUESTS, limit=2).position == 2
    lm = tiny.lm("llama")  # a fresh process
    report = EditSession(lm, tmp_path / "run", method="locft", hparams=HP, layers=[1], batch_size=2).run(REQUESTS)
    assert (report.resumed_from, report.position) == (2, 4)
    assert all(torch.equal(expected[n], p) for n, p in lm.model.named_parameters())

    assert len(applied_edits(full)) == 1
    whole.revert()
    assert all(torch.equal(original[n], p) for n, p in full.model.named_parameters())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.mark.parametrize("facts", ["counterfact_easyedit_sample.json", "zsre_mend_sample.json"])
def test_cli_sequential_locft_on_counterfact_and_zsre_files(tmp_path, model_dir, capsys, facts):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(HP))
    out = tmp_path / "out"
    args = ["edit", "--model", str(model_dir), "--facts", str(DATA / facts), "--sequential", "--method", "locft",
            "--layers", "1", "--batch-size", "2", "--hparams", str(hp), "--out", str(out)]
    assert main(args) == 0
    n = len(locedit.core.datasets.read_facts(DATA / facts).facts)
    assert f"{n}/{n} requests ({n} edited" in capsys.readouterr().out
    settings = json.loads((out / "session.json").read_text())
    assert settings["method"] == "locft" and settings["batch_size"] == 2
    assert main(args) == 0 and f"resumed at {n}" in capsys.readouterr().out

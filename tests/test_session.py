"""Editing sessions on tiny models: a session equals its edits applied one by one, reverts bit-exactly, resumes
after a stop or a kill without a lost or repeated edit, survives SIGINT, refuses corrupt checkpoints; the CLI on
small CounterFact and zsRE files."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import locedit
import tiny
from locedit import EditRequest, Fact
from locedit.cli.main import main
from locedit.core.datasets import read_facts
from locedit.editing import applied_edits
from locedit.editing import EditSession
from locedit.editing.session import CHECKPOINT_NAME, compact_keys
from locedit.errors import CheckpointError, EditError

DATA = Path(__file__).parent / "data"
FAST = {"v_lr": 0.5, "v_num_grad_steps": 10, "clamp_norm_factor": 10, "context_template_length_params": [[3, 2]]}
# the tiny model's key covariance has no small eigenvalues: a threshold that keeps the whole space, as test_edit does
ALPHA = {**FAST, "nullspace": True, "nullspace_threshold": 1e9, "L2": 1e-2}
FACTS = [Fact("Eiffel Tower", "The city of the Eiffel Tower", " Paris"),
         Fact("Louvre", "The museum called the Louvre", " Paris"),
         Fact("Colosseum", "The Colosseum is in", " Rome"),
         Fact("Big Ben", "Big Ben is in", " London"),
         Fact("Tower Bridge", "Tower Bridge is in", " London"),
         Fact("Apple", "Beats Music is owned by Apple", " Music")]
REQUESTS = [EditRequest(f, t) for f, t in zip(FACTS, [" the", " Rome", " London", " Paris", " Rome", " city"])]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))


def _weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _max_diff(a, b) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _session(lm, out, **kw):
    kw.setdefault("method", "memit")
    kw.setdefault("hparams", ALPHA if kw["method"] == "memit" else FAST)
    kw.setdefault("layers", [1, 2] if kw["method"] == "memit" else [1])
    return EditSession(lm, out, **kw)


@pytest.mark.parametrize("method,batch", [("memit", 2), ("rome", 1)])
def test_a_session_equals_its_edits_one_by_one_and_reverts_bit_exactly(tmp_path, method, batch):
    lm = tiny.lm("llama")
    original = _weights(lm)
    requests = REQUESTS[:4]
    session = _session(lm, tmp_path / "s", method=method, batch_size=batch, checkpoint_every=2)
    report = session.run(requests)
    assert (report.position, report.edited, report.skipped, report.interrupted) == (4, 4, 0, False)
    assert len(applied_edits(lm)) == 1  # one cumulative edit on the model
    in_session = _weights(lm)
    session.revert()
    assert all(torch.equal(original[n], p) for n, p in lm.model.named_parameters())
    assert applied_edits(lm) == []

    hp, layers = (ALPHA, [1, 2]) if method == "memit" else (FAST, [1])
    for i in range(0, len(requests), batch):  # the same edits stacked one on another
        chunk = requests[i:i + batch]
        locedit.edit(lm, chunk if method == "memit" else chunk[0], method=method, layers=layers, hparams=hp)
    assert _max_diff(in_session, _weights(lm)) < 1e-6
    assert _max_diff(in_session, original) > 1e-3  # the session did change the model

    rows = session.log.read()[0]
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"]
    assert {r["status"] for r in rows} == {"edited"} and rows[-1]["batch"] == (3 // batch)


def test_resume_after_a_stop_and_after_a_kill_loses_and_repeats_nothing(tmp_path):
    full = tiny.lm("llama")
    _session(full, tmp_path / "full", batch_size=2).run(REQUESTS)
    expected = _weights(full)

    out = tmp_path / "run"
    lm = tiny.lm("llama")
    assert _session(lm, out, batch_size=2, checkpoint_every=2).run(REQUESTS, limit=2).position == 2
    saved = (out / CHECKPOINT_NAME).read_bytes()
    # a kill after two more edits were logged but before their checkpoint: the old checkpoint, four log rows
    lm = tiny.lm("llama")
    _session(lm, out, batch_size=2, checkpoint_every=2).run(REQUESTS, limit=4)
    (out / CHECKPOINT_NAME).write_bytes(saved)

    lm = tiny.lm("llama")  # a fresh process: the unedited model
    report = _session(lm, out, batch_size=2, checkpoint_every=2).run(REQUESTS)
    assert (report.resumed_from, report.redone, report.position, report.edited) == (2, 2, 6, 4)
    ids = [r["id"] for r in _session(lm, out).log.read()[0]]
    assert ids == [str(i) for i in range(6)]  # no duplicate, none lost
    assert _max_diff(expected, _weights(lm)) < 1e-6


def test_the_same_session_object_continues_and_refuses_other_requests(tmp_path):
    lm = tiny.lm("llama")
    session = _session(lm, tmp_path / "s", batch_size=2)
    assert session.run(REQUESTS, limit=2).position == 2
    with pytest.raises(CheckpointError, match="other requests"):
        session.run(REQUESTS[1:])
    report = session.run(REQUESTS)
    assert (report.resumed_from, report.position, report.edited) == (2, 6, 4)
    full = tiny.lm("llama")
    _session(full, tmp_path / "full", batch_size=2).run(REQUESTS)
    assert _max_diff(_weights(full), _weights(lm)) < 1e-6


def test_a_resume_refuses_other_requests_settings_models_and_corrupt_checkpoints(tmp_path):
    out = tmp_path / "run"
    _session(tiny.lm("llama"), out, batch_size=2).run(REQUESTS[:2])
    with pytest.raises(CheckpointError, match="another run .*requests_sha256"):
        _session(tiny.lm("llama"), out, batch_size=2).run(REQUESTS[1:3])
    with pytest.raises(CheckpointError, match="batch_size"):
        _session(tiny.lm("llama"), out, batch_size=1).run(REQUESTS[:2])
    with pytest.raises(CheckpointError, match="needs the unedited model"):
        _session(tiny.lm("llama", seed=1), out, batch_size=2).run(REQUESTS[:2])
    edited = tiny.lm("llama")
    locedit.edit(edited, REQUESTS[5], method="rome", layers=[1], hparams=FAST)
    with pytest.raises(EditError, match="already carries locedit edits"):
        _session(edited, out, batch_size=2).run(REQUESTS[:2])

    log = out / "log.jsonl"
    rows = log.read_text().splitlines()
    log.write_text(rows[0] + "\n")  # a log shorter than its checkpoint
    lm = tiny.lm("llama")
    before = _weights(lm)
    with pytest.raises(CheckpointError, match="log was truncated"):
        _session(lm, out, batch_size=2).run(REQUESTS[:2])
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters()) and applied_edits(lm) == []
    log.write_text("\n".join(rows) + "\n")

    path = out / CHECKPOINT_NAME
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(8 * [0x7F])  # flip the last tensor bytes: the checksum catches it
    path.write_bytes(bytes(data))
    lm = tiny.lm("llama")
    before = _weights(lm)
    with pytest.raises(CheckpointError, match="is corrupt") as info:
        _session(lm, out, batch_size=2).run(REQUESTS[:2])
    assert "\n" not in str(info.value) and "checksum" in str(info.value)
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())  # untouched
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="is corrupt"):
        _session(lm, out, batch_size=2).run(REQUESTS[:2])


def test_without_layers_one_locate_fixes_the_sites_for_the_session(tmp_path):
    from locedit.editing.api import located_sites

    lm = tiny.lm("llama")
    layers, rule = located_sites(lm, REQUESTS[2].fact, "rome")  # locate needs a relation after the subject
    report = EditSession(lm, tmp_path / "s", method="rome", hparams=FAST).run(REQUESTS[2:4])
    assert report.layers == layers and report.edited == 2
    assert applied_edits(lm)[0].sites == {"layers": layers, "key_position": rule}


def test_requests_that_cannot_be_edited_are_logged_as_skipped(tmp_path):
    lm = tiny.lm("llama")
    top = lm.predict(FACTS[0])[0].token
    same = EditRequest(FACTS[0], top if top.strip() else " Paris")  # the model already gives it
    if not top.strip():
        same = EditRequest(Fact(FACTS[0].subject, FACTS[0].prompt, None), " Paris")  # its top-1 is blank
    report = _session(lm, tmp_path / "s", batch_size=2).run([REQUESTS[1], same, REQUESTS[2]])
    assert (report.edited, report.skipped) == (2, 1)
    rows = {r["id"]: r for r in EditSession(lm, tmp_path / "s").log.read()[0]}
    assert rows["1"]["status"] == "skipped" and rows["1"]["reason"]
    assert "already predicts" in rows["1"]["reason"] or "blank token" in rows["1"]["reason"]
    assert rows["0"]["status"] == rows["2"]["status"] == "edited"


def test_compacted_keys_keep_their_second_moment():
    keys = torch.randn(8, 40, generator=torch.Generator().manual_seed(0))
    small = compact_keys(keys)
    assert small.shape == (8, 8)
    assert torch.allclose(small.double() @ small.double().T, keys.double() @ keys.double().T, rtol=1e-5, atol=1e-4)
    assert torch.equal(compact_keys(keys[:, :16]), keys[:, :16])  # at most 2·d_k columns: kept as they are


def test_session_arguments_are_checked():
    lm = tiny.lm("llama")
    with pytest.raises(EditError, match="batch_size must be 1"):
        EditSession(lm, "unused", method="rome", batch_size=4)
    with pytest.raises(EditError, match="one of memit, locft, rome, ft"):
        EditSession(lm, "unused", method="head")


CHILD = textwrap.dedent("""
    import os, signal, sys
    import tiny, test_session as t
    import locedit.editing.session as session_module
    real, calls, mode = session_module.edit, [0], sys.argv[2]

    def interrupting(*args, **kwargs):  # Ctrl-C while the third batch is being edited
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        result = real(*args, **kwargs)
        if calls[0] == 3 and mode == "twice":  # again, after the batch was applied: it is rolled back
            os.kill(os.getpid(), signal.SIGINT)
        return result

    session_module.edit = interrupting
    session = t._session(tiny.lm("llama"), sys.argv[1], batch_size=1, checkpoint_every=100)
    try:
        report = session.run(t.REQUESTS)
    except KeyboardInterrupt:
        sys.exit(131)
    sys.exit(130 if report.interrupted else 0)
""")


@pytest.mark.slow  # a fresh interpreter per run
@pytest.mark.parametrize("mode,code,position", [("once", 130, 3), ("twice", 131, 2)])
def test_sigint_finishes_or_rolls_back_the_batch_and_the_run_resumes(tmp_path, mode, code, position):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", CHILD, str(out), mode], env=env, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == code, child.stderr
    rows = EditSession(tiny.lm("llama"), out).log.read()[0]
    assert [r["id"] for r in rows] == [str(i) for i in range(position)]  # the log stops where the checkpoint does

    lm = tiny.lm("llama")
    report = _session(lm, out, batch_size=1).run(REQUESTS)
    assert (report.resumed_from, report.redone, report.position) == (position, 0, 6)
    assert [r["id"] for r in _session(lm, out).log.read()[0]] == [str(i) for i in range(6)]
    full = tiny.lm("llama")
    _session(full, tmp_path / "full", batch_size=1).run(REQUESTS)
    assert _max_diff(_weights(full), _weights(lm)) < 1e-6


def test_zsre_rows_read_as_question_facts():
    facts = read_facts(DATA / "zsre_mend_sample.json")
    assert facts.format == "zsre" and len(facts.facts) == 4 and not facts.errors
    first = facts.facts[0]
    assert (first.subject, first.prompt, first.target) == ("UniFirst", "What is the product made by UniFirst?",
                                                           "uniform")
    assert first.meta["target_new"] == "unmanned aircraft"
    assert first.meta["paraphrases"] == ["What will be the product of UniFirst?"]
    assert first.meta["neighborhood_targets"] == ["Walter Sobchak"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("tiny-llama"), "llama")


def _cli(model_dir, facts, out, *extra):
    return main(["edit", "--model", str(model_dir), "--facts", str(facts), "--sequential", "--out", str(out),
                 *map(str, extra)])


def test_cli_sequential_on_counterfact_and_zsre_files_resumes(tmp_path, model_dir, capsys):
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({k: v for k, v in ALPHA.items() if k != "nullspace"}))  # AlphaEdit is the default
    out = tmp_path / "cf"
    args = ["--layers", 1, 2, "--batch-size", 2, "--checkpoint-every", 2, "--hparams", hp, "--limit", 4]
    assert _cli(model_dir, DATA / "counterfact_easyedit_sample.json", out, *args, "--save-model",
                tmp_path / "model") == 0
    assert "4/4 requests (4 edited" in capsys.readouterr().out
    settings = json.loads((out / "session.json").read_text())
    assert settings["method"] == "memit" and settings["hparams"]["nullspace"] is True
    assert (tmp_path / "model" / "config.json").exists()
    assert _cli(model_dir, DATA / "counterfact_easyedit_sample.json", out, *args) == 0
    assert "resumed at 4" in capsys.readouterr().out
    assert len((out / "log.jsonl").read_text().splitlines()) == 4

    rome = tmp_path / "rome.json"
    rome.write_text(json.dumps(FAST))
    out = tmp_path / "zsre"
    assert _cli(model_dir, DATA / "zsre_mend_sample.json", out, "--method", "rome", "--layers", 1, "--hparams",
                rome) == 0
    rows = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["new_target"] for r in rows] == [f.meta["target_new"]
                                               for f in read_facts(DATA / "zsre_mend_sample.json").facts]


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "2"], "--batch-size applies only with --sequential"),
    (["--sequential", "--method", "rome", "--batch-size", "2"], "--batch-size must be 1"),
    (["--sequential", "--method", "head"], "--sequential edits with memit, locft, rome, ft"),
])
def test_cli_sequential_usage_errors(tmp_path, model_dir, capsys, extra, message):
    code = main(["edit", "--model", str(model_dir), "--facts", str(DATA / "zsre_mend_sample.json"),
                 "--out", str(tmp_path / "o"), *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

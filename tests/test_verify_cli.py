"""`locedit verify` and `locedit evaluate` on a small local model: the before/after report in Chromium, another
model's edit refused with exit 2, a fact file with a missing field, and a two-worker evaluation."""

import json
import re
import subprocess
import sys

import pytest

import tiny
from locedit import Fact
from locedit.cli.main import main
from locedit.localization.runner import read_lines
from test_cli import render_check

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("tiny-llama"), "llama", "metaspace")


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-other")
    tiny.model("llama", seed=1).save_pretrained(path)
    tiny.tokenizer("metaspace").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved_edit(model_dir, tmp_path_factory):
    import locedit

    lm = locedit.load(str(model_dir))
    fact = Fact("Eiffel Tower", PROMPT, lm.predict(Fact("Eiffel Tower", PROMPT))[0].token)
    edit = locedit.edit(lm, locedit.EditRequest(fact, " guitar"), layers=[0], key_position="subject_last")
    path = tmp_path_factory.mktemp("edit") / "eiffel"
    edit.save(path)
    edit.revert()
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "locedit.cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def one_error_line(result, pattern):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.splitlines() if l.startswith("locedit: error")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_verify_writes_summary_json_and_report(tmp_path, model_dir, saved_edit, capsys):
    out = tmp_path / "verified"
    code = main(["verify", "--edit", str(saved_edit), "--model", str(model_dir), "--out", str(out),
                 "--neighbor", "The Louvre is in", "--paraphrase", "Eiffel Tower is in the city of"])
    printed = capsys.readouterr().out
    assert "behaviour (before -> after)" in printed and "mechanism:" in printed and "report:" in printed
    d = json.loads((out / "verification.json").read_text())
    assert code == (0 if d["passed"] else 1) == d["verdict"]["exit_status"]  # the status follows the verdict
    assert "verdict (behaviour)" in printed and "verdict (mechanism)" in printed
    assert d["behaviour"]["per_fact"][0]["neighborhood"] == [["The Louvre is in", d["facts"][0]["true_target"]]]
    assert set(d["mechanism"]) >= {"knockout", "extraction", "enrichment", "locality"}
    assert (out / "figures" / "verification.png").exists()
    html = (out / "report.html").read_text()
    assert "Behaviour" in html and "Mechanism" in html and "data:image/png;base64," in html
    assert "http" not in html.split("<body>")[1]
    render_check(out / "report.html", tmp_path)


@pytest.mark.slow  # a fresh interpreter per call (the real entry point, exit status and stderr)
def test_verify_refuses_another_models_edit(other_model_dir, saved_edit, tmp_path, capsys):
    one_error_line(run_cli("verify", "--edit", saved_edit, "--model", other_model_dir, "--out", tmp_path / "o"),
                   "other weights|another model")
    assert main(["verify", "--edit", str(tmp_path / "nope"), "--model", str(other_model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("locedit: error") == 1 and "does not exist" in err


@pytest.mark.slow  # a fresh interpreter per call (the real entry point, exit status and stderr)
def test_evaluate_fact_file_with_missing_field(tmp_path, model_dir):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": PROMPT, "target_new": "Rome"}) + "\n"
                     + json.dumps({"id": "b", "subject": "Big Ben", "target_new": "Rome"}) + "\n")
    result = run_cli("evaluate", "--facts", facts, "--model", model_dir, "--out", tmp_path / "o")
    assert "line 1 (id 0): missing field 'subject'" in result.stderr
    assert "line 2 (id b): missing field 'prompt'" in result.stderr
    one_error_line(result, "no usable facts")


@pytest.mark.slow  # a fresh interpreter per call (the real entry point, exit status and stderr)
def test_evaluate_two_workers(tmp_path, model_dir, capsys):
    rows = [{"id": f"f{i}", "subject": s, "prompt": p, "target_new": "guitar", "relation": r,
             "neighborhood": ["The Louvre is in"]}
            for i, (s, p, r) in enumerate([("Eiffel Tower", PROMPT, "P1"), ("Big Ben", "Big Ben is in", "P1"),
                                           ("Colosseum", "The Colosseum is in", "P2")])]
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    result = run_cli("evaluate", "--facts", facts, "--model", model_dir, "--method", "rome", "--layers", "0",
                     "--jobs", "2", "--out", out, "--no-mechanism")
    assert result.returncode == 0, result.stderr[-3000:]
    lines, _ = read_lines(out / "results.jsonl")
    assert sorted(l["id"] for l in lines) == ["f0", "f1", "f2"]
    assert not list(out.glob("results.w*.jsonl"))
    agg = json.loads((out / "aggregate.json").read_text())
    assert agg["n"] + agg["errors"] == 3 and agg["counts"]["given"] == 3
    assert "| metric | mean |" in result.stdout
    render_check(out / "report.html", tmp_path)
    # a second run resumes: nothing is redone
    assert main(["evaluate", "--facts", str(facts), "--model", str(model_dir), "--method", "rome", "--layers", "0",
                 "--out", str(out), "--no-mechanism"]) == 0
    assert "'already_done': 3" in capsys.readouterr().out
    assert len(read_lines(out / "results.jsonl")[0]) == 3

"""The command line: user-error paths, a locate run on a small local model, and the HTML report in Chromium."""

import json
import re
import subprocess
import sys

import pytest

import tiny
from conftest import require_chromium
from locedit.cli.main import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("tiny-llama"), "llama", "metaspace")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "locedit.cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow  # a fresh interpreter per call (the real entry point, exit status and stderr)
@pytest.mark.parametrize("args,message", [
    (["locate", "--subject", "Louvre", "--prompt", "The Eiffel Tower is in"], "does not occur in prompt"),
    (["locate", "--prompt", "The Eiffel Tower is in"], "give --subject and --prompt"),
    (["locate", "--model", "/nonexistent/model.gguf", "--subject", "A", "--prompt", "A is"], "not found"),
    (["analyze", "knockout", "--facts", "/nonexistent.jsonl"], "not found|does not exist|cannot"),
    (["facts", "--relation", "no_such_relation"], "no facts with relation"),
])
def test_user_errors_are_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.startswith("locedit: error")]
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # a fresh interpreter per call (the real entry point, exit status and stderr)
def test_bad_subcommand_and_help():
    assert run_cli("frobnicate").returncode == 2
    help_text = run_cli("locate", "--help").stdout
    for flag in ("--model", "--subject", "--prompt", "--target", "--facts", "--only-known", "--out", "--samples"):
        assert flag in help_text
    assert "knockout" in run_cli("analyze", "--help").stdout


@pytest.mark.slow  # a fresh interpreter per call (the real entry point, exit status and stderr)
def test_corrupt_fact_file(tmp_path, model_dir):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = run_cli("analyze", "knockout", "--model", model_dir, "--facts", bad, "--out", tmp_path / "o")
    assert result.returncode == 2 and "bad.json" in result.stderr and "Traceback" not in result.stderr


def test_locate_writes_sites_figures_and_report(tmp_path, model_dir):
    out = tmp_path / "out"
    code = main(["locate", "--model", str(model_dir), "--subject", "Eiffel Tower",
                 "--prompt", "The Eiffel Tower is located in the city of", "--out", str(out)])
    assert code == 0
    sites = json.loads((out / "sites.json").read_text())
    assert sites["mlp_layers"] and sites["heads"]
    assert set(sites["mlp_layers"][0]) >= {"layer", "score"} and set(sites["heads"][0]) >= {"layer", "head", "score"}
    scores = [m["score"] for m in sites["mlp_layers"]]
    assert scores == sorted(scores, reverse=True)
    assert (out / "figures" / "sitemap.png").exists() and (out / "figures" / "sitemap.svg").exists()
    html = (out / "report.html").read_text()
    assert "<table>" in html and "data:image/png;base64," in html and "http" not in html.split("<body>")[1]
    render_check(out / "report.html", tmp_path)


@pytest.mark.slow  # a fresh interpreter per call (the real entry point, exit status and stderr)
def test_locate_dataset_mode(tmp_path, model_dir):
    facts = tmp_path / "facts.jsonl"
    rows = [{"known_id": i, "subject": s, "prompt": p, "attribute": a} for i, (s, p, a) in enumerate([
        ("Eiffel Tower", "The Eiffel Tower is located in the city of", "Paris"),
        ("Rome", "Rome is the capital of", "Italy"),
        ("Nowhere", "The Louvre is in", "Paris"),  # bad row: subject not in prompt
    ])]
    facts.write_text(json.dumps(rows))
    out = tmp_path / "ds"
    result = run_cli("locate", "--model", model_dir, "--facts", facts, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "subject 'Nowhere' does not occur" in result.stderr
    lines = (out / "sites.jsonl").read_text().splitlines()
    assert len(lines) == 2
    aggregate = json.loads((out / "aggregate.json").read_text())
    assert aggregate["n"] == 2 and sum(aggregate["top_mlp_layer"].values()) == 2
    render_check(out / "report.html", tmp_path)


def render_check(report, tmp_path):
    """Headless Chromium loads the page from disk: no JavaScript errors, every embedded image decodes."""
    chromium = require_chromium()  # skipped locally without it, a failure in CI
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000",
         "--enable-logging=stderr", "--v=0", "--dump-dom", f"file://{report.resolve()}"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    total = re.search(r'data-images-total="(\d+)"', dom)
    ok = re.search(r'data-images-ok="(\d+)"', dom)
    assert total and ok, "the page's load script did not run"
    assert int(total.group(1)) >= 1 and ok.group(1) == total.group(1)
    assert "Uncaught" not in result.stderr

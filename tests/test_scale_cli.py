"""Dataset mode of `locedit analyze`: the paper's figure next to the JSONL and aggregate, and a progress bar also
when stderr is not a terminal."""

import json
import subprocess
import sys

import pytest

import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.mark.slow  # a fresh interpreter per call (the real entry point, exit status and stderr)
def test_analyze_knockout_dataset_writes_figure_and_logs_progress(tmp_path, model_dir):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([
        {"known_id": 0, "subject": "Eiffel Tower", "prompt": "The Eiffel Tower is located in the city of",
         "attribute": "Paris"},
        {"known_id": 1, "subject": "Rome", "prompt": "Rome is the capital of", "attribute": "Italy"},
        {"known_id": 2, "subject": "Beats Music", "prompt": "Beats Music is owned by", "attribute": "Apple"},
    ]))
    out = tmp_path / "o"
    result = subprocess.run([sys.executable, "-m", "locedit.cli.main", "analyze", "knockout", "--model", str(model_dir),
                             "--facts", str(facts), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert len((out / "knockout.jsonl").read_text().splitlines()) == 3
    aggregate = json.loads((out / "knockout_aggregate.json").read_text())
    assert aggregate["attention_knockout"]["n"] == 3
    assert (out / "knockout.png").stat().st_size > 1000 and (out / "knockout.svg").exists()
    assert "3/3" in result.stderr  # the bar's final state, although stderr is a pipe


def test_dataset_figure_for_each_analysis_with_one():
    from locedit.localization.runner import dataset_figure

    ko = {"analysis": "attention_knockout", "window": 3, "relative_change": {"subject": [-1.0, -5.0, 0.0],
                                                                              "last": [0.0, 1.0, 2.0]}}
    fig = dataset_figure([ko, ko], {})
    assert fig is not None and "n=2" in fig.axes[0].get_title()
    assert dataset_figure([{"analysis": "causal_trace"}], {}) is None
    assert dataset_figure([], {}) is None

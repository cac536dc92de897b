"""`Evaluation` is a `Result`: to_dict, summary, plot, save, _repr_html_ (synthetic result lines, no model)."""

import json

import matplotlib

matplotlib.use("Agg")

from locedit.core.results import Result  # noqa: E402
from locedit.verification.evaluate import Evaluation, aggregate, evaluation_lines, results_store  # noqa: E402


def _line(i, es, ps, ns):
    score = 3 / (1 / es + 1 / ps + 1 / ns) if min(es, ps, ns) > 0 else 0.0
    return {"id": f"f{i}", "fact": {"relation": "r1" if i % 2 else "r2"},
            "result": {"behaviour": {"efficacy_score": es, "paraphrase_score": ps, "neighborhood_score": ns,
                                     "score": score}}}


def test_evaluation_is_a_result(tmp_path):
    lines = [_line(i, 1.0, 0.5 + 0.1 * i, 0.8) for i in range(4)]
    counts = {"given": 5, "evaluated": 4, "errors": 0}
    ev = Evaluation(tmp_path, lines, aggregate(lines, counts), counts)
    assert isinstance(ev, Result)
    data = ev.to_dict()
    assert data["counts"] == counts and data["aggregate"]["overall"]["efficacy_score"]["mean"] == 1.0
    text = ev.summary()
    assert "4 facts edited, 0 errors" in text and "efficacy_score 1.000 [1.000, 1.000]" in text
    assert json.loads(ev.save(tmp_path / "ev.json").read_text())["aggregate"]["n"] == 4
    assert "<b>Evaluation</b>" in ev._repr_html_()
    fig = ev.plot()
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["efficacy_score", "paraphrase_score", "neighborhood_score", "score"]
    assert "| efficacy_score |" in ev.table()


def test_sequential_evaluation_summary_and_curve(tmp_path):
    points = [{"edits": 0, "edit_efficacy": None, "probe_accuracy": 1.0, "probe_top1": 1.0, "perplexity": 20.0},
              {"edits": 5, "edit_efficacy": 0.8, "probe_accuracy": 0.9, "probe_top1": 0.9, "perplexity": 22.0}]
    ev = Evaluation(tmp_path, [], {"sequential": points}, {"edited": 5}, sequential=points)
    assert "after 5 edits, edit efficacy 0.800, probe accuracy 0.900" in ev.summary()
    assert ev.to_dict()["sequential"][1]["edits"] == 5 and ev.table() == ""
    assert ev.plot() is not None


def test_evaluation_lines_read_through_the_store(tmp_path):
    store = results_store(tmp_path)
    store.append(_line(0, 1.0, 1.0, 1.0))
    store.path.write_text(store.path.read_text() + '{"id": "f1", "fa')   # interrupted
    assert [l["id"] for l in evaluation_lines(tmp_path)] == ["f0"]
    assert store.shard(3).path.name == "results.w3.jsonl"

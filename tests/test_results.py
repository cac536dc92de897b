"""One result interface (issue #15): every analysis result, `SiteMap` and `Verification` is a
`locedit.core.results.Result` with `to_dict()`, `save(path)`, `plot(ax=None)`, `summary()` and `_repr_html_()`,
and each summary says something the result's numbers decide."""

import html
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tiny  # noqa: E402
from locedit import Fact, Head  # noqa: E402
from locedit.core.results import Result  # noqa: E402
from locedit.localization import (attention_knockout, attribute_rate, causal_trace, extraction_events,  # noqa: E402
                                  head_effects, head_projection, knockout_map, locate, state_patching,
                                  sublayer_knockout)
from locedit.localization.attributes import AttributeSet  # noqa: E402

FACT = Fact("Eiffel Tower", "The Eiffel Tower is located in the city of")
ATTRS = AttributeSet(FACT.subject, frozenset({" Paris", " France", " Tower"}), "given")
ANALYSES = [(attention_knockout, {"window": 3}), (knockout_map, {"window": 3}), (causal_trace, {"samples": 2}),
            (head_effects, {}), (head_projection, {}), (state_patching, {"source_layers": (0, 1)}),
            (extraction_events, {}), (attribute_rate, {"attributes": ATTRS}),
            (sublayer_knockout, {"attributes": ATTRS, "window": 2}), (locate, {})]


@pytest.fixture(scope="module")
def lm():
    return tiny.lm("llama", tokenizer_kind="metaspace")


@pytest.mark.parametrize("fn, options", ANALYSES, ids=[fn.__name__ for fn, _ in ANALYSES])
def test_every_analysis_result_has_the_result_interface(lm, fn, options, tmp_path):
    result = fn(lm, FACT, **options)
    assert isinstance(result, Result)
    d = result.to_dict()
    assert d["analysis"] == result.analysis and d["target_source"] == "top1"
    path = result.save(tmp_path / "sub" / "result.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(d))
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary file left behind
    summary = result.summary()
    first = summary.splitlines()[0]
    assert first.startswith(f"{result.analysis}: {FACT.prompt!r} -> {result.target!r} (the model's top-1")
    assert len(summary.splitlines()) >= 2  # a line of what the result shows, beyond the target
    assert html.escape(first) in result._repr_html_()
    fig = result.plot()
    assert isinstance(fig, plt.Figure) and fig.axes
    plt.close(fig)
    _, ax = plt.subplots()
    assert result.plot(ax=ax) is ax.figure or result.analysis == "locate"  # the sitemap has its own panels
    plt.close("all")


def test_summaries_name_what_the_numbers_decide(lm):
    knock = attention_knockout(lm, FACT, window=3)
    group, layer = min(((g, l) for g, c in knock.relative_change.items() for l in range(len(c))),
                       key=lambda gl: knock.relative_change[gl[0]][gl[1]])
    assert f"blocking last -> {group} around layer {layer} " in knock.summary()

    effects = head_effects(lm, FACT)
    direct = np.array(effects.direct_logit)
    best = Head(*np.unravel_index(int(direct.argmax()), direct.shape))
    assert f"largest direct logit: {best} " in effects.summary()

    trace = causal_trace(lm, FACT, samples=2)
    scores = np.array(trace.scores)
    position, layer = np.unravel_index(int(np.nanargmax(scores)), scores.shape)
    assert f"(position {position}) at layer {layer} " in trace.summary()

    extraction = extraction_events(lm, FACT)
    assert f"extraction: {extraction.category};" in extraction.summary()
    rows = effects.top_heads(3)
    assert rows[0]["head"] == str(best) and [r["direct_logit"] for r in rows] == sorted(direct.ravel())[::-1][:3]


def test_a_sitemap_lists_heads_as_head(lm, tmp_path):
    sites = locate(lm, FACT)
    heads = sites.recommendation["head_edit"]["heads"]
    assert heads and all(isinstance(h, Head) for h in heads)
    saved = json.loads(sites.save(tmp_path / "s.json").read_text())
    assert saved["recommendation"]["head_edit"]["heads"] == [[h.layer, h.head] for h in heads]
    assert f"head edit: {', '.join(str(h) for h in heads)}" in sites.summary()
    assert str(Head(sites.heads[0]["layer"], sites.heads[0]["head"])) in sites.summary()


def test_verification_has_the_result_interface(lm, tmp_path):
    from test_verify import ToyEdit, true_fact

    from locedit.verification import verify

    fact = true_fact(lm)
    ver = verify(lm, ToyEdit(lm, fact, " Rome", layer=3), mechanism=False, generation_tokens=2,
                 fluency_tokens=2)
    assert isinstance(ver, Result)
    path = ver.save(tmp_path / "verification.json")
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(ver.to_dict())) and saved["passed"] == ver.passed
    assert "ES" in ver.summary() and html.escape(ver.summary().splitlines()[0]) in ver._repr_html_()
    fig = ver.plot(ax=None)
    assert isinstance(fig, plt.Figure)
    plt.close(fig)


def test_head_projection_reads_heads_in_any_spelling(lm):
    spelled = head_projection(lm, FACT, heads=["L1H2", (0, 1), Head(3, 0)]).to_dict()
    assert spelled == head_projection(lm, FACT, heads=[(1, 2), (0, 1), (3, 0)]).to_dict()
    assert {(h["layer"], h["head"]) for h in spelled["top_heads"]} == {(1, 2), (0, 1), (3, 0)}

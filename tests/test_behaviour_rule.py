"""The behaviour pass rule on synthetic measurements: each criterion, NS+ and NKL included, can fail the edit."""

import importlib

import pytest
import torch

from locedit.core.facts import Fact

ver = importlib.import_module("locedit.verification.verify")


def _inputs():
    fact = Fact("The Eiffel Tower", "The Eiffel Tower is in", " Paris")
    return ver.inputs_for([fact], [" Rome"], paraphrases=[["Where is the Eiffel Tower? It is in"]],
                          neighborhood=[["The Louvre is in", "Big Ben is in"]], generation_prompts=[[]])


def _state(rewrite, paraphrase, neighbours, prefixed, text=" Rome, Italy", logprobs=None):
    """One fact's measurements: [p_new, p_true] pairs per prompt group, the prompt's generation."""
    d = {"rewrite": [rewrite], "paraphrase": [paraphrase], "neighborhood": neighbours, "prefixed": prefixed,
         "generations": [{"prompt": "p", "text": text}, {"prompt": "q", "text": text}],
         "fluency_texts": ["a b c d e f"]}
    if logprobs is None:
        logprobs = torch.log_softmax(torch.zeros(len(prefixed), 5), -1)
    return {"per_fact": [d], "logprobs": logprobs, "perplexity": 10.0}


BEFORE = _state([0.01, 0.9], [0.01, 0.9], [[0.01, 0.9], [0.01, 0.9]], [[0.01, 0.9], [0.01, 0.9]],
                text=" Paris, France")
GOOD = _state([0.9, 0.01], [0.8, 0.1], [[0.01, 0.9], [0.01, 0.9]], [[0.01, 0.9], [0.01, 0.9]])


def test_a_clean_edit_passes_every_criterion():
    b = ver.behaviour_metrics(_inputs(), BEFORE, GOOD)
    assert b["passed"] and b["neighborhood_kl"] == pytest.approx(0.0, abs=1e-9)
    assert "NS+" in b["rule"] and "neighbourhood KL" in b["rule"]


@pytest.mark.parametrize("after, why", [
    (_state([0.4, 0.5], [0.8, 0.1], [[0.01, 0.9]] * 2, [[0.01, 0.9]] * 2), "ES < 1"),
    (_state([0.9, 0.01], [0.8, 0.1], [[0.01, 0.9]] * 2, [[0.01, 0.9]] * 2, text=" Paris"), "generation"),
    (_state([0.9, 0.01], [0.1, 0.8], [[0.01, 0.9]] * 2, [[0.01, 0.9]] * 2), "PS < 0.5"),
    (_state([0.9, 0.01], [0.8, 0.1], [[0.9, 0.01], [0.01, 0.9]], [[0.01, 0.9]] * 2), "NS drop 0.5"),
    # NS+ falls from 1 to 0 (both prefixed neighbours now prefer the new target): beyond the validated tolerance
    (_state([0.9, 0.01], [0.8, 0.1], [[0.01, 0.9]] * 2, [[0.9, 0.01]] * 2), "NS+ drop 1.0"),
])
def test_each_criterion_can_fail_the_edit(after, why):
    assert not ver.behaviour_metrics(_inputs(), BEFORE, after)["passed"], why


def test_the_neighbourhood_kl_threshold_is_applied():
    assert ver.NKL_MAX is not None and ver.NS_PREFIXED_TOLERANCE is not None  # both validated into the rule
    peaked = torch.log_softmax(torch.tensor([[20.0, 0, 0, 0, 0]] * 2), -1)  # KL(uniform || peaked) >> NKL_MAX
    after = _state([0.9, 0.01], [0.8, 0.1], [[0.01, 0.9]] * 2, [[0.01, 0.9]] * 2, logprobs=peaked)
    b = ver.behaviour_metrics(_inputs(), BEFORE, after)
    assert b["neighborhood_kl"] > ver.NKL_MAX and not b["passed"]


def test_the_thresholds_can_be_taken_out_of_the_rule(monkeypatch):
    monkeypatch.setattr(ver, "NS_PREFIXED_TOLERANCE", None)
    after = _state([0.9, 0.01], [0.8, 0.1], [[0.01, 0.9]] * 2, [[0.9, 0.01]] * 2)
    b = ver.behaviour_metrics(_inputs(), BEFORE, after)
    assert b["passed"] and "NS+" not in b["rule"]


def test_an_ns_plus_drop_of_exactly_the_tolerance_passes_in_the_rule_and_the_verdict():
    # 10 prefixed neighbours, 3 flip: NS+ 1.0 -> 0.7, a drop of 0.3 (0.30000000000000004 in floating point)
    from locedit.verification.verdict import behaviour_verdict

    before = _state([0.01, 0.9], [0.01, 0.9], [[0.01, 0.9]] * 2, [[0.01, 0.9]] * 10, text=" Paris")
    after = _state([0.9, 0.01], [0.8, 0.1], [[0.01, 0.9]] * 2, [[0.9, 0.01]] * 3 + [[0.01, 0.9]] * 7)
    b = ver.behaviour_metrics(_inputs(), before, after)
    v = behaviour_verdict(b, ver.NS_TOLERANCE, ver.NS_PREFIXED_TOLERANCE, ver.NKL_MAX)
    (ns_plus,) = [c for c in v["checks"] if c["name"] == "neighborhood_score_prefixed_drop"]
    assert ns_plus["score"] == pytest.approx(0.3) and ns_plus["passed"] is True
    assert b["passed"] is True and v["passed"] is True

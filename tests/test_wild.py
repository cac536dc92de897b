"""WILD evaluation on a tiny model, with cases whose answers are known by construction: a request whose new
target is what the model already generates is reliable, one with an unseen word is not; without an edit nothing
moves (locality 1, probes kept, perplexity drift 0); after a large edit, generations change; the teacher-forced
accuracy of the model's own greedy tokens is 1."""

import pytest
import torch

import locedit
import tiny
from locedit import EditRequest, Fact
from locedit.verification.metrics import greedy_generate
from locedit.verification.wild import WildEvaluator, teacher_forced_accuracy

PROMPTS = ["The city of the Eiffel Tower", "The Colosseum is in", "Big Ben is in", "The museum called the Louvre"]


@pytest.fixture(scope="module")
def lm():
    return tiny.lm("llama")


def _own(lm, prompts, n=6):
    """Each prompt's greedy continuation, stripped (what the model states for it)."""
    return [g.strip() for g in greedy_generate(lm, prompts, n)]


def _requests(lm):
    own = _own(lm, PROMPTS)
    assert all(own), own  # the tiny model continues every prompt with something
    reqs = []
    for i, (prompt, text) in enumerate(zip(PROMPTS, own)):
        subject = prompt.split()[-1]
        meta = {"paraphrases": [PROMPTS[(i + 1) % 4]], "neighborhood": [PROMPTS[(i + 2) % 4]]}
        new = text if i < 2 else "zqxjkv"  # two requests the model already "has", two it cannot
        reqs.append(EditRequest(Fact(subject, prompt, None, None, meta), new))
    return reqs, own


def test_without_an_edit_reliability_is_what_the_model_states_and_nothing_moves(lm):
    reqs, own = _requests(lm)
    probes = [Fact(p.split()[-1], p, t) for p, t in zip(PROMPTS, own)]
    ev = WildEvaluator(lm, probes, max_new_tokens=6)
    assert ev.known_probes(probes + [Fact("Ben", "Big Ben is in", "zqxjkv")]) == probes
    s = ev.score(reqs)
    assert s.reliability == 0.5  # requests 0 and 1 ask for what the model generates
    expected_gen = sum(own[(i + 1) % 4] == r.new_target for i, r in enumerate(reqs)) / 4
    assert s.generalisation == expected_gen
    assert s.locality == 1.0 and s.probe_retention == 1.0
    assert s.perplexity_drift == 0.0
    assert s.counts == {"requests": 4, "paraphrases": 4, "locality": 4, "probes": 4}
    assert 0.0 <= s.tf_reliability <= 1.0


def test_teacher_forced_accuracy_counts_the_argmax_tokens_as_one_unpadded_forward_does(lm):
    from locedit.verification.metrics import prompt_ids, target_ids

    pairs = [(PROMPTS[0], " Paris"), (PROMPTS[1], " the city of Rome"), (PROMPTS[2], " London, England"),
             (PROMPTS[3], " Paris")]
    expected = []
    for prompt, target in pairs:  # by hand: one forward of prompt + target, argmax at each target position
        p, t = prompt_ids(lm, prompt), target_ids(lm, prompt, target)
        with torch.no_grad():
            logits = lm.model(torch.tensor([p + t])).logits[0]
        pred = logits[len(p) - 1:len(p) - 1 + len(t)].argmax(-1).tolist()
        expected.append(sum(a == b for a, b in zip(pred, t)) / len(t))
    assert teacher_forced_accuracy(lm, pairs) == pytest.approx(expected)
    # a one-token target that is the model's argmax after the prompt scores 1
    p = prompt_ids(lm, PROMPTS[0])
    with torch.no_grad():
        top = int(lm.model(torch.tensor([p])).logits[0, -1].argmax())
    text = lm.tokenizer.decode([top])
    if target_ids(lm, PROMPTS[0], text) == [top]:
        assert teacher_forced_accuracy(lm, [(PROMPTS[0], text)]) == [1.0]


def test_after_a_large_edit_generations_change_and_are_scored_against_the_unedited_model(lm):
    reqs, own = _requests(lm)
    probes = [Fact(p.split()[-1], p, t) for p, t in zip(PROMPTS, own)]
    ev = WildEvaluator(lm, probes, max_new_tokens=6)
    ev.unedited_generations(PROMPTS)  # cached from the unedited model
    original = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    edits = [EditRequest(Fact(r.fact.subject, r.fact.prompt), " Berlin Berlin") for r in reqs]
    e = locedit.edit(lm, edits, method="locft", layers=[1], hparams={"lr": 0.05, "num_steps": 60, "batch_size": 2})
    try:
        s = ev.score([EditRequest(Fact(r.fact.subject, r.fact.prompt, None, None, r.fact.meta), "Berlin")
                      for r in reqs])
        assert s.reliability == 1.0  # every prompt now says Berlin
        assert s.locality_strict < 1.0 and s.probe_retention < 1.0  # the locality prompts are edited prompts too
        assert s.perplexity_drift != 0.0
        assert s.tf_reliability > 0.9
    finally:
        e.revert()
    assert all(torch.equal(original[n], p) for n, p in lm.model.named_parameters())
    assert ev.score(reqs).locality == 1.0  # unedited again


def test_locality_compares_as_many_tokens_as_the_recorded_answer_has(lm):
    from locedit.verification.wild import _answer_tokens
    from locedit.verification.metrics import target_ids

    prompt = PROMPTS[2]
    assert _answer_tokens(lm, prompt, None) == 1
    assert _answer_tokens(lm, prompt, "London, England") == len(target_ids(lm, prompt, " London, England")) > 1

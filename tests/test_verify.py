"""Verification: each behaviour metric against hand-computed values or an independent slow loop, before numbers
from the unedited model, verify and evaluate end to end (tiny models, a stand-in rank-one edit and the real
`locedit.edit`), resuming an interrupted evaluation, and the mechanistic checks failing on a failed edit."""

import contextlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tiny
from locedit import Capture, Fact, run
from locedit.errors import LoceditError
from locedit.verification import Verification, verify
from locedit.verification import metrics as M
from locedit.core.statistics import bootstrap_mean
from locedit.verification.evaluate import evaluate
from locedit.localization.runner import read_lines

EIFFEL = Fact("Eiffel Tower", "The Eiffel Tower is located in the city of")


# --- a stand-in edit: u k^T / |k|^2 added to one MLP output projection ------------------------------------------------
class ToyEdit:
    """Rank-one change of layer `layer`'s MLP down projection keyed at `position` of the fact's prompt: the MLP
    output there gains `scale` x the unit direction W_U[new] - W_U[old]. `noop=True`: a failed edit (no change)."""

    method = "toy"

    def __init__(self, lm, fact, new_target, layer, position=-1, scale=80.0, noop=False):
        enc = lm.encode(fact)
        self.facts = [fact]
        self.new_targets = [M.continuation(fact.prompt, new_target)]
        self.sites = {"layers": [layer], "heads": [], "key_position": "subject_last",
                      "positions": [position % len(enc)]}
        with torch.no_grad():
            k = run(lm, enc, capture=Capture(mlp_keys=True, layers=[layer])).captures["mlp_keys", layer][0, position]
            new_id = lm.encode(Fact(fact.subject, fact.prompt, new_target)).target_id
            W = lm.adapter.unembed_module(lm.model).weight.float()
            u = W[new_id] - W[enc.target_id]
            self.delta = torch.zeros(u.numel(), k.numel()) if noop else torch.outer(scale * u / u.norm(), k) / (k @ k)
        self.lm, self.layer, self._applied, self._saved = lm, layer, None, None

    def _param(self):
        return self.lm.adapter.layer_part(self.lm.model, self.layer, self.lm.adapter.mlp_down).weight

    @property
    def is_applied(self):
        return self._applied is not None

    def apply(self, lm):
        assert not self.is_applied
        p = self._param()
        self._saved = p.detach().clone()
        with torch.no_grad():
            p.add_(self.delta.to(p.dtype))
        self._applied = lm
        return self

    def revert(self):
        with torch.no_grad():
            self._param().copy_(self._saved)
        self._applied = None

    @contextlib.contextmanager
    def applied(self, lm):
        self.apply(lm)
        try:
            yield self
        finally:
            self.revert()

    @contextlib.contextmanager
    def reverted(self):
        lm = self._applied
        self.revert()
        try:
            yield self
        finally:
            self.apply(lm)


@pytest.fixture(scope="module")
def llama():
    return tiny.lm("llama", "metaspace")


@pytest.fixture(scope="module")
def gpt2():
    return tiny.lm("gpt2", "bytelevel")


def true_fact(lm, fact=EIFFEL):
    """The fact with the model's own top-1 as its true target."""
    return Fact(fact.subject, fact.prompt, lm.predict(fact)[0].token, fact.relation, dict(fact.meta))


def unlikely_target(lm, fact):
    """A new target the unedited model finds less likely than the true one (whole string)."""
    for candidate in (" Apple", " London", " guitar", " basketball", " Rome"):
        p_new, p_true = M.target_probs(lm, [(fact.prompt, candidate), (fact.prompt, fact.target_text())])
        if p_new < p_true:
            return candidate
    raise AssertionError("no unlikely target")


# --- whole-string probabilities ---------------------------------------------------------------------------------------
class Bigram(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: P(target | prompt) is computable by hand from the table."""

    def __init__(self, vocab):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(vocab, vocab, generator=g) * 3

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])


def test_target_probs_by_hand_bigram():
    tok = tiny.tokenizer("bytelevel")
    toy = SimpleNamespace(model=Bigram(tiny.V), tokenizer=tok, device=torch.device("cpu"))
    pairs = [("The Eiffel Tower is located in the city of", " Paris"),
             ("The capital of Italy is", " Rome and Paris"),          # multi-token
             ("Big Ben is in", " London. The Louvre"),               # multi-token, punctuation
             ("Tower", " Bridge Music Apple city")]
    got = M.target_probs(toy, pairs, batch_tokens=12)  # several padded batches
    for (prompt, target), p in zip(pairs, got):
        prompt_ids = tok(prompt)["input_ids"]
        target_ids = tok(prompt + target)["input_ids"][len(prompt_ids):]
        assert len(target_ids) >= (1 if target == " Paris" else 2)
        table = toy.model.table.double()
        logp, prev = 0.0, prompt_ids[-1]
        for t in target_ids:
            row = table[prev]
            logp += float(row[t] - torch.logsumexp(row, 0))
            prev = t
        assert p == pytest.approx(math.exp(logp / len(target_ids)), rel=1e-5)


def slow_target_prob(lm, prompt, target):
    """P(target | prompt), the geometric mean over its tokens, from one unbatched forward per target token."""
    ids = lm.tokenizer(prompt)["input_ids"]
    joint = lm.tokenizer(prompt + target)["input_ids"]
    assert joint[:len(ids)] == ids
    nll = []
    with torch.no_grad():
        for j in range(len(ids), len(joint)):
            logits = lm.model(input_ids=torch.tensor([joint[:j]])).logits[0, -1].double()
            nll.append(-float(logits.log_softmax(-1)[joint[j]]))
    return math.exp(-np.mean(nll))


@pytest.mark.parametrize("family,kind", [("llama", "metaspace"), ("gpt2", "bytelevel")])
def test_target_probs_match_slow_loop(family, kind):
    lm = tiny.lm(family, kind)
    pairs = [("The Eiffel Tower is located in the city of", " Paris"), ("The capital of Italy is", " Rome and Paris"),
             ("Big Ben is in", " London"), ("Microsoft was founded by", " Bill Gates")]
    got = M.target_probs(lm, pairs)
    for (prompt, target), p in zip(pairs, got):
        assert p == pytest.approx(slow_target_prob(lm, prompt, target), rel=1e-4)
    # the same pairs alone give the same numbers (padding changes nothing)
    assert M.target_probs(lm, pairs[1:2])[0] == pytest.approx(got[1], rel=1e-5)


def test_perplexity_and_next_token_logprobs(llama):
    texts = ["The capital of France is Paris.", "Michael Jordan plays basketball and Jimi Hendrix the guitar."]
    nll = []
    with torch.no_grad():
        for text in texts:
            ids = llama.tokenizer(text)["input_ids"]
            logp = llama.model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
            nll += [-float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
        assert M.perplexity(llama, texts) == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)
        got = M.next_token_logprobs(llama, ["Big Ben is in", texts[1]])
        ids = llama.tokenizer("Big Ben is in")["input_ids"]
        ref = llama.model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
    assert torch.allclose(got[0], ref, atol=1e-5)


def test_kl_by_hand():
    p = torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]).log()
    q = torch.tensor([[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]]).log()
    kl = M.kl_divergence(p, q)
    assert kl[0] == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5))
    assert kl[1] == pytest.approx(0.0, abs=1e-12)


def test_scores_by_hand():
    assert M.success_and_magnitude([0.5, 0.1, 0.3], [0.2, 0.4, 0.1]) == (pytest.approx(2 / 3), pytest.approx(0.2 / 3))
    assert M.success_and_magnitude([], []) == (None, None)
    assert M.harmonic_mean([1.0, 0.5, 0.5]) == pytest.approx(3 / (1 + 2 + 2))
    assert M.harmonic_mean([1.0, None, 0.5]) == pytest.approx(2 / 3)
    assert M.harmonic_mean([1.0, 0.0]) == 0.0 and M.harmonic_mean([None]) is None


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert M.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # words and punctuation are tokens: "x, y." -> x , y . : 3 distinct bigrams, 2 distinct trigrams
    assert M.words("x, y.") == ["x", ",", "y", "."]
    assert M.ngram_entropy("x, y.") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert M.ngram_entropy("one") == 0.0
    assert M.fluency(["a b a b", "one"]) == pytest.approx(M.ngram_entropy("a b a b") / 2)
    assert M.fluency([]) is None
    # a degenerate repetition scores far lower than varied text
    assert M.ngram_entropy("Rome Rome Rome Rome Rome Rome") < M.ngram_entropy("the cat sat on the mat by the door")


def test_greedy_generation_matches_argmax_loop(llama):
    prompts = ["The Eiffel Tower is located in the city of", "Big Ben is", "The capital of France is Paris and"]
    got = M.greedy_generate_ids(llama, prompts, 6)
    with torch.no_grad():
        for prompt, ids in zip(prompts, got):
            seq = list(llama.tokenizer(prompt)["input_ids"])
            ref = []
            for _ in range(6):
                nxt = int(llama.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
                if nxt == llama.tokenizer.eos_token_id:
                    break
                ref.append(nxt)
                seq.append(nxt)
            assert ids == ref
    assert M.greedy_generate(llama, prompts[:1], 6)[0] == llama.tokenizer.decode(got[0], skip_special_tokens=True)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_greedy_generation_with_lengths_per_prompt(family):
    """Rows leave the batch when they have their tokens; what each row generates is what it generates alone."""
    lm = tiny.lm(family)
    prompts = ["The Eiffel Tower is located in the city of", "Big Ben is", "The capital of France is Paris and"]
    lengths = [2, 7, 4]
    got = M.greedy_generate_ids(lm, prompts, lengths)
    for prompt, n, ids in zip(prompts, lengths, got):
        assert ids == M.greedy_generate_ids(lm, [prompt], n)[0]
        assert len(ids) <= n
    assert M.greedy_generate_ids(lm, prompts, [0, 3, 0]) == [[], got[1][:3], []]
    with pytest.raises(ValueError, match="2 lengths for 3 prompts"):
        M.greedy_generate_ids(lm, prompts, [1, 2])


def test_greedy_generation_with_lengths_when_the_cache_cannot_drop_rows(llama, monkeypatch):
    prompts = ["The Eiffel Tower is located in the city of", "Big Ben is", "The capital of France is Paris and"]
    expected = M.greedy_generate_ids(llama, prompts, [2, 7, 4])
    monkeypatch.setattr(M, "can_drop_rows", lambda cache: False)  # finished rows ride along, their tokens unused
    assert M.greedy_generate_ids(llama, prompts, [2, 7, 4]) == expected


def test_contains_target():
    assert M.contains_target(" Rome, the capital", " Rome")
    assert M.contains_target("in rome.", "Rome")
    assert not M.contains_target(" Romeo and Juliet", " Rome")
    assert M.contains_target(" New York City", " New York") and not M.contains_target("", " Rome")


def test_bootstrap_ci():
    _, low, high = bootstrap_mean([0.0, 1.0] * 20)
    assert low < 0.5 < high and 0.3 < low and high < 0.7
    assert bootstrap_mean([1.0, 1.0, 1.0])[1:] == (1.0, 1.0) and bootstrap_mean([1.0])[1:] == (None, None)


# --- verify -----------------------------------------------------------------------------------------------------------
NEIGHBOURS = ["The Louvre is in", ("Big Ben is in", " London")]
PARAPHRASES = ["Eiffel Tower is in the city of"]


def test_verify_before_numbers_come_from_the_unedited_model(llama):
    fact = true_fact(llama)
    edit = ToyEdit(llama, fact, " Rome", layer=3)
    # reference "before" numbers measured before the edit exists
    prefixed = [f"{fact.prompt} Rome. The Louvre is in", f"{fact.prompt} Rome. Big Ben is in"]
    ref_before = M.next_token_logprobs(llama, prefixed)
    ref_p = M.target_probs(llama, [(fact.prompt, " Rome"), (fact.prompt, fact.target_text()),
                                   ("The Louvre is in", M.continuation("The Louvre is in", fact.target)),
                                   ("The Louvre is in", " Rome"), ("Big Ben is in", " London"),
                                   ("Big Ben is in", " Rome")])
    edit.apply(llama)
    edited = edit._param().detach().clone()
    ref_after = M.next_token_logprobs(llama, prefixed)
    ver = verify(llama, edit, paraphrases=PARAPHRASES, neighborhood=NEIGHBOURS, generation_prompts=["The Eiffel"],
                 generation_tokens=5, fluency_tokens=8)
    assert edit.is_applied and torch.equal(edit._param(), edited)  # left as it was
    edit.revert()
    b = ver.behaviour
    fb = b["per_fact"][0]
    assert fb["probs_before"]["rewrite"][0] == pytest.approx([ref_p[0], ref_p[1]], rel=1e-5)
    assert fb["probs_before"]["neighborhood"][0] == pytest.approx([ref_p[3], ref_p[2]], rel=1e-5)
    assert fb["probs_before"]["neighborhood"][1] == pytest.approx([ref_p[5], ref_p[4]], rel=1e-5)
    assert b["before"]["neighborhood_score"] == (float(ref_p[2] > ref_p[3]) + float(ref_p[4] > ref_p[5])) / 2
    assert b["before"]["efficacy_score"] == float(ref_p[0] > ref_p[1])
    assert b["neighborhood_kl"] == pytest.approx(float(np.mean(M.kl_divergence(ref_before, ref_after))), rel=1e-4)
    # the edit works: P(new) > P(true) on the prompt, and the score is the harmonic mean of ES, PS, NS
    assert b["efficacy_score"] == 1.0 and b["efficacy_magnitude"] > 0
    assert b["score"] == pytest.approx(M.harmonic_mean([b["efficacy_score"], b["paraphrase_score"],
                                                        b["neighborhood_score"]]))
    assert b["generation_efficacy_prompt"] == M.contains_target(fb["generations_after"][0]["text"], " Rome")
    assert fb["fluency_texts_after"][0].startswith("The Eiffel")


def test_verify_end_to_end_and_unapplied_edit(llama):
    fact = true_fact(llama)
    edit = ToyEdit(llama, fact, " Rome", layer=3)
    before = edit._param().detach().clone()
    ver = verify(llama, edit, paraphrases=PARAPHRASES, neighborhood=NEIGHBOURS, generation_tokens=4,
                 fluency_tokens=6)
    assert isinstance(ver, Verification) and not edit.is_applied and torch.equal(edit._param(), before)
    d = json.loads(json.dumps(ver.to_dict()))
    assert {"efficacy_score", "efficacy_magnitude", "paraphrase_score", "neighborhood_score", "score",
            "generation_efficacy", "neighborhood_kl", "fluency"} <= set(d["behaviour"])
    assert set(d["mechanism"]) >= {"knockout", "extraction", "enrichment", "locality", "passed"}
    for name in ("knockout", "extraction", "enrichment", "locality"):
        assert "passed" in d["mechanism"][name] and "rule" in d["mechanism"][name]
    assert d["passed"] == ver.passed
    text = ver.summary()
    assert "ES" in text and "knockout" in text and "verdict" in text
    fig = ver.plot()
    assert len(fig.axes) >= 4
    # neighbourhood from the fact's dataset record
    with_meta = Fact(fact.subject, fact.prompt, fact.target, meta={"paraphrases": PARAPHRASES,
                                                                    "neighborhood": ["The Louvre is in"]})
    e2 = ToyEdit(llama, with_meta, " Rome", layer=3)
    d2 = verify(llama, e2, mechanism=False, generation_tokens=2, fluency_tokens=2).to_dict()
    assert d2["mechanism"] is None
    assert d2["behaviour"]["per_fact"][0]["neighborhood"] == [["The Louvre is in", fact.target_text()]]
    with pytest.raises(LoceditError, match="neighbourhood item"):
        verify(llama, e2, neighborhood=[3], mechanism=False)


def test_failed_edit_is_reported(llama):
    fact = true_fact(llama)
    failed = ToyEdit(llama, fact, unlikely_target(llama, fact), layer=1, noop=True)
    ver = verify(llama, failed, neighborhood=NEIGHBOURS, generation_tokens=3, fluency_tokens=3)
    m = ver.mechanism
    assert ver.behaviour["efficacy_score"] == 0.0 and not ver.behaviour["passed"]
    assert m["extraction"]["passed"] is False and m["extraction"]["new_gain"] == pytest.approx(0, abs=1e-4)
    assert m["enrichment"]["passed"] is False
    assert m["enrichment"]["new_best_rank_after"] == m["enrichment"]["new_best_rank_before"]
    assert m["locality"]["passed"] is True  # nothing changed for the neighbours
    assert m["passed"] is False and ver.passed is False
    assert "FAIL" in ver.summary()


# --- evaluate ---------------------------------------------------------------------------------------------------------
def plain_facts(lm, n=4):
    prompts = [("Eiffel Tower", "The Eiffel Tower is located in the city of"), ("Big Ben", "Big Ben is in"),
               ("Colosseum", "The Colosseum is in"), ("Beats Music", "Beats Music is owned by"),
               ("Michael Jordan", "Michael Jordan plays"), ("Japan", "The currency of Japan is the"),
               ("Brazil", "The official language of Brazil is")]
    facts = []
    for i, (s, p) in enumerate(prompts):
        top = lm.predict(Fact(s, p))[0].token
        if not top.strip() or len(facts) == n:
            continue
        facts.append(Fact(s, p, top, relation="r1" if len(facts) % 2 else "r2",
                          meta={"id": f"f{len(facts)}", "target_new": "Rome" if "Rome" not in top else "Paris",
                                "neighborhood": ["The Louvre is in"]}))
    return facts


class Counting:
    def __init__(self, fail_at=None):
        self.calls, self.edits, self.fail_at = [], [], fail_at

    def __call__(self, lm, request, **options):  # evaluate's edit_fn: (lm, EditRequest, **options) -> Edit
        fact, new_target = request.fact, request.new_target
        self.calls.append(fact.meta["id"])
        self.edits.append((fact, new_target))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt
        return ToyEdit(lm, fact, new_target, layer=3).apply(lm)


def test_evaluate_resumes_without_redoing_or_duplicating(llama, tmp_path):
    facts = plain_facts(llama)
    options = dict(verify_options={"generation_tokens": 3, "fluency_tokens": 3}, progress=False, only_known=False)
    first = Counting(fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        evaluate(llama, facts, tmp_path, edit_fn=first, **options)
    path = tmp_path / "results.jsonl"
    assert [l["id"] for l in read_lines(path)[0]] == ["f0", "f1"]
    with open(path, "a") as f:
        f.write('{"id": "f2", "fact": {"subj')  # a truncated last line
    second = Counting()
    result = evaluate(llama, facts, tmp_path, edit_fn=second, **options)
    assert second.calls == ["f2", "f3"]
    ids = [l["id"] for l in read_lines(path)[0]]
    assert sorted(ids) == ["f0", "f1", "f2", "f3"] and len(ids) == 4
    assert result.counts["already_done"] == 2 and result.counts["repaired_last_line"] is True
    assert result.counts["evaluated"] == 4
    agg = json.loads((tmp_path / "aggregate.json").read_text())
    es = [l["result"]["behaviour"]["efficacy_score"] for l in result.lines]
    assert agg["overall"]["efficacy_score"]["mean"] == pytest.approx(np.mean(es))
    assert set(agg["by_relation"]) == {"r1", "r2"} and agg["by_relation"]["r1"]["n"] == 2
    assert "mechanism_passed" in agg["overall"] and "| efficacy_score |" in (tmp_path / "table.md").read_text()
    # a third run does nothing; other options are refused
    third = Counting()
    evaluate(llama, facts, tmp_path, edit_fn=third, **options)
    assert third.calls == []
    with pytest.raises(LoceditError, match="other options"):
        evaluate(llama, facts, tmp_path, edit_fn=third, method="memit", **options)


def test_evaluate_skips_and_counts_unknown_facts(llama, tmp_path, monkeypatch):
    import locedit.core.datasets

    calls = []

    def known(lm, facts, **kw):  # the filter itself is tested in test_datasets; here: is it used and counted?
        calls.append(len(facts))
        return [f for f in facts if f.target != "Tokyo"]

    monkeypatch.setattr(locedit.core.datasets, "known_facts", known)
    facts = plain_facts(llama, 3)
    wrong = Fact("Big Ben", "Big Ben is in", "Tokyo", meta={"id": "u", "target_new": "Rome"})
    no_new = Fact("Big Ben", "Big Ben is in", "London", meta={"id": "v"})
    result = evaluate(llama, facts + [wrong, no_new], tmp_path, edit_fn=Counting(), mechanism=False,
                      verify_options={"generation_tokens": 2, "fluency_tokens": 2}, progress=False)
    assert result.counts["given"] == 5 and result.counts["no_target_new"] == 1 and result.counts["unknown"] == 1
    assert result.counts["evaluated"] == 3 and calls == [4]


def test_sequential_collapse_curve(llama, tmp_path):
    facts = plain_facts(llama, 5)
    counting = Counting()
    result = evaluate(llama, facts[:4], tmp_path, sequential=True, every=2, probes=2, edit_fn=counting,
                      progress=False, only_known=False)
    edits = [p["edits"] for p in result.sequential]
    assert edits == [0, 2, 4]
    # edit efficacy after k edits, by hand: replay the same edits and compare P(new) with P(true) for each
    # edited fact, one unbatched forward per token; the toy edit (scale 80) moves every fact, so it is 1.0
    replay = []
    for (fact, new), point in zip(counting.edits, [None, result.sequential[1], None, result.sequential[2]]):
        replay.append(ToyEdit(llama, fact, new, layer=3).apply(llama))
        if point is not None:
            wins = [slow_target_prob(llama, f.prompt, M.continuation(f.prompt, n)) >
                    slow_target_prob(llama, f.prompt, f.target_text()) for f, n in counting.edits[:len(replay)]]
            assert point["edit_efficacy"] == pytest.approx(np.mean(wins)) and point["edit_efficacy"] == 1.0
    for e in reversed(replay):
        e.revert()
    assert (tmp_path / "collapse.png").exists() and len(read_lines(tmp_path / "sequential.jsonl")[0]) == 3
    # every edit was reverted
    fresh = tiny.lm("llama", "metaspace")
    for (n1, p1), (n2, p2) in zip(llama.model.named_parameters(), fresh.model.named_parameters()):
        assert torch.equal(p1, p2), n1


# --- the real locedit.edit on a tiny model ----------------------------------------------------------------------------
def test_verify_real_rome_edit_tiny(llama):
    import locedit

    fact = true_fact(llama)
    new = unlikely_target(llama, fact)
    edit = locedit.edit(llama, locedit.EditRequest(fact, new), layers=[0], key_position="subject_last")
    try:
        ver = verify(llama, edit, neighborhood=NEIGHBOURS, paraphrases=PARAPHRASES, generation_tokens=4,
                     fluency_tokens=6)
    finally:
        edit.revert()
    b = ver.behaviour
    assert b["before"]["efficacy_score"] == 0.0 and b["efficacy_magnitude"] > b["before"]["efficacy_magnitude"]
    assert ver.mechanism["enrichment"]["layer"] == 0 and not edit.is_applied
    assert ver.to_dict()["sites"]["layers"] == [0] and ver.method == "rome"


def test_verify_and_report_writes_files(llama, tmp_path):
    from locedit.verification import verify_and_report

    fact = true_fact(llama)
    edit = ToyEdit(llama, fact, " Rome", layer=3)
    ver = verify_and_report(llama, edit, tmp_path / "v", neighborhood=["The Louvre is in"], generation_tokens=2,
                            fluency_tokens=2)
    assert isinstance(ver, Verification) and not edit.is_applied
    html = (tmp_path / "v" / "report.html").read_text()
    assert "data:image/png;base64," in html and "Mechanism" in html
    assert json.loads((tmp_path / "v" / "verification.json").read_text())["passed"] == ver.passed
    assert (tmp_path / "v" / "figures" / "verification.png").exists()


def test_leftover_worker_shards_are_merged_without_duplicates(tmp_path):
    from locedit.verification.evaluate import results_store

    line = lambda i: json.dumps({"id": i, "fact": {}, "result": {}}) + "\n"  # noqa: E731
    (tmp_path / "results.jsonl").write_text(line("f0"))
    (tmp_path / "results.w0.jsonl").write_text(line("f0") + line("f2") + '{"id": "f4", "fa')  # interrupted worker
    (tmp_path / "results.w1.jsonl").write_text(line("f1") + line("f3"))
    results_store(tmp_path).merge()
    assert [l["id"] for l in read_lines(tmp_path / "results.jsonl")[0]] == ["f0", "f2", "f1", "f3"]
    assert not list(tmp_path.glob("results.w*.jsonl"))


def test_verify_a_memit_batch_edit(llama):
    import locedit

    facts = [true_fact(llama), true_fact(llama, Fact("Big Ben", "Big Ben is in"))]
    news = [unlikely_target(llama, f) for f in facts]
    edit = locedit.edit(llama, [locedit.EditRequest(f, n) for f, n in zip(facts, news)],
                        method="memit", layers=[0, 1], key_position="subject_last")
    try:
        ver = verify(llama, edit, paraphrases=[["Eiffel Tower is in the city of"], []],
                     neighborhood=[["The Louvre is in"], None], generation_tokens=2, fluency_tokens=2)
    finally:
        edit.revert()
    b = ver.behaviour
    assert len(b["per_fact"]) == 2 and len(ver.facts) == 2
    assert b["per_fact"][1]["paraphrases"] == [] and b["per_fact"][1]["neighborhood"] == []
    assert b["efficacy_score"] == pytest.approx(np.mean([f["after"]["efficacy_score"] for f in b["per_fact"]]))
    assert ver.mechanism["enrichment"]["layer"] == 1  # the last edited layer
    with pytest.raises(LoceditError, match="one list per edited fact"):
        verify(llama, edit, paraphrases=[["a"], ["b"], ["c"]])


def test_spread_covers_relations():
    from locedit.verification.evaluate import spread

    facts = [Fact("A", "A is", "x", relation=r, meta={"id": str(i)}) for i, r in enumerate("aaaabbc")]
    assert [f.meta["id"] for f in spread(facts, 4)] == ["0", "1", "4", "6"]
    assert len(spread(facts, 99)) == 7


def test_extraction_heads_from_a_sitemap_or_the_edit(llama):
    from locedit.verification import mechanism as mech

    fact = true_fact(llama)
    sitemap = {"heads": [{"layer": 3, "head": 1}, {"layer": 2, "head": 0}, {"layer": 1, "head": 2},
                         {"layer": 0, "head": 0}]}
    setup = mech.setup_for(llama, fact, " Rome", {"layers": [1]}, 0, [], sitemap=sitemap)
    assert setup.heads == [(3, 1), (2, 0), (1, 2)] and setup.layer == 1
    assert setup.position == llama.encode(fact).positions.subject_last
    setup = mech.setup_for(llama, fact, " Rome", {"layers": [1], "extraction_heads": [[2, 3]]}, 0, [])
    assert setup.heads == [(2, 3)]
    carrier = mech.setup_for(llama, fact, " Rome", {"layers": [1], "key_position": "carrier",
                                                     "carrier_offsets": [0]}, 0, [])
    assert carrier.position == llama.encode(fact).subject_start


def test_paired_comparison_uses_shared_facts_and_counts_wins():
    from locedit.verification.evaluate import paired_comparison

    def line(i, score, knockout):
        return {"id": str(i), "result": {"behaviour": {"score": score},
                                         "mechanism": {"knockout": {"passed": knockout}}}}

    a = [line(i, 0.5, True) for i in range(6)] + [{"id": "9", "error": "failed"}]
    b = [line(i, 0.5 + 0.1 * (i % 3 == 0), i % 2 == 0) for i in range(1, 8)] + [line(9, 1.0, True)]
    cmp = paired_comparison(a, b)
    assert cmp["n_shared"] == 5  # ids 1..5: 0, 6, 7 and the failed 9 are not in both
    s = cmp["metrics"]["score"]
    assert (s["n"], s["b_better"], s["a_better"]) == (5, 1, 0)  # only id 3 improved
    assert s["difference"] == pytest.approx(0.02) and s["ci95"][0] <= 0.02 <= s["ci95"][1]
    k = cmp["metrics"]["mechanism_knockout_passed"]
    assert (k["a"], k["b"], k["a_better"]) == (1.0, 0.4, 3)  # ids 1, 3, 5 stop passing
    assert "efficacy_score" not in cmp["metrics"]  # a metric neither run has is left out

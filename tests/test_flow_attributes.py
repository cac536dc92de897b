"""Attribute sets, attribute rate and sublayer knockout: conformance against straightforward re-computations on
tiny random models, file loading, and a SmolLM2 smoke test."""

import json
import time

import numpy as np
import pytest
import torch

import tiny
from locedit import DatasetError, Fact
from locedit.core.adapters import _get
from locedit.errors import InterventionError
from locedit.localization.attribute_rate import AttributeRateResult, aggregate, attribute_rate
from locedit.localization.attributes import AttributeSet, attribute_set, generate_attribute_text, load_paragraphs
from locedit.localization.common import STOPWORDS
from locedit.localization.sublayer import SublayerKnockoutResult, knocked_layers, sublayer_knockout

TOL = 1e-5
FAMILIES = ["gpt2", "llama", "gemma2", "gpt_neox"]
FACT = Fact("Eiffel Tower", "The Eiffel Tower is located in the city of")
K, M = 80, 20


def tiny_lm(family):
    # the SentencePiece-style tiny tokenizer has ~120 clean (long, non-stopword) tokens, the byte-level one ~10
    return tiny.lm(family, "metaspace")


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return tiny_lm(request.param)


@pytest.fixture(scope="module")
def attrs():
    # half the corpus: some projected tokens are attributes, some are not
    return AttributeSet.from_text(tiny.tokenizer("metaspace"), "Eiffel Tower", " ".join(tiny.CORPUS[:4]))


# ----------------------------------------------------------------------------------------------------------------
# Independent references: plain HF forwards, own hooks, manual projection and filtering
# ----------------------------------------------------------------------------------------------------------------
def ref_project(lm, h, projection):
    model = lm.model
    if projection == "paper":
        return h @ model.get_input_embeddings().weight.T
    norm = model.transformer.ln_f if hasattr(model, "transformer") else (
        model.gpt_neox.final_layer_norm if hasattr(model, "gpt_neox") else model.model.norm)
    logits = model.get_output_embeddings()(norm(h))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def ref_rate(lm, h, attributes, projection, k=K, m=M):
    scores = ref_project(lm, h, projection)
    ids = torch.topk(scores, min(k, scores.shape[-1])).indices.tolist()
    decoded = [lm.tokenizer.decode([i]) for i in ids]
    clean = [t for t in decoded if len(t.strip()) > 2 and t.strip().lower() not in STOPWORDS][:m]
    return 100.0 * len([t for t in clean if t in attributes.tokens]) / len(clean) if clean else float("nan")


def layer_output(output):
    return output[0] if isinstance(output, tuple) else output


def ref_hidden_states(lm, ids):
    """HF's hidden_states[0..L-1] plus the last block's raw output (HF normalises its last entry)."""
    final = {}
    handle = lm.layers[-1].register_forward_hook(lambda mod, args, out: final.setdefault("h", layer_output(out)))
    try:
        with torch.no_grad():
            out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    finally:
        handle.remove()
    return list(out.hidden_states[:lm.num_layers]) + [final["h"]]


def zero_output(module, args, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]),) + tuple(output[1:])
    return torch.zeros_like(output)


def ref_knockout(lm, ids, hooks, measure_layer, position):
    """Run the model with `hooks` [(module, forward hook)] registered; return (residual leaving measure_layer at
    `position`, next-token probabilities)."""
    seen = {}
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    handles.append(lm.layers[measure_layer].register_forward_hook(
        lambda mod, args, out: seen.setdefault("h", layer_output(out))))
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return seen["h"][0, position], logits.float().softmax(-1)


def sublayer_module(lm, layer, site):
    return _get(lm.layers[layer], lm.adapter.mlp_out if site == "mlp" else lm.adapter.attn_out)


# ----------------------------------------------------------------------------------------------------------------
# Attribute rate
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", ["paper", "model"])
def test_attribute_rate_matches_reference(lm, attrs, projection):
    enc = lm.encode(FACT)
    result = attribute_rate(lm, enc, attributes=attrs, projection=projection, k=K, m=M)
    hidden = ref_hidden_states(lm, enc.input_ids)
    assert result.layers == list(range(lm.num_layers + 1))
    checked = 0
    for name, pos in result.positions.items():
        if pos is None:
            assert result.rates[name] is None
            continue
        expected = [ref_rate(lm, hidden[layer][0, pos], attrs, projection) for layer in result.layers]
        assert np.allclose(result.rates[name], expected, atol=TOL, equal_nan=True), name
        checked += 1
    assert checked == 5  # position 0 (BOS) is not part of the subject: every position exists
    values = [v for rates in result.rates.values() if rates for v in rates if not np.isnan(v)]
    assert max(values) > 0 and min(values) < 100  # the comparison is not trivially 0 == 0
    mean = torch.stack([lm.embedding_matrix[i] for i in enc.input_ids[enc.subject_start:enc.subject_end]]).mean(0)
    assert result.embedding_baseline == pytest.approx(ref_rate(lm, mean, attrs, projection), abs=TOL, nan_ok=True)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attribute_rate_matches_reference_with_leading_spaces(family):
    lm = tiny.lm(family)  # byte-level tokenizer: its clean tokens are " Paris", " capital", " Pari", ...
    attributes = AttributeSet.from_text(lm.tokenizer, "Eiffel Tower", tiny.CORPUS[1])
    assert " Paris" in attributes and "Paris" not in attributes
    enc = lm.encode(FACT)
    result = attribute_rate(lm, enc, attributes=attributes, projection="model", k=100, m=5)
    hidden = ref_hidden_states(lm, enc.input_ids)
    for name, pos in result.positions.items():
        if pos is not None:
            expected = [ref_rate(lm, hidden[layer][0, pos], attributes, "model", k=100, m=5)
                        for layer in result.layers]
            assert np.allclose(result.rates[name], expected, atol=TOL, equal_nan=True), name
    assert np.nanmax([v for r in result.rates.values() if r for v in r]) > 0


def test_attribute_rate_positions_and_fields(attrs):
    lm = tiny_lm("llama")
    enc = lm.encode(FACT)  # <s> The | Eiffel Tower | is located ...
    result = attribute_rate(lm, enc, attributes=attrs, k=K, m=M)
    g = enc.positions
    assert result.positions == {"first": 0, "subject_first": g.subject_first, "subject_last": g.subject_last,
                                "after_subject": g.subject_last + 1, "last": g.n - 1}
    assert result.projection == "model" and result.attribute_source == "text" and result.k == K
    assert set(result.top_tokens) == {0, 1, 2, 3, 4} and all(len(t) <= 20 for t in result.top_tokens.values())
    data = result.to_dict()
    assert data["analysis"] == "attribute_rate" and json.dumps(data)
    # the subject starts a prompt without BOS: no "first" position; the subject ends it: no "after_subject"
    no_bos = tiny.lm("llama")
    starts = attribute_rate(no_bos, Fact("The Eiffel", "The Eiffel Tower is in"), attributes=attrs, k=K, m=M)
    assert starts.positions["first"] is None and starts.rates["first"] is None
    ends = attribute_rate(lm, Fact("Paris", "The capital of France is Paris"), attributes=attrs, k=K, m=M,
                          positions=("subject_last", "after_subject"))
    assert ends.positions == {"subject_last": ends.positions["subject_last"], "after_subject": None}
    assert ends.rates["after_subject"] is None and len(ends.rates["subject_last"]) == lm.num_layers + 1
    with pytest.raises(ValueError, match="unknown position"):
        attribute_rate(lm, enc, attributes=attrs, positions=("middle",))


def test_attribute_rate_default_projection_is_papers_for_gpt2(attrs):
    lm = tiny_lm("gpt2")
    assert attribute_rate(lm, FACT, attributes=attrs, k=K, m=M).projection == "paper"


def test_rate_uses_count_when_fewer_than_m_clean_tokens(attrs):
    lm = tiny_lm("llama")
    enc = lm.encode(FACT)
    few = attribute_rate(lm, enc, attributes=attrs, k=8, m=50, positions=("subject_last",))
    hidden = ref_hidden_states(lm, enc.input_ids)
    pos = enc.positions.subject_last
    for layer, value in enumerate(few.rates["subject_last"]):
        expected = ref_rate(lm, hidden[layer][0, pos], attrs, "model", k=8, m=50)
        assert value == pytest.approx(expected, abs=TOL, nan_ok=True)


def test_attribute_rate_aggregate(attrs):
    lm = tiny_lm("llama")
    a = attribute_rate(lm, FACT, attributes=attrs, k=K, m=M)
    no_bos = tiny.lm("llama")  # same layers, no BOS: "Rome" starts the prompt, so b has no "first" position
    b = attribute_rate(no_bos, Fact("Rome", "Rome is the capital of"), attributes=attrs, k=K, m=M)
    agg = AttributeRateResult.aggregate([a, b.to_dict()])
    assert json.dumps(agg) == json.dumps(aggregate([a, b]))  # NaN CIs (one fact) compare equal as text
    assert agg["count"] == 2 and agg["layers"] == a.layers
    expected = (np.asarray(a.rates["last"]) + np.asarray(b.rates["last"])) / 2
    assert np.allclose(agg["rates"]["last"]["mean"], expected)
    assert len(agg["rates"]["last"]["ci95"]) == lm.num_layers + 1
    assert b.rates["first"] is None and agg["rates"]["first"]["n"] == 1
    assert np.allclose(agg["rates"]["first"]["mean"], a.rates["first"])
    assert agg["embedding_baseline"]["mean"] == pytest.approx((a.embedding_baseline + b.embedding_baseline) / 2)


def test_paragraphs_option_run_dataset_and_plots(tmp_path):
    from locedit.localization.runner import run_dataset

    lm = tiny_lm("llama")
    paragraphs = {"Eiffel Tower": " ".join(tiny.CORPUS[:4]), "Rome": "Rome is the capital of Italy"}
    facts = [FACT, Fact("Rome", "Rome is the capital of")]
    direct = attribute_rate(lm, facts[1], paragraphs=paragraphs, k=K, m=M)
    assert direct.attribute_source == "paragraphs" and direct.num_attributes == 2  # {"capital", "Italy"}
    for name, fn in (("attribute_rate", attribute_rate), ("sublayer", sublayer_knockout)):
        out = run_dataset(lm, name, facts, tmp_path / f"{name}.jsonl", options={"paragraphs": paragraphs, "k": K,
                                                                                "m": M}, progress=False)
        assert len(out.results) == 2 and not out.errors
        summary = out.aggregate()
        lines = [line["result"] for line in out.results]
        if name == "attribute_rate":
            agg = summary["attribute_rate"]
            assert json.dumps(agg) == json.dumps(aggregate(lines))
            assert lines[1]["rates"] == direct.to_dict()["rates"]
        else:
            agg = summary["sublayer_knockout"]
            assert json.dumps(agg) == json.dumps(SublayerKnockoutResult.aggregate(lines))
            assert agg["baseline_rate"]["n"] == 2
    import matplotlib.figure

    assert isinstance(direct.plot(), matplotlib.figure.Figure)
    knock = sublayer_knockout(lm, FACT, paragraphs=paragraphs, k=K, m=M)
    assert knock.attribute_source == "paragraphs" and isinstance(knock.plot(), matplotlib.figure.Figure)


# ----------------------------------------------------------------------------------------------------------------
# Sublayer knockout
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("measure_layer", [2, 3])
def test_sublayer_knockout_zero_matches_hooks(lm, attrs, measure_layer):
    enc = lm.encode(FACT)
    projection = "model"
    result = sublayer_knockout(lm, enc, attributes=attrs, window=2, measure_layer=measure_layer,
                               projection=projection, k=K, m=M)
    pos = enc.positions.subject_last
    assert result.starts == list(range(measure_layer)) and result.position == pos
    base_h, base_p = ref_knockout(lm, enc.input_ids, [], measure_layer, pos)
    target = int(base_p.argmax())
    assert result.target_id == target and result.base_prob == pytest.approx(float(base_p[target]), abs=TOL)
    assert result.baseline_rate == pytest.approx(ref_rate(lm, base_h, attrs, projection), abs=TOL, nan_ok=True)
    changed = 0
    for site in ("mlp", "attn"):
        for i, layers in enumerate(result.knocked):
            hooks = [(sublayer_module(lm, layer, site), zero_output) for layer in layers]
            h, p = ref_knockout(lm, enc.input_ids, hooks, measure_layer, pos)
            expected = ref_rate(lm, h, attrs, projection)
            assert result.attribute_rate[site][i] == pytest.approx(expected, abs=TOL, nan_ok=True)
            assert result.target_prob[site][i] == pytest.approx(float(p[target]), abs=TOL)
            changed += abs(float(p[target]) - result.base_prob) > 1e-4
    assert changed > 0  # the knockouts do something


def paper_attn_hooks(lm, layers):
    """Uniform attention the plain way: the query projection outputs zero (all logits equal)."""
    family = lm.adapter.family
    hooks = []
    for layer in layers:
        block = lm.layers[layer]
        if family == "gpt2":
            d = lm.d_model

            def hook(module, args, out, d=d):
                out = out.clone()
                out[..., :d] = 0
                return out

            hooks.append((block.attn.c_attn, hook))
        else:
            hooks.append((block.self_attn.q_proj, zero_output))
    return hooks


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_sublayer_knockout_paper_mode_matches_hooks(family, attrs):
    lm = tiny_lm(family)
    torch.manual_seed(1)
    with torch.no_grad():  # tiny models start with zero biases: give GPT-2's MLP output bias a value
        for layer in range(lm.num_layers):
            bias = lm.adapter.mlp_output_bias(lm.model, layer)
            if bias is not None:
                bias.normal_(0, 0.5)
    enc = lm.encode(FACT)
    result = sublayer_knockout(lm, enc, attributes=attrs, window=2, measure_layer=3, mode="paper",
                               projection="paper", k=K, m=M)
    pos = enc.positions.subject_last
    target = result.target_id
    for i, layers in enumerate(result.knocked):
        def bias_hook(module, args, out, layer=None):
            bias = lm.adapter.mlp_output_bias(lm.model, layer)
            return torch.zeros_like(out) if bias is None else bias.expand_as(out).clone()

        mlp_hooks = [(sublayer_module(lm, layer, "mlp"), lambda m, a, o, layer=layer: bias_hook(m, a, o, layer))
                     for layer in layers]
        for site, hooks in (("mlp", mlp_hooks), ("attn", paper_attn_hooks(lm, layers))):
            h, p = ref_knockout(lm, enc.input_ids, hooks, 3, pos)
            expected = ref_rate(lm, h, attrs, "paper")
            assert result.attribute_rate[site][i] == pytest.approx(expected, abs=TOL, nan_ok=True)
            assert result.target_prob[site][i] == pytest.approx(float(p[target]), abs=TOL)
    if family == "gpt2":  # GPT-2's MLP keeps its c_proj bias: "paper" differs from "zero"
        zero = sublayer_knockout(lm, enc, attributes=attrs, window=2, measure_layer=3, projection="paper", k=K,
                                 m=M)
        assert not np.allclose(zero.target_prob["mlp"], result.target_prob["mlp"], atol=1e-6)


def test_sublayer_window_semantics_and_defaults(attrs):
    assert knocked_layers(0, 10, 40) == list(range(10))
    assert knocked_layers(35, 10, 40) == list(range(35, 40))
    assert knocked_layers(39, 11, 40) == [39]
    lm = tiny_lm("llama")
    result = sublayer_knockout(lm, FACT, attributes=attrs, k=K, m=M)
    assert result.measure_layer == 3 and result.window == 10 and result.mode == "zero"  # round(4 * 40/48)
    assert result.knocked == [[0, 1, 2], [1, 2], [2]]
    check = attribute_rate(lm, FACT, attributes=attrs, k=K, m=M)
    assert result.baseline_rate == pytest.approx(check.rates["subject_last"][result.measure_layer + 1])
    assert result.to_dict()["analysis"] == "sublayer_knockout"
    with pytest.raises(InterventionError, match="measure_layer"):
        sublayer_knockout(lm, FACT, attributes=attrs, measure_layer=4)
    with pytest.raises(InterventionError, match="mode"):
        sublayer_knockout(lm, FACT, attributes=attrs, mode="mean")
    with pytest.raises(InterventionError, match="window must be at least 1"):
        sublayer_knockout(lm, FACT, attributes=attrs, window=0)


def test_sublayer_aggregate(attrs):
    lm = tiny_lm("gpt2")
    a = sublayer_knockout(lm, FACT, attributes=attrs, window=2, k=K, m=M)
    b = sublayer_knockout(lm, Fact("Rome", "Rome is the capital of"), attributes=attrs, window=2, k=K, m=M)
    agg = SublayerKnockoutResult.aggregate([a, b.to_dict()])
    assert agg["starts"] == a.starts and agg["count"] == 2
    for key in ("attribute_rate", "target_prob"):
        for site in ("mlp", "attn"):
            expected = (np.asarray(getattr(a, key)[site]) + np.asarray(getattr(b, key)[site])) / 2
            assert np.allclose(agg[key][site]["mean"], expected)
            assert len(agg[key][site]["ci95"]) == len(a.starts)
    assert agg["base_prob"]["mean"] == pytest.approx((a.base_prob + b.base_prob) / 2)


# ----------------------------------------------------------------------------------------------------------------
# Attribute sets and paragraph files
# ----------------------------------------------------------------------------------------------------------------
def test_from_text_filter_keeps_leading_space():
    tok = tiny.tokenizer()  # byte-level: " Paris" and " capital" are single tokens
    text = "The capital of France is Paris and the capital of Italy is Rome"
    a = AttributeSet.from_text(tok, "France", text)
    decoded = {tok.decode([i]) for i in tok(text)["input_ids"]}
    assert {" Paris", " capital", " is", " of", " the"} <= decoded
    assert a.tokens == {" Paris", " capital"}  # exact decoded strings, leading space included
    assert "Paris" not in a and " is" not in a and "The" not in a  # no space-stripping; stopwords out
    assert a.tokens == {t for t in decoded if len(t.strip()) > 2 and t.strip().lower() not in STOPWORDS}
    assert a.subject == "France" and a.source == "text" and len(a) == 2
    several = AttributeSet.from_text(tok, "x", ["in Paris", "the capital"], source="paragraphs")
    assert several.tokens == {" Paris", " capital"} and several.source == "paragraphs"
    assert AttributeSet.from_text(tok, "x", "is the of in").tokens == frozenset()


def test_load_paragraphs_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"subject": "Beats Music", "text": "Beats Music is owned by Apple."}, {},
            {"subject": "Rome", "paragraphs": "Rome is in Italy."},
            {"subject": "Beats Music", "text": "It streams music."}]
    path.write_text("\n".join("" if not r else json.dumps(r) for r in rows) + "\n")
    data = load_paragraphs(path)
    assert data == {"Beats Music": "Beats Music is owned by Apple.\nIt streams music.", "Rome": "Rome is in Italy."}


@pytest.mark.parametrize("column", ["text", "paragraphs"])
def test_load_paragraphs_csv(tmp_path, column):
    path = tmp_path / "p.csv"
    path.write_text(f'subject,{column}\nBeats Music,"Owned by Apple, since 2014."\nRome,Capital of Italy\n'
                    'Rome,"On seven\nhills"\n')
    assert load_paragraphs(path) == {"Beats Music": "Owned by Apple, since 2014.",
                                     "Rome": "Capital of Italy\nOn seven\nhills"}


@pytest.mark.parametrize("name, content, where", [
    ("bad.jsonl", '{"subject": "a", "text": "b"}\n{"subject": "a", "text": \n', "line 2"),
    ("bad2.jsonl", '{"subject": "a", "text": "b"}\n\n["a", "b"]\n', "line 3"),
    ("bad3.jsonl", '{"subject": "", "text": "b"}\n', "line 1"),
    ("bad4.jsonl", '{"subject": "a", "text": 3}\n', "line 1"),
    ("bad.csv", "subject,text\na,b\nc\n", "line 3"),
    ("bad2.csv", "subject,text\na,b\nc,d,e\n", "line 3"),
    ("bad3.csv", "name,text\na,b\n", "line 1"),
])
def test_load_paragraphs_malformed(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetError) as info:
        load_paragraphs(path)
    assert name in str(info.value) and where in str(info.value)


def test_load_paragraphs_bad_files(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_paragraphs(tmp_path / "missing.jsonl")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(DatasetError, match="format"):
        load_paragraphs(tmp_path / "p.txt")


def test_generated_attribute_set_is_seeded_and_offline():
    lm = tiny_lm("llama")
    state = torch.random.get_rng_state()
    a = generate_attribute_text(lm, "Eiffel Tower", max_new_tokens=6, samples=2, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched
    assert a == generate_attribute_text(lm, "Eiffel Tower", max_new_tokens=6, samples=2, seed=3)
    assert len(a.splitlines()) >= 4  # at least one continuation per default prompt
    generated = attribute_set(lm, "Eiffel Tower", {"Rome": "Rome is in Italy"}, max_new_tokens=6, samples=0)
    assert generated.source == "generated" and generated.subject == "Eiffel Tower"
    given = attribute_set(lm, "Rome", {"Rome": "Rome is the capital of Italy"})
    assert given.source == "paragraphs" and given.tokens == {"capital", "Italy"}
    empty = attribute_set(lm, "Rome", {"Rome": "  "}, max_new_tokens=4, samples=0)
    assert empty.source == "generated"


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2 smoke test
# ----------------------------------------------------------------------------------------------------------------
def test_smollm2_eiffel_attribute_rate(smollm2, eiffel):
    tok = smollm2.tokenizer
    real = AttributeSet.from_text(tok, "Apple", "Beats Music is owned by Apple, the maker of the iPhone.")
    assert " Apple" in real and "Apple" not in real and " iPhone" in real and " the" not in real
    start = time.time()
    attributes = attribute_set(smollm2, eiffel.subject, max_new_tokens=32, samples=0)
    result = attribute_rate(smollm2, eiffel, attributes=attributes)
    knock = sublayer_knockout(smollm2, eiffel, attributes=attributes)
    elapsed = time.time() - start
    assert attributes.source == "generated" and len(attributes) > 10
    rates = result.rates["subject_last"]
    assert len(rates) == smollm2.num_layers + 1 and all(0 <= r <= 100 for r in rates)
    assert max(rates) > 0 and result.target == " Paris"
    assert result.positions["first"] is None  # "The" belongs to the subject
    assert 0 <= knock.baseline_rate <= 100 and knock.measure_layer == 25
    assert knock.baseline_rate == pytest.approx(rates[26])
    assert all(0 <= r <= 100 for site in ("mlp", "attn") for r in knock.attribute_rate[site])
    assert elapsed < 180

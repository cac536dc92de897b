"""Conformance of the flow analyses with independent, straightforward computations on tiny random models."""

import numpy as np
import pytest
import torch

import locedit
import tiny
from locedit import Fact
from locedit.core.adapters import _get
from locedit.localization.causal_trace import causal_trace
from locedit.localization.common import window_layers
from locedit.localization.extraction import extraction_events
from locedit.localization.heads import head_effects, head_projection
from locedit.localization.knockout import attention_knockout, knockout_map
from locedit.localization.patching import state_patching

TOL = 1e-5
FACT = Fact("Eiffel Tower", "The Eiffel Tower is located in the city of")


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma2", "gpt_neox"])
def lm(request):
    return tiny.lm(request.param, tokenizer_kind="metaspace")


def probs_of(logits, token):
    return logits.float().softmax(-1)[token].item()


def test_knockout_sweep_equals_per_configuration_loop(lm):
    result = attention_knockout(lm, FACT, window=3)
    enc = lm.encode(FACT)
    target, base = result.target_id, result.base_prob
    for group, positions in result.groups.items():
        for layer in range(lm.num_layers):
            layers = list(window_layers(layer, 3, lm.num_layers))
            ref = probs_of(tiny.reference_knockout(lm._family, enc.input_ids, [(layers, [-1], positions)]), target)
            assert abs(result.probs[group][layer] - ref) <= TOL
            assert abs(result.relative_change[group][layer] - 100 * (ref - base) / base) <= 1e-3
    assert "first" in result.groups and 0 not in result.groups["non_subject"]  # metaspace adds <s>
    paper = attention_knockout(lm, FACT, window=3, groups="paper")
    assert 0 in paper.groups["non_subject"] and set(paper.groups) == {"subject", "non_subject", "last"}


def test_knockout_map_matches_sweep(lm):
    enc = lm.encode(FACT)
    result = knockout_map(lm, FACT, window=3)
    pos = enc.positions.subject_last
    sweep = attention_knockout(lm, FACT, window=3, groups={"one": [pos]})
    assert np.allclose(result.probs[pos], sweep.probs["one"], atol=TOL)


def _hook_outputs(lm, ids):
    """Plain forward hooks on the sublayer modules: their outputs at the last position."""
    outs = {"attn": {}, "mlp": {}}
    handles = []
    for layer, block in enumerate(lm.layers):
        for site, path in (("attn", lm.adapter.attn_out), ("mlp", lm.adapter.mlp_out)):
            def hook(module, args, output, site=site, layer=layer):
                out = output[0] if isinstance(output, tuple) else output
                outs[site][layer] = out[0, -1].detach()
            handles.append(_get(block, path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return outs


@pytest.mark.parametrize("projection", ["model", "paper"])
def test_extraction_events_equal_manual_projection(lm, projection):
    enc = lm.encode(FACT)
    result = extraction_events(lm, FACT, projection=projection)
    outs = _hook_outputs(lm, enc.input_ids)
    with torch.no_grad():
        for site in ("attn", "mlp"):
            for layer in range(lm.num_layers):
                scores = lm.project(outs[site][layer], projection)
                rank = int((scores > scores[result.target_id]).sum())
                assert rank == getattr(result, f"{site}_rank")[layer]
                assert (layer in getattr(result, f"{site}_events")) == (int(scores.argmax()) == result.target_id)


def test_extraction_ablations_renormalise(lm):
    """Forcing an event: an ablation's result equals a reference eager run with that edge set blocked at that layer."""
    enc = lm.encode(FACT)
    result = extraction_events(lm, FACT, projection="model")
    target = result.target_id
    from locedit.localization.extraction import _ablations, ablation_keys

    layer = lm.num_layers - 1
    abl = _ablations(lm, enc, [layer], target, "model")[str(layer)]
    blocked = ablation_keys(enc)["block_subject"]
    # reference: eager model with the subject blocked at `layer` only, capture the attention output by hook
    ref_model = tiny.model(lm._family, attn="eager")
    ref = locedit.load((ref_model, lm.tokenizer), validate=False)
    outs = {}
    n = len(enc)
    mask = torch.zeros(1, 1, n, n)
    mask.masked_fill_(~torch.ones(n, n, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    mask[0, 0, n - 1, list(blocked)] = torch.finfo(torch.float32).min
    block = ref.layers[layer]
    h1 = _get(block, ref.adapter.attn).register_forward_pre_hook(
        lambda m, a, k: (a, {**k, "attention_mask": mask}), with_kwargs=True)

    def keep(module, args, output):
        outs["a"] = (output[0] if isinstance(output, tuple) else output)[0, -1]

    h2 = _get(block, ref.adapter.attn_out).register_forward_hook(keep)
    try:
        with torch.no_grad():
            ref.model(input_ids=torch.tensor([enc.input_ids]))
    finally:
        h1.remove()
        h2.remove()
    with torch.no_grad():
        scores = ref.project(outs["a"], "model")
    assert abl["block_subject"]["rank"] == int((scores > scores[target]).sum())


def test_state_patching_equals_loop(lm):
    enc = lm.encode(FACT)
    result = state_patching(lm, FACT, source_layers=(0, 2))
    with torch.no_grad():
        hidden = lm.model(input_ids=torch.tensor([enc.input_ids]), output_hidden_states=True).hidden_states
    for group, positions in [("subject", enc.positions.subject), ("last", (enc.positions.last,))]:
        for source in (0, 2):
            for layer in range(lm.num_layers):
                def pre(module, args, kwargs):
                    h = kwargs.get("hidden_states", args[0] if args else None).clone()
                    h[0, list(positions)] = hidden[source][0, list(positions)]
                    return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

                handle = lm.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
                try:
                    outs = _hook_outputs(lm, enc.input_ids)
                finally:
                    handle.remove()
                with torch.no_grad():
                    top = int(lm.project(outs["attn"][layer], "model").argmax()) if lm.default_projection() == "model" \
                        else int(lm.project(outs["attn"][layer], "paper").argmax())
                assert result.events[group][str(source)][layer] == (top == result.target_id)


def test_causal_trace_equals_serial_rome_loop(lm):
    enc = lm.encode(FACT)
    samples, std = 2, 0.5
    result = causal_trace(lm, FACT, samples=samples, noise_std=std, noise=1.0, seed=3)
    rng = np.random.RandomState(3)
    noise = torch.from_numpy(rng.randn(samples, len(enc.positions.subject), lm.d_model)).float() * std
    subject = list(enc.positions.subject)
    with torch.no_grad():
        clean = lm.model(input_ids=torch.tensor([enc.input_ids]), output_hidden_states=True).hidden_states
    embed = lm.adapter.embed_module(lm.model)

    def corrupt(module, args, output):
        output = output.clone()
        output[:, subject] += noise
        return output

    for position in range(len(enc)):
        for layer in range(0, lm.num_layers - 1):  # restoring the output of `layer` = the input of layer + 1
            def restore(module, args, kwargs, position=position, layer=layer):
                h = kwargs.get("hidden_states", args[0] if args else None).clone()
                h[:, position] = clean[layer + 1][0, position]
                return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

            handles = [embed.register_forward_hook(corrupt),
                       lm.layers[layer + 1].register_forward_pre_hook(restore, with_kwargs=True)]
            try:
                with torch.no_grad():
                    logits = lm.model(input_ids=torch.tensor([enc.input_ids] * samples)).logits[:, -1]
            finally:
                for h in handles:
                    h.remove()
            ref = logits.float().softmax(-1)[:, result.target_id].mean().item()
            assert abs(result.scores[position][layer] - ref) <= TOL, (position, layer)
    # restoring the last position's final state gives back the clean probability
    assert abs(result.scores[-1][lm.num_layers - 1] - result.high_score) <= TOL


def test_head_effects_output_knockout_equals_hook_loop(lm):
    enc = lm.encode(FACT)
    result = head_effects(lm, FACT)
    for layer in (0, lm.num_layers - 1):
        for head in range(lm.num_heads):
            o_proj = _get(lm.layers[layer], lm.adapter.attn_o)

            def zero(module, args, kwargs, head=head):
                z = (args[0] if args else kwargs["input"]).clone()
                z[0, -1, head * lm.head_dim:(head + 1) * lm.head_dim] = 0
                return ((z, *args[1:]), kwargs) if args else (args, {**kwargs, "input": z})

            handle = o_proj.register_forward_pre_hook(zero, with_kwargs=True)
            try:
                with torch.no_grad():
                    p = probs_of(lm.model(input_ids=torch.tensor([enc.input_ids])).logits[0, -1], result.target_id)
            finally:
                handle.remove()
            expected = 100 * (p - result.base_prob) / result.base_prob
            assert abs(result.output_knockout[layer][head] - expected) <= 1e-3


def test_head_projection_matches_manual(lm):
    enc = lm.encode(FACT)
    result = head_projection(lm, FACT, projection="model")
    layer, head = 1, 2
    w_v, b_v = lm.adapter.head_value_weight(lm.model, layer, head)
    w_o = lm.adapter.head_output_weight(lm.model, layer, head)
    ids = torch.tensor(enc.input_ids[enc.subject_start:enc.subject_end])
    with torch.no_grad():
        x = lm.adapter.embed_module(lm.model)(ids)
        out = (x @ w_v.T + (b_v if b_v is not None else 0)) @ w_o.T
        scores = lm.project(out, "model")
        ranks = (scores > scores[:, result.target_id:result.target_id + 1]).sum(-1)
    assert result.rank_subject_tokens[layer][head] == int(ranks.min())


def test_a_given_target_that_is_not_the_top1_is_the_one_tracked(lm):
    """One meaning for `Fact.target` (issue #15): a given target is tracked and scored, `None` tracks the top-1,
    and every result records which."""
    from locedit.localization import (attribute_rate, causal_trace, extraction_events, head_effects,
                                      head_projection, knockout_map, locate, state_patching, sublayer_knockout)
    from locedit.localization.attributes import AttributeSet

    enc = lm.encode(FACT)
    with torch.no_grad():
        probs = lm.model(input_ids=torch.tensor([enc.input_ids])).logits[0, -1].float().softmax(-1)
    top1 = int(probs.argmax())
    given = next(w for w in (" Paris", " Rome", " London", " Apple", " city")
                 if lm.encode(Fact(FACT.subject, FACT.prompt, w)).target_id != top1)
    fact = Fact(FACT.subject, FACT.prompt, given)
    target_id = lm.encode(fact).target_id
    assert target_id != top1  # the case under test: the given target is not what the model predicts

    knock = attention_knockout(lm, fact, window=3)
    assert (knock.target_id, knock.target_source, knock.target_text) == (target_id, "given", given)
    assert knock.target == lm.token_str(target_id) and abs(knock.base_prob - probs[target_id].item()) <= TOL
    # the knocked-out probabilities are those of the given token, not of the top-1
    layers = list(window_layers(1, 3, lm.num_layers))
    ref = probs_of(tiny.reference_knockout(lm._family, enc.input_ids, [(layers, [-1], knock.groups["subject"])]),
                   target_id)
    assert abs(knock.probs["subject"][1] - ref) <= TOL
    attrs = AttributeSet(FACT.subject, frozenset({" Paris"}), "given")
    for fn, options in ((causal_trace, {"samples": 2}), (knockout_map, {"window": 3}), (head_effects, {}),
                        (head_projection, {}), (state_patching, {"source_layers": (0, 1)}),
                        (extraction_events, {}), (attribute_rate, {"attributes": attrs}),
                        (sublayer_knockout, {"attributes": attrs, "window": 2}), (locate, {})):
        result = fn(lm, fact, **options).to_dict()
        assert (result["target_id"], result["target_source"]) == (target_id, "given"), fn.__name__
        top = fn(lm, FACT, **options).to_dict()
        assert (top["target_id"], top["target_source"], top["target_text"]) == (top1, "top1", lm.token_str(top1))

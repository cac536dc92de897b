"""Engine conformance on randomly initialised tiny models of every supported family."""

import pytest
import torch

import locedit
import tiny
from locedit import (AddEmbeddingNoise, BlockAttention, Capture, Fact, SetHeads, SetResidual, SetSublayer,
                     UniformAttention, run, run_batch)
from locedit.core.engine import registered

TOL = 1e-5
FACT = Fact("Eiffel Tower", "The Eiffel Tower is located in the city of")
SHORT = Fact("Rome", "Rome is the capital of")


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def lm(request):
    return tiny.lm(request.param)


def plain_logits(lm, enc):
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([enc.input_ids])).logits[0, -1]


def test_no_intervention_equals_hf(lm):
    enc = lm.encode(FACT)
    with torch.no_grad():
        out = run(lm, enc)
    assert (out.logits[0] - plain_logits(lm, enc)).abs().max() <= TOL


def test_knockout_equals_slow_reference(lm):
    enc = lm.encode(FACT)
    P = enc.positions
    blocks = [(range(0, 2), [P.last], P.subject), (range(1, 4), [P.last], P.non_subject)]
    with torch.no_grad():
        ours = run(lm, enc, [[BlockAttention(l, q, k) for l, q, k in blocks]]).logits[0]
    ref = tiny.reference_knockout(lm._family, enc.input_ids, blocks)
    assert (ours - ref).abs().max() <= TOL
    assert (ours - plain_logits(lm, enc)).abs().max() > 1e-3  # the knockout did something


def _rows(lm, P):
    L = lm.num_layers
    return [
        [],
        [BlockAttention(range(L), [P.last], P.subject)],
        [BlockAttention([L - 1], [P.last], P.non_subject, heads=[0, 2])],
        [SetSublayer("mlp", [1], P.subject)],
        [SetSublayer("attn", [2, 3], [P.last])],
        [SetHeads([0, L - 1], [1, 3], [P.last])],
        [UniformAttention([1], [P.last])],
        [SetResidual(2, [P.subject_last], torch.randn(lm.d_model))],
        [AddEmbeddingNoise(P.subject, torch.randn(len(P.subject), lm.d_model))],
        [SetResidual(L, [P.last], torch.randn(lm.d_model))],
    ]


def test_mixed_batch_rows_equal_single_runs(lm):
    enc = lm.encode(FACT)
    rows = _rows(lm, enc.positions)
    with torch.no_grad():
        batched = run(lm, enc, rows).logits
        for i, row in enumerate(rows):
            alone = run(lm, enc, [row], reuse_prefix=False).logits[0]
            assert (batched[i] - alone).abs().max() <= TOL, f"row {i}: {row}"
    # every non-empty row changes the output
    assert all((batched[i] - batched[0]).abs().max() > 1e-4 for i in range(1, len(rows)))


def test_prefix_reuse_equals_full_recompute(lm):
    enc = lm.encode(FACT)
    P = enc.positions
    L = lm.num_layers
    rows = [[BlockAttention(range(max(0, l - 1), min(L, l + 2)), [P.last], g)]
            for g in (P.subject, P.non_subject, (P.last,)) for l in range(L)]
    rows += [[SetResidual(l, [P.subject_last], torch.randn(lm.d_model))] for l in range(L)]
    capture = Capture(residual=True, attn=True, mlp=True, heads=True, mlp_keys=True)
    with torch.no_grad():
        full = run(lm, enc, rows, capture=capture, reuse_prefix=False)
        reused = run(lm, enc, rows, capture=capture)
    assert (full.logits - reused.logits).abs().max() <= TOL
    for key, value in full.captures.data.items():
        assert torch.allclose(value, reused.captures[key], atol=1e-4, rtol=1e-5), key


def test_prefix_reuse_with_several_bases(lm):
    enc = lm.encode(FACT)
    P = enc.positions
    g = torch.Generator().manual_seed(0)
    bases = [[AddEmbeddingNoise(P.subject, torch.randn(len(P.subject), lm.d_model, generator=g))] for _ in range(3)]
    rows, row_base = [], []
    for b in range(3):
        for layer in range(lm.num_layers):
            rows.append([SetSublayer("mlp", [layer], [P.subject_last], torch.randn(lm.d_model, generator=g))])
            row_base.append(b)
    with torch.no_grad():
        full = run(lm, enc, rows, bases=bases, row_base=row_base, reuse_prefix=False)
        reused = run(lm, enc, rows, bases=bases, row_base=row_base)
    assert (full.logits - reused.logits).abs().max() <= TOL


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_padding_gives_same_numbers(side, kind):
    for family in ("llama", "gpt2", "gemma2"):
        lm = tiny.lm(family, tokenizer_kind=kind)
        facts = [lm.encode(FACT), lm.encode(SHORT)]
        rows = [[BlockAttention([0, 1], [-1], facts[0].positions.subject)],
                [SetSublayer("mlp", [1], facts[1].positions.subject)]]
        capture = Capture(residual=True, heads=True, layers=[1, 2])
        with torch.no_grad():
            batch = run_batch(lm, facts, rows, capture=capture, padding_side=side)
            for i, (enc, row) in enumerate(zip(facts, rows)):
                alone = run(lm, enc, [row], capture=capture, reuse_prefix=False)
                assert (batch.logits[i] - alone.logits[0]).abs().max() <= TOL, (family, kind, side, i)
                for key in [("residual", 1), ("heads", 2)]:
                    got = batch.captures.row(key[0], key[1], i)
                    assert (got - alone.captures[key][0]).abs().max() <= TOL


def test_captures_match_hf_hidden_states(lm):
    enc = lm.encode(FACT)
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        hf = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        out = run(lm, enc, capture=Capture(residual=True))
    for layer in range(lm.num_layers):  # HF's last entry is after the final norm; ours is before it
        assert (out.captures["residual", layer][0] - hf[layer][0]).abs().max() <= TOL
    final = lm.adapter.final_norm_module(lm.model)(out.captures["residual", lm.num_layers])
    assert (final[0] - hf[-1][0]).abs().max() <= TOL


def test_head_weights_reconstruct_attention_output(lm):
    """Per-head W_V / W_O slices (fused, interleaved, Conv1D, grouped-query) reproduce the attention output."""
    enc = lm.encode(FACT)
    layer = 1
    inputs = {}
    module = locedit.core.adapters._get(lm.layers[layer], lm.adapter.attn)
    def keep_input(module, args, kwargs):
        inputs["x"] = kwargs.get("hidden_states", args[0] if args else None)

    handle = module.register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        with torch.no_grad():
            out = run(lm, enc, capture=Capture(heads=True, attn=True, attn_weights=True, layers=[layer]),
                      reuse_prefix=False)
    finally:
        handle.remove()
    x = inputs["x"][0]  # (n, d): the attention module's (normalised) input
    z = out.captures["heads", layer][0]  # (n, heads, head_dim)
    weights = out.captures["attn_weights", layer][0]  # (heads, n, n)
    total = torch.zeros(lm.d_model)
    for h in range(lm.num_heads):
        w_v, b_v = lm.adapter.head_value_weight(lm.model, layer, h)
        v = x @ w_v.T + (b_v if b_v is not None else 0)
        z_last = weights[h, -1] @ v
        assert (z_last - z[-1, h]).abs().max() <= 1e-4, f"head {h} value slice"
        total = total + lm.adapter.head_output_weight(lm.model, layer, h) @ z[-1, h]
    bias = lm.adapter.attn_output_bias(lm.model, layer)
    total = total + (bias if bias is not None else 0)
    if not lm.adapter.post_norms:
        assert (total - out.captures["attn", layer][0, -1]).abs().max() <= 1e-4


def test_gradients_flow_through_interventions(lm):
    enc = lm.encode(FACT)
    value = torch.zeros(lm.d_model, requires_grad=True)
    out = run(lm, enc, [[SetResidual(1, [enc.positions.subject_last], value)]])
    out.logits[0].logsumexp(-1).backward()
    assert value.grad is not None and value.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.model.parameters())


def test_exception_inside_context_leaves_model_untouched(lm):
    enc = lm.encode(FACT)
    before = plain_logits(lm, enc)
    impl = lm.model.config._attn_implementation
    hooks_before = _hook_ids(lm.model)
    with pytest.raises(RuntimeError, match="boom"):
        with locedit.intervene(lm, [[SetSublayer("mlp", [0], [0])]], seq_len=len(enc.input_ids),
                               capture=Capture(residual=True)):
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([enc.input_ids]))
            raise RuntimeError("boom")
    assert (plain_logits(lm, enc) - before).abs().max() == 0
    assert lm.model.config._attn_implementation == impl
    assert not registered()
    assert _hook_ids(lm.model) == hooks_before


def _hook_ids(model):
    return {(name, kind, key) for name, module in model.named_modules()
            for kind in ("_forward_hooks", "_forward_pre_hooks") for key in getattr(module, kind)}


def test_intervene_context_applies_interventions(lm):
    enc = lm.encode(FACT)
    ids = torch.tensor([enc.input_ids] * 2)
    with torch.no_grad():
        with locedit.intervene(lm, [[], [SetSublayer("attn", [0], enc.positions.subject)]],
                               seq_len=len(enc.input_ids), capture=Capture(mlp=True, layers=[0])) as cap:
            logits = lm.model(input_ids=ids).logits[:, -1]
    assert (logits[0] - plain_logits(lm, enc)).abs().max() <= TOL
    assert (logits[1] - logits[0]).abs().max() > 1e-4
    assert cap["mlp", 0].shape == (2, len(enc.input_ids), lm.d_model)


def test_chunked_passes_equal_full_recompute(lm):
    """Rows restoring states at every (position, layer), as causal tracing does, split into several passes."""
    from locedit.core.engine.run import _reuse_point, plan_chunks

    enc = lm.encode(FACT)
    n, L = len(enc), lm.num_layers
    g = torch.Generator().manual_seed(1)
    rows = [[SetResidual(l, [t], torch.randn(lm.d_model, generator=g))] for t in range(n) for l in range(L + 1)]
    bases = [[AddEmbeddingNoise(enc.positions.subject, torch.randn(lm.d_model, generator=g))] for _ in range(2)]
    row_base = [i % 2 for i in range(len(rows))]
    chunks = plan_chunks([_reuse_point([r], n, L) for r in rows], n, L, 2)
    assert len(chunks) > 1
    capture = Capture(residual=True, layers=[0, L])
    with torch.no_grad():
        full = run(lm, enc, rows, bases=bases, row_base=row_base, capture=capture, reuse_prefix=False)
        chunked = run(lm, enc, rows, bases=bases, row_base=row_base, capture=capture)
    assert (full.logits - chunked.logits).abs().max() <= TOL
    for key in full.captures.data:
        assert torch.allclose(full.captures[key], chunked.captures[key], atol=1e-4, rtol=1e-5)


# --- editing's interventions: AddToSublayer, AddLinear, PrefixedBatch, Capture(outputs), second_moments ---------
def _module_of(lm, kind, layer):
    if kind == "layer":
        return lm.layers[layer]
    return lm.adapter.layer_part(lm.model, layer, getattr(lm.adapter, kind))


def _hooked_logits(lm, ids, kind, layer, fn):
    """Plain HF forward with a hand-written forward hook: output -> fn(input, output tensor)."""
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(args[0], output[0]), *output[1:])
        return fn(args[0], output)

    handle = _module_of(lm, kind, layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
    finally:
        handle.remove()


def _columns(lm, kind):
    if kind != "qkv":
        return None, lm.d_model
    rows = lm.adapter.head_value_rows(lm.model, 1)
    return (rows.start, rows.stop), rows.stop - rows.start


@pytest.mark.parametrize("kind", ["mlp_down", "attn_o", "qkv", "layer"])
def test_add_to_sublayer_equals_a_hand_written_hook(lm, kind):
    from locedit.core.engine import AddToSublayer

    enc = lm.encode(FACT)
    p = enc.positions.subject_last
    columns, width = _columns(lm, kind)
    value = torch.randn(width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        zero = run(lm, enc, [[AddToSublayer(kind, 1, [p], torch.zeros(width), columns)]]).logits[0]
        ours = run(lm, enc, [[AddToSublayer(kind, 1, [p], value, columns)]]).logits[0]
    cols = slice(None) if columns is None else slice(*columns)

    def add(x, out):
        out = out.clone()
        out[0, p, cols] += value
        return out

    ref = _hooked_logits(lm, enc.input_ids, kind, 1, add)
    assert (zero - plain_logits(lm, enc)).abs().max() <= TOL
    assert (ours - ref).abs().max() <= 1e-4 and (ours - zero).abs().max() > 1e-4


def test_add_linear_equals_a_hand_written_hook_and_trains(lm):
    from locedit.core.engine import AddLinear, prefixed

    enc = lm.encode(FACT)
    weight = lm.adapter.layer_part(lm.model, 2, lm.adapter.mlp_down).weight
    shape = weight.shape[::-1] if lm.adapter.conv1d else weight.shape
    D = (0.05 * torch.randn(*shape, generator=torch.Generator().manual_seed(4))).requires_grad_(True)
    ids = torch.tensor([enc.input_ids])
    out = prefixed(lm, ids, torch.ones_like(ids)).run([[AddLinear("mlp_down", 2, D)]], logits_at=[len(enc) - 1])
    ref = _hooked_logits(lm, enc.input_ids, "mlp_down", 2, lambda x, o: o + (x.float() @ D.detach().T).to(o.dtype))
    assert (out.logits[0, 0].detach() - ref).abs().max() <= 1e-4
    out.logits.logsumexp(-1).sum().backward()
    assert D.grad is not None and D.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.model.parameters())


def test_prefixed_batch_equals_the_full_forward_with_gradients(lm):
    """Two left-padded prompts whose key columns align: the cached-prefix run gives the full run's logits and
    the same gradient into the added value; writing inside the prefix is refused."""
    from locedit.core.engine import AddToSublayer, prefixed
    from locedit.errors import InterventionError

    a, b = lm.encode(FACT), lm.encode(SHORT)
    ka, kb = a.positions.subject_last, b.positions.subject_last
    P = max(ka, kb)
    width = P + max(len(a) - ka, len(b) - kb)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, (enc, k) in enumerate(((a, ka), (b, kb))):
        ids[i, P - k:P - k + len(enc)] = torch.tensor(enc.input_ids)
        mask[i, P - k:P - k + len(enc)] = 1
    results = []
    for prefix in (0, P):
        value = torch.zeros(lm.d_model, requires_grad=True)
        batch = prefixed(lm, ids, mask, prefix)
        rows = [[AddToSublayer("mlp_down", 1, [ka], value)], [AddToSublayer("mlp_down", 1, [kb], value)]]
        out = batch.run(rows, capture=Capture(mlp_keys=True, layers=[1]), logits_at=[width - 1 - prefix])
        out.logits.float().log_softmax(-1)[:, 0, 5].sum().backward()
        results.append((out.logits.detach(), value.grad.clone(), out.captures["mlp_keys", 1][:, P - prefix]))
    (full, g_full, k_full), (cached, g_cached, k_cached) = results
    assert (full - cached).abs().max() <= 1e-4
    assert torch.allclose(g_full, g_cached, atol=1e-4, rtol=1e-3) and g_full.abs().sum() > 0
    assert torch.allclose(k_full.detach(), k_cached.detach(), atol=1e-5)
    with pytest.raises(InterventionError, match="inside the cached prefix"):
        prefixed(lm, ids, mask, P).run([[AddToSublayer("mlp_down", 1, [0], torch.zeros(lm.d_model))], []])


def test_capture_outputs_are_the_projections_outputs(lm):
    enc = lm.encode(FACT)
    L = lm.num_layers
    with torch.no_grad():
        caps = run(lm, enc, capture=Capture(outputs=("layer", "mlp_down", "attn_o"), residual=True, mlp=True,
                                            attn=True)).captures
    for layer in range(L):
        assert torch.equal(caps["layer", layer], caps["residual", layer + 1])
        if not lm.adapter.post_norms:
            assert torch.allclose(caps["mlp_down", layer], caps["mlp", layer], atol=1e-6)
            if lm.adapter.attn_out == lm.adapter.attn_o.rsplit(".", 1)[0]:
                assert torch.allclose(caps["attn_o", layer], caps["attn", layer], atol=1e-6)


def test_second_moments_equal_the_captured_states(lm):
    from locedit.core.engine import second_moments

    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(3, 300, (2, 7), generator=g), torch.randint(3, 300, (1, 9), generator=g)]
    calls = []
    handle = lm.layers[lm.num_layers - 1].register_forward_hook(lambda *a: calls.append(1))
    try:
        moments = second_moments(lm, batches, Capture(mlp_keys=True, heads=True, attn_in=True, layers=[1]))
    finally:
        handle.remove()
    assert calls == [] and moments.tokens == 23
    for site in ("mlp_keys", "heads", "attn_in"):
        total = 0
        for batch in batches:
            with torch.no_grad():
                x = run_batch(lm, batch.tolist(), capture=Capture(**{site: True}, layers=[1])).captures[site, 1]
            x = x.reshape(-1, x.shape[-2] * x.shape[-1]) if site == "heads" else x.reshape(-1, x.shape[-1])
            total = total + x.double().T @ x.double()
        assert moments.counts[site, 1] == 23
        assert torch.allclose(moments.sums[site, 1].double(), total, atol=1e-3, rtol=1e-4)


def test_forward_keeps_the_asked_logits(lm):
    from locedit.core.engine import forward, forward_accepts

    enc = lm.encode(FACT)
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        full = lm.model(input_ids=ids).logits
        some = forward(lm, ids, logits_at=torch.tensor([1, 3])).logits
        last = forward(lm, ids, logits_at=1).logits
    assert isinstance(forward_accepts(lm, "logits_to_keep"), bool)
    assert some.shape[1] == 2 and (some - full[:, [1, 3]]).abs().max() <= TOL
    assert (last[:, -1] - full[:, -1]).abs().max() <= TOL


def test_projection_hooks_only_when_asked(lm):
    from locedit.core.engine import AddToSublayer
    from locedit.core.engine.hooks import attached

    counts = {}
    for projections in (False, True):
        with attached(lm, projections):
            counts[projections] = len(_hook_ids(lm.model))
    assert counts[True] > counts[False]
    before = _hook_ids(lm.model)
    with torch.no_grad():
        run(lm, lm.encode(FACT), [[AddToSublayer("layer", 0, [0], torch.zeros(lm.d_model))]])
    assert _hook_ids(lm.model) == before and not registered()


def test_prefixed_batch_as_a_context_keeps_one_attachment(lm):
    from locedit.core.engine import AddToSublayer, prefixed
    from locedit.errors import InterventionError

    enc = lm.encode(FACT)
    ids = torch.tensor([enc.input_ids])
    before = _hook_ids(lm.model)
    value = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(6))
    rows = [[AddToSublayer("mlp_down", 1, [enc.positions.subject_last], value)]]
    with torch.no_grad():
        alone = prefixed(lm, ids, torch.ones_like(ids), 2).run(rows).logits
        with prefixed(lm, ids, torch.ones_like(ids), 2) as batch:
            inside = _hook_ids(lm.model)
            held = [batch.run(rows).logits for _ in range(2)]
            with pytest.raises(InterventionError, match="already has locedit interventions"):
                run(lm, enc)
    assert inside != before and _hook_ids(lm.model) == before and not registered()
    assert all(torch.equal(h, alone) for h in held)

"""Scale: half precision (dtype-aware validation and tolerances), device-safe engine pieces, the resolved target
shared by locate's analyses, and the GGUF conversion cache."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch

import locedit
import tiny
from locedit.core.engine import BlockAttention, SetSublayer, run
from locedit.errors import UnsupportedModelError
from locedit.core.lm import validation_tolerance

FACT = locedit.Fact("The Eiffel Tower", "The Eiffel Tower is located in the city of", " Paris")
run_module = importlib.import_module("locedit.core.engine.run")


def engine_tolerance(dtype: torch.dtype) -> float:
    """Relative (to the largest logit) tolerance of engine-equivalence checks: 1e-5 in float32, 16 eps otherwise."""
    return 1e-5 if dtype == torch.float32 else 16 * torch.finfo(dtype).eps


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


# --- half precision ----------------------------------------------------------------------------------------------
def test_validation_tolerance_scales_with_dtype():
    assert validation_tolerance(torch.float32) == pytest.approx(1e-3)
    assert validation_tolerance(torch.float16) == pytest.approx(16 * 2 ** -10)
    assert validation_tolerance(torch.bfloat16) == pytest.approx(16 * 2 ** -7)


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma3", "gpt2", "qwen2", "olmo2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tiny_models_validate(family, dtype):
    lm = locedit.load((tiny.model(family).to(dtype), tiny.tokenizer()))
    assert lm.dtype == dtype


def _no_causal_mask(self, module, layer, query, key, value, attention_mask, **kwargs):
    """A broken attention path: every query sees every key (the causal mask is lost)."""
    mask = torch.zeros(1, 1, query.shape[2], key.shape[2], dtype=query.dtype, device=query.device)
    return self.eager_kernel(module, query, key, value, mask, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_broken_adapter_still_fails_in_half_precision(monkeypatch, family, dtype):
    from locedit.core.engine import hooks

    monkeypatch.setattr(hooks._PassState, "attention", _no_causal_mask)
    with pytest.raises(UnsupportedModelError, match="without any intervention"):
        locedit.load((tiny.model(family).to(dtype), tiny.tokenizer()))


def test_broken_positions_fail(monkeypatch):
    """GPT-2's learned positions shifted by one: the engine's forward no longer matches the model's."""
    original = run_module._forward

    def shifted(lm, input_ids, *, position_ids, **kwargs):
        return original(lm, input_ids, position_ids=position_ids + 1, **kwargs)

    monkeypatch.setattr(run_module, "_forward", shifted)
    with pytest.raises(UnsupportedModelError):
        locedit.load((tiny.model("gpt2").to(torch.bfloat16), tiny.tokenizer()))


@pytest.mark.slow  # loads the real SmolLM2 model
def test_smollm2_bfloat16_validates():
    lm = locedit.load("smollm2-135m", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    assert lm.predict(FACT)[0].token == " Paris"


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_equivalences_within_dtype_tolerance(family, dtype):
    """No-op run = HF forward; prefix reuse = full recompute; half precision = float32 (within the dtype's
    resolution, relative to the largest logit)."""
    m = tiny.model(family)
    lm32 = locedit.load((m, tiny.tokenizer()))
    lm = locedit.load((copy.deepcopy(m).to(dtype), tiny.tokenizer()))
    enc = lm.encode(FACT)
    g = enc.positions
    rows = [[], [BlockAttention(range(1, 3), [g.last], g.subject)], [SetSublayer("mlp", [2], g.subject)],
            [BlockAttention([0], [g.last], g.non_subject, heads=[1])]]
    tol = engine_tolerance(dtype)
    with torch.no_grad():
        hf = lm.model(input_ids=torch.tensor([enc.input_ids])).logits[0, -1]
        reuse = run(lm, enc, rows).logits
        full = run(lm, enc, rows, reuse_prefix=False).logits
        reference = run(lm32, enc, rows).logits
    assert rel(reuse[0], hf) <= tol
    assert rel(reuse, full) <= tol
    assert rel(reuse, reference) <= max(tol, 64 * torch.finfo(dtype).eps if dtype != torch.float32 else 0)


def test_attention_knockout_uses_the_dtype_minimum():
    """Blocked edges get the dtype's minimum before the softmax: a blocked key receives exactly zero weight."""
    from locedit import Capture

    lm = locedit.load((tiny.model("llama").to(torch.bfloat16), tiny.tokenizer()))
    enc = lm.encode(FACT)
    g = enc.positions
    with torch.no_grad():
        out = run(lm, enc, [[BlockAttention([1], [g.last], g.subject)]],
                  capture=Capture(attn_weights=True, layers=[1]))
    weights = out.captures["attn_weights", 1][0]  # (heads, queries, keys)
    assert weights.dtype == torch.bfloat16
    assert torch.all(weights[:, g.last, list(g.subject)] == 0)
    assert torch.allclose(weights[:, g.last].float().sum(-1), torch.ones(lm.num_heads), atol=1e-2)


def test_direct_logits_computed_in_float32():
    from locedit.localization import head_effects

    m = tiny.model("llama")
    lm32 = locedit.load((m, tiny.tokenizer()))
    lm16 = locedit.load((copy.deepcopy(m).to(torch.bfloat16), tiny.tokenizer()))
    a = torch.tensor(head_effects(lm32, FACT).direct_logit)
    b = torch.tensor(head_effects(lm16, FACT).direct_logit)
    assert b.dtype == torch.float32
    # bf16 rounding of the states only (no cancellation in half precision): close to the float32 numbers
    assert float((a - b).abs().max()) <= 0.05 * float(a.abs().max()) + 1e-3


def test_unembed_accepts_float32_states_of_a_half_precision_layernorm_model():
    lm = locedit.load((tiny.model("gpt2").to(torch.bfloat16), tiny.tokenizer()))
    state = torch.randn(2, lm.d_model)
    assert lm.unembed(state).shape == (2, lm.vocab_size)
    assert lm.project(state, "model").shape == (2, lm.vocab_size)
    logit = lm.target_logit(state, 5)
    assert logit.dtype == torch.float32 and torch.allclose(logit, lm.unembed(state)[:, 5].float(), atol=0.1)


# --- devices (CPU side of the CUDA checks: index tensors and values on the model's device) ------------------------
def test_write_values_from_mixed_sources_are_gathered():
    """A SetSublayer value given as a float64 CPU tensor next to a model-dtype one: one stacked write."""
    lm = locedit.load((tiny.model("llama").to(torch.bfloat16), tiny.tokenizer()))
    enc = lm.encode(FACT)
    v64 = torch.zeros(lm.d_model, dtype=torch.float64)
    with torch.no_grad():
        out = run(lm, enc, [[SetSublayer("mlp", [1], [1], v64), SetSublayer("mlp", [1], [2])]])
        ref = run(lm, enc, [[SetSublayer("mlp", [1], [1, 2])]])
    assert torch.equal(out.logits, ref.logits)


# --- locate: one resolved target ---------------------------------------------------------------------------------
def _count_forwards(lm):
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    return calls, handle


def test_locate_resolves_the_target_once(monkeypatch):
    from locedit.localization import common
    from locedit.localization.sites import locate

    lm = locedit.load((tiny.model("llama"), tiny.tokenizer()))
    resolved = []
    original = common.resolve_target

    def counting(*args, **kwargs):
        resolved.append(1)
        return original(*args, **kwargs)

    original_many = common.resolve_targets

    def counting_many(lm, encs, *args, **kwargs):
        resolved.extend([1] * len(encs))
        return original_many(lm, encs, *args, **kwargs)

    for name in ("locedit.localization.causal_trace", "locedit.localization.heads", "locedit.localization.knockout"):
        monkeypatch.setattr(importlib.import_module(name), "resolve_target", counting)
    monkeypatch.setattr(common, "resolve_targets", counting_many)  # the packed analyses import it when called
    first = locate(lm, FACT)
    assert len(resolved) == 1
    monkeypatch.undo()
    second = locate(lm, FACT)
    assert first.to_dict()["mlp_layers"] == second.to_dict()["mlp_layers"]
    assert first.to_dict()["heads"] == second.to_dict()["heads"]


def test_target_parameter_gives_the_same_result():
    from locedit.localization import attention_knockout, causal_trace, head_effects
    from locedit.localization.common import resolve_target, resolve_targets

    lm = locedit.load((tiny.model("qwen2"), tiny.tokenizer()))
    enc = lm.encode(FACT)
    target = resolve_target(lm, enc)
    other = locedit.Fact("Rome", "Rome is the capital of", " Italy")
    batched = resolve_targets(lm, [lm.encode(other), enc])
    assert batched[1].token_id == target.token_id
    assert batched[1].base_prob == pytest.approx(target.base_prob, abs=1e-6)
    assert batched[0].token_id == resolve_target(lm, lm.encode(other)).token_id
    for fn in (attention_knockout, head_effects):
        assert fn(lm, enc).to_dict() == fn(lm, enc, target=target).to_dict()
    a = causal_trace(lm, enc, samples=2, target=target).to_dict()
    b = causal_trace(lm, enc, samples=2).to_dict()
    assert a == b


# --- GGUF: dequantized once, cached by content hash ----------------------------------------------------------------
def test_gguf_path_is_converted_once_and_cached_by_content(tmp_path, monkeypatch):
    from locedit.core import loading

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))
    conversions, hashes = [], []

    def fake_load_gguf(path, dtype):  # stands in for transformers' GGUF dequantization
        conversions.append(path.name)
        return tiny.model("llama"), tiny.tokenizer()

    real_hash = loading.file_sha256
    monkeypatch.setattr(loading, "_load_gguf", fake_load_gguf)
    monkeypatch.setattr(loading, "file_sha256", lambda path: hashes.append(path.name) or real_hash(path))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 1000)

    first = locedit.load(str(gguf))
    assert conversions == ["model.gguf"] and hashes == ["model.gguf"]
    second = locedit.load(str(gguf))
    assert conversions == ["model.gguf"] and hashes == ["model.gguf"]  # cache hit, no re-hash either
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(first.model(input_ids=ids).logits, second.model(input_ids=ids).logits)
    cached = [d for d in (tmp_path / "cache" / "gguf").iterdir() if d.is_dir()]
    assert len(cached) == 1
    stamp = json.loads((cached[0] / "locedit_cache.json").read_text())
    assert stamp["sha256"] == real_hash(gguf)
    assert "quantization_config" not in json.loads((cached[0] / "config.json").read_text())

    copy_path = tmp_path / "renamed.gguf"  # same content elsewhere: hashed, but not converted again
    copy_path.write_bytes(gguf.read_bytes())
    locedit.load(str(copy_path))
    assert conversions == ["model.gguf"]
    gguf.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 1000)  # changed content: converted again
    locedit.load(str(gguf))
    assert conversions == ["model.gguf", "model.gguf"]
    assert len([d for d in (tmp_path / "cache" / "gguf").iterdir() if d.is_dir()]) == 2


# --- batching across facts (run_packed and the *_batch analyses, locate_batch) ----------------------------------------
PACK_FACTS = [
    locedit.Fact("The Eiffel Tower", "The Eiffel Tower is located in the city of"),
    locedit.Fact("Rome", "Rome is the capital of"),
    locedit.Fact("Michael Jordan", "Michael Jordan plays"),
]


def _close(a, b, tol=1e-5, path="", percent_tol=None) -> None:
    """Recursive comparison of result dicts: probabilities and logits to `tol` (relative to max(1, |b|)); relative
    changes in percent ("...change...", "...knockout...") to the same `tol` of probability, i.e.
    100 tol / base_prob percentage points; everything else equal."""
    if percent_tol is None and isinstance(b, dict) and "base_prob" in b:
        percent_tol = 100 * tol / max(b["base_prob"], 1e-12)
    if isinstance(b, dict):
        assert set(a) == set(b), path
        for k in b:
            if k != "seconds":
                sub = percent_tol if ("change" in k or "knockout" in k) and percent_tol else tol
                _close(a[k], b[k], sub, f"{path}.{k}", percent_tol)
    elif isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, tol, f"{path}[{i}]", percent_tol)
    elif isinstance(b, float) and not isinstance(a, str):
        if b != b:  # NaN
            assert a != a, path
        else:
            assert abs(a - b) <= tol * max(1.0, abs(b)), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "gpt_neox", "olmo2"])
def test_run_packed_equals_run_per_prompt(family):
    from locedit.core.engine import AddEmbeddingNoise, SetResidual, run_packed

    lm = tiny.lm(family)
    encs = [lm.encode(f) for f in PACK_FACTS]
    g = torch.Generator().manual_seed(0)
    rows, row_prompt, reference = [], [], []
    bases, base_prompt, row_base, rows_b, reference_b = [], [], [], [], []
    for k, enc in enumerate(encs):
        n, subject = len(enc), list(enc.positions.subject)
        fact_rows = [[BlockAttention(range(max(0, l - 1), min(lm.num_layers, l + 2)), [n - 1], subject)]
                     for l in range(lm.num_layers)]
        fact_rows += [[SetSublayer("mlp", [l], [subject[-1]])] for l in range(lm.num_layers)] + [[]]
        reference.append(run(lm, enc, fact_rows).logits)
        rows += fact_rows
        row_prompt += [k] * len(fact_rows)
        noise = [[AddEmbeddingNoise(subject, torch.randn(len(subject), lm.d_model, generator=g))] for _ in range(2)]
        clean = torch.randn(n, lm.d_model, generator=g)
        cells = [[SetResidual(l + 1, [p], clean[p])] for p in range(subject[0], n) for l in range(lm.num_layers)]
        cell_rows = [c for c in cells for _ in range(2)] + [[]]
        cell_base = [s for _ in cells for s in range(2)] + [1]
        reference_b.append(run(lm, enc, cell_rows, bases=noise, row_base=cell_base).logits)
        row_base += [len(bases) + b for b in cell_base]
        rows_b += cell_rows
        bases += noise
        base_prompt += [k, k]
    packed = run_packed(lm, encs, rows, row_prompt=row_prompt, max_rows=7).logits
    assert rel(packed, torch.cat(reference)) < 1e-5
    packed_b = run_packed(lm, encs, rows_b, bases=bases, base_prompt=base_prompt, row_base=row_base).logits
    assert rel(packed_b, torch.cat(reference_b)) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "qwen2"])
def test_locate_batch_equals_locate(family):
    from locedit.localization.sites import locate, locate_batch

    lm = tiny.lm(family)
    batched = locate_batch(lm, PACK_FACTS, max_rows=64)
    for fact, result in zip(PACK_FACTS, batched):
        a, b = result.to_dict(), locate(lm, fact).to_dict()
        # every number behind the ranking agrees; the rankings' scores agree in order (near-ties on a random
        # tiny model may swap two sites of equal score, so positions within a tie are not compared)
        for key in ("target", "target_id", "base_prob", "evidence", "fact"):
            _close({"base_prob": b["base_prob"], key: a[key]}, {"base_prob": b["base_prob"], key: b[key]})
        for key in ("mlp_sites", "mlp_layers", "heads"):
            # scores are ratios of evidence to its maximum over sites: rounding of 1e-7 in p becomes ~1e-5 there
            _close([s["score"] for s in a[key]], [s["score"] for s in b[key]], tol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_analyses_with_a_shared_clean_run_equal_their_own(family):
    """locate_batch runs one clean pass for every analysis (`CleanRun`): each result equals the analysis's own."""
    from locedit.localization.causal_trace import causal_trace_batch
    from locedit.localization.common import clean_run, resolve_targets
    from locedit.localization.heads import head_effects_batch, head_projection_batch
    from locedit.localization.knockout import attention_knockout_batch
    from locedit.localization.sites import _mlp_knockouts_batch

    lm = tiny.lm(family)
    encs = [lm.encode(f) for f in PACK_FACTS]
    clean = clean_run(lm, encs)
    targets = resolve_targets(lm, encs)
    assert [t.token_id for t in resolve_targets(lm, encs, clean)] == [t.token_id for t in targets]
    pairs = [
        (causal_trace_batch(lm, encs, kind="hidden", samples=2, targets=targets, clean=clean),
         causal_trace_batch(lm, encs, kind="hidden", samples=2, targets=targets)),
        (causal_trace_batch(lm, encs, kind="mlp", samples=2, window=3, targets=targets, clean=clean),
         causal_trace_batch(lm, encs, kind="mlp", samples=2, window=3, targets=targets)),
        (attention_knockout_batch(lm, encs, window=3, targets=targets, clean=clean),
         attention_knockout_batch(lm, encs, window=3, targets=targets)),
        (head_effects_batch(lm, encs, targets=targets, clean=clean), head_effects_batch(lm, encs, targets=targets)),
        (head_projection_batch(lm, encs, targets=targets, clean=clean),
         head_projection_batch(lm, encs, targets=targets)),
    ]
    for shared, own in pairs:
        for a, b in zip(shared, own):
            _close(a.to_dict(), b.to_dict())
    assert len(clean.kv) == 1  # the knockouts and head effects ran their clean pass once between them
    for (cells, layers), (ref_cells, ref_layers), t in zip(_mlp_knockouts_batch(lm, encs, targets, clean=clean),
                                                          _mlp_knockouts_batch(lm, encs, targets), targets):
        percent = 100 * 1e-5 / max(t.base_prob, 1e-12)
        _close(cells.tolist(), ref_cells.tolist(), tol=percent)
        _close(layers.tolist(), ref_layers.tolist(), tol=percent)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_analyses_batch_equal_single(family):
    from locedit.localization import attention_knockout, causal_trace, head_projection
    from locedit.localization.causal_trace import causal_trace_batch
    from locedit.localization.heads import head_projection_batch
    from locedit.localization.knockout import attention_knockout_batch

    lm = tiny.lm(family)
    for fact, result in zip(PACK_FACTS, attention_knockout_batch(lm, PACK_FACTS, window=3)):
        _close(result.to_dict(), attention_knockout(lm, fact, window=3).to_dict())
    for fact, result in zip(PACK_FACTS, causal_trace_batch(lm, PACK_FACTS, kind="attn", samples=2, window=3)):
        _close(result.to_dict(), causal_trace(lm, fact, kind="attn", samples=2, window=3).to_dict())
    for fact, result in zip(PACK_FACTS, head_projection_batch(lm, PACK_FACTS)):
        _close(result.to_dict(), head_projection(lm, fact).to_dict())
    # locate runs the packed forms (also for one fact): each equals the one-fact analysis
    from locedit.localization import head_effects
    from locedit.localization.common import resolve_target
    from locedit.localization.heads import head_effects_batch
    from locedit.localization.sites import _mlp_knockouts, _mlp_knockouts_batch

    for fact, result in zip(PACK_FACTS, head_effects_batch(lm, PACK_FACTS)):
        _close(result.to_dict(), head_effects(lm, fact).to_dict())
    encs = [lm.encode(f) for f in PACK_FACTS]
    targets = [resolve_target(lm, e) for e in encs]
    for one in ([encs[0]], encs):
        for k, (cells, layers) in enumerate(_mlp_knockouts_batch(lm, one, targets[:len(one)])):
            ref_cells, ref_layers = _mlp_knockouts(lm, one[k], targets[k].token_id, targets[k].base_prob)
            percent = 100 * 1e-5 / max(targets[k].base_prob, 1e-12)  # relative changes, in percent
            _close(cells.tolist(), ref_cells.tolist(), tol=percent)
            _close(layers.tolist(), ref_layers.tolist(), tol=percent)


def test_dataset_mode_batches_facts_and_resumes(tmp_path):
    from locedit.localization import run_dataset

    lm = tiny.lm("llama")
    one = run_dataset(lm, "knockout", PACK_FACTS, tmp_path / "one.jsonl", options={"window": 3}, progress=False,
                      batch_facts=1)
    run_dataset(lm, "knockout", PACK_FACTS[:2], tmp_path / "packed.jsonl", options={"window": 3},
                progress=False, batch_facts=2)
    packed = run_dataset(lm, "knockout", PACK_FACTS, tmp_path / "packed.jsonl", options={"window": 3},
                         progress=False, batch_facts=2)
    assert packed.skipped == 2 and packed.ran == 1
    for a, b in zip(packed.results, one.results):
        assert a["id"] == b["id"]
        _close(a["result"], b["result"])


# --- beyond one device: accelerate offload as a proxy for a model split over devices ---------------------------------
def _offloaded_llama(tmp_path):
    """The tiny Llama with layers 1-2 offloaded to disk and the rest on the CPU (accelerate's dispatch: offloaded
    weights sit on the meta device and are loaded by hooks around each forward, as with a multi-GPU split)."""
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    model = dispatch_model(tiny.model("llama"), device_map=device_map, offload_dir=str(tmp_path))
    assert model.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    return locedit.load((model, tiny.tokenizer()))


def test_offloaded_model_knockout_and_locate_equal_plain(tmp_path):
    from locedit.localization import attention_knockout
    from locedit.localization.sites import locate

    plain, offloaded = tiny.lm("llama"), _offloaded_llama(tmp_path)
    _close(attention_knockout(offloaded, FACT, window=3).to_dict(), attention_knockout(plain, FACT, window=3).to_dict())
    a, b = locate(offloaded, FACT).to_dict(), locate(plain, FACT).to_dict()
    for key in ("target", "base_prob", "evidence", "carrier", "relation"):
        _close({"base_prob": b["base_prob"], key: a[key]}, {"base_prob": b["base_prob"], key: b[key]})
    # the weights' fingerprint (which keys calibrations) reads offloaded weights too, and equals the plain model's
    from locedit.editing.fingerprint import weights_fingerprint

    assert weights_fingerprint(offloaded) == weights_fingerprint(plain)


def test_offloaded_model_edits_device_layers_and_refuses_offloaded_ones(tmp_path):
    """An edit of a layer kept on a device works across the split and equals the plain model's; an edit of an
    offloaded layer (a meta tensor between forwards) is refused before any work, with the weights untouched."""
    plain, offloaded = tiny.lm("llama"), _offloaded_llama(tmp_path)
    hparams = {"v_lr": 0.5, "v_num_grad_steps": 10, "context_template_length_params": [[3, 2]]}
    with pytest.raises(locedit.LoceditError, match="offloaded"):
        locedit.edit(offloaded, locedit.EditRequest(FACT, " the"),
                     layers=[1], key_position="subject_last", hparams=hparams)
    assert not locedit.editing.applied_edits(offloaded)
    a = locedit.edit(plain, locedit.EditRequest(FACT, " the"), layers=[3], key_position="subject_last", hparams=hparams)
    b = locedit.edit(offloaded, locedit.EditRequest(FACT, " the"),
                     layers=[3], key_position="subject_last", hparams=hparams)
    ids = torch.tensor([plain.encode(FACT).input_ids])
    with torch.no_grad():
        assert torch.allclose(plain.model(input_ids=ids).logits, offloaded.model(input_ids=ids).logits, atol=1e-5)
    b.revert()
    a.revert()

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
from locedit.engine import BlockAttention, SetSublayer, run
from locedit.errors import UnsupportedModelError
from locedit.lm import validation_tolerance

FACT = locedit.Fact("The Eiffel Tower", "The Eiffel Tower is located in the city of", " Paris")
run_module = importlib.import_module("locedit.engine.run")


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
    from locedit.engine import hooks

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
    from locedit.flow import head_effects

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
    from locedit.flow import common
    from locedit.sites import locate

    lm = locedit.load((tiny.model("llama"), tiny.tokenizer()))
    resolved = []
    original = common.resolve_target

    def counting(*args, **kwargs):
        resolved.append(1)
        return original(*args, **kwargs)

    for name in ("locedit.flow.causal_trace", "locedit.flow.heads", "locedit.flow.knockout", "locedit.sites"):
        monkeypatch.setattr(importlib.import_module(name), "resolve_target", counting)
    first = locate(lm, FACT)
    assert len(resolved) == 1
    monkeypatch.undo()
    second = locate(lm, FACT)
    assert first.to_dict()["mlp_layers"] == second.to_dict()["mlp_layers"]
    assert first.to_dict()["heads"] == second.to_dict()["heads"]


def test_target_parameter_gives_the_same_result():
    from locedit.flow import attention_knockout, causal_trace, head_effects
    from locedit.flow.common import resolve_target, resolve_targets

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
    from locedit import loading

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

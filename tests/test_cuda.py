"""The fast CUDA subset (`pytest -m cuda tests/test_cuda.py`): the engine and the analyses give the CPU's numbers
on a GPU, in float32 and bfloat16. Skipped where no GPU is available. Run by `recipes/gpu_check.sh`."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

import locedit
import tiny
from locedit import Capture
from locedit.core.engine import (AddEmbeddingNoise, BlockAttention, SetHeads, SetResidual, SetSublayer,
                            UniformAttention, run, run_batch)

# LOCEDIT_TEST_DEVICE=cpu runs the same checks against a second CPU copy (to test the tests without a GPU)
DEVICE = os.environ.get("LOCEDIT_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")]

FACT = locedit.Fact("The Eiffel Tower", "The Eiffel Tower is located in the city of", " Paris")
FACTS = [FACT, locedit.Fact("Rome", "Rome is the capital of", " Italy"),
         locedit.Fact("Beats Music", "Beats Music is owned by", " Apple")]
FAMILIES = ["llama", "gpt2"]
DTYPES = [torch.float32, torch.bfloat16]


def tolerance(dtype: torch.dtype) -> float:
    """Relative to the largest logit: GPU and CPU kernels round differently (TF32 is off in float32 here)."""
    return 1e-4 if dtype == torch.float32 else 64 * torch.finfo(dtype).eps


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).float().cpu(), torch.as_tensor(b).float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


@pytest.fixture(scope="module", autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


_MODELS: dict = {}


def pair(family: str, dtype: torch.dtype):
    """(CPU float32 LM, CUDA LM of `dtype`) with the same weights."""
    key = (family, dtype)
    if key not in _MODELS:
        cpu_model = tiny.model(family)
        cpu = locedit.load((cpu_model, tiny.tokenizer()))
        gpu = locedit.load((copy.deepcopy(cpu_model).to(device=DEVICE, dtype=dtype), tiny.tokenizer()))
        _MODELS[key] = (cpu, gpu)
    return _MODELS[key]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_load_on_cuda_validates(family, dtype):
    cpu, gpu = pair(family, dtype)
    assert gpu.device.type == DEVICE and gpu.dtype == dtype
    locedit.core.lm.validate_adapter(gpu)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_deep_random_llama_validates_in_half_precision(dtype):
    """A deeper model (more rounding) in half precision passes the dtype-aware validation on the GPU."""
    import transformers as T

    config = T.LlamaConfig(num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=4, hidden_size=256,
                           intermediate_size=688, vocab_size=tiny.V, max_position_embeddings=128,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(DEVICE):
        model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    lm = locedit.load((model, tiny.tokenizer()))
    assert lm.device.type == DEVICE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_run_matches_cpu(family, dtype):
    cpu, gpu = pair(family, dtype)
    enc = cpu.encode(FACT)
    g = enc.positions
    value = torch.randn(cpu.d_model, generator=torch.Generator().manual_seed(0))
    rows = [[], [BlockAttention(range(1, 3), [g.last], g.subject)],
            [BlockAttention([0, 1], [g.last], g.non_subject, heads=[0, 2])],
            [SetSublayer("mlp", [1], g.subject)], [SetSublayer("attn", [2], [g.last], value * 0.1)],
            [SetHeads([3], [1], [g.last])], [SetResidual(2, [g.subject_last], value)],
            [UniformAttention([1], [g.last])]]
    noise = torch.randn(len(g.subject), cpu.d_model, generator=torch.Generator().manual_seed(1))
    capture = Capture(residual=True, heads=True, mlp_keys=True, last_only=True)
    with torch.no_grad():
        a = run(cpu, enc, rows, capture=capture)
        b = run(gpu, enc, rows, capture=capture)
        c = run(cpu, enc, rows, shared=[AddEmbeddingNoise(g.subject, noise)])
        d = run(gpu, enc, rows, shared=[AddEmbeddingNoise(g.subject, noise)])  # a CPU noise tensor on a GPU model
    assert b.logits.device.type == DEVICE
    tol = tolerance(dtype)
    assert rel(b.logits, a.logits) <= tol
    assert rel(d.logits, c.logits) <= tol
    assert rel(b.prob_of(enc.target_id), a.prob_of(enc.target_id)) <= tol * 10
    for key in (("residual", 3), ("heads", 2), ("mlp_keys", 1)):
        assert rel(b.captures[key], a.captures[key]) <= tol * 10, key


@pytest.mark.parametrize("dtype", DTYPES)
def test_run_batch_and_known_facts_on_cuda(dtype):
    from locedit.core.datasets import known_facts

    cpu, gpu = pair("llama", dtype)
    encs = [cpu.encode(f) for f in FACTS]
    with torch.no_grad():
        a = run_batch(cpu, encs, capture=Capture(residual=True, layers=[2], last_only=True))
        b = run_batch(gpu, encs, capture=Capture(residual=True, layers=[2], last_only=True))
    assert rel(b.logits, a.logits) <= tolerance(dtype)
    assert rel(b.captures["residual", 2], a.captures["residual", 2]) <= tolerance(dtype) * 10
    # known facts on the device at a top_k between the targets' ranks (the middle of the widest gap, so that
    # rounding cannot move a target across it): kept are exactly the facts whose target ranks below top_k
    ranks = []
    for f in FACTS:
        order = [p.token_id for p in gpu.predict(f, k=tiny.V)]
        ranks.append(order.index(gpu.encode(f).target_id))
    low, high = max(zip(sorted(ranks), sorted(ranks)[1:]), key=lambda pair: pair[1] - pair[0])
    assert high - low >= 2, ranks
    top_k = (low + high) // 2 + 1
    expected = [f for f, r in zip(FACTS, ranks) if r < top_k]
    assert 0 < len(expected) < len(FACTS)
    assert known_facts(gpu, FACTS, top_k=top_k, progress=False) == expected
    if dtype == torch.float32:
        assert known_facts(cpu, FACTS, top_k=top_k, progress=False) == expected


def test_gradients_flow_on_cuda():
    _, gpu = pair("llama", torch.float32)
    enc = gpu.encode(FACT)
    value = torch.zeros(gpu.d_model, device=DEVICE, requires_grad=True)
    out = run(gpu, enc, [[SetSublayer("mlp", [2], [enc.positions.subject_last], value)]])
    out.logits[0, enc.target_id].backward()
    cpu = pair("llama", torch.float32)[0]
    ref = torch.zeros(cpu.d_model, requires_grad=True)
    run(cpu, enc, [[SetSublayer("mlp", [2], [enc.positions.subject_last], ref)]]).logits[0, enc.target_id].backward()
    assert ref.grad.abs().sum() > 0  # the CPU's gradient, which the device's must equal
    assert rel(value.grad, ref.grad) <= tolerance(torch.float32) * 10


def _close_curves(a: dict, b: dict, atol: float) -> None:
    for name in a:
        assert np.allclose(np.asarray(a[name], float), np.asarray(b[name], float), atol=atol), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_analyses_on_cuda_match_cpu(family, dtype):
    from locedit.localization import attention_knockout, causal_trace, head_effects

    cpu, gpu = pair(family, dtype)
    pp = 0.1 if dtype == torch.float32 else 5.0  # percentage points of relative change
    a, b = attention_knockout(cpu, FACT), attention_knockout(gpu, FACT)
    assert a.target_id == b.target_id
    _close_curves(a.relative_change, b.relative_change, pp)
    ta, tb = causal_trace(cpu, FACT, samples=3), causal_trace(gpu, FACT, samples=3)
    sa, sb = np.asarray(ta.scores, float), np.asarray(tb.scores, float)
    assert np.array_equal(np.isnan(sa), np.isnan(sb))
    assert np.nanmax(np.abs(sa - sb)) <= (1e-4 if dtype == torch.float32 else 2e-2)
    ha, hb = head_effects(cpu, FACT), head_effects(gpu, FACT)
    scale = max(1.0, float(np.abs(ha.direct_logit).max()))
    assert np.abs(np.asarray(ha.direct_logit) - np.asarray(hb.direct_logit)).max() <= \
        (1e-3 if dtype == torch.float32 else 0.05) * scale
    _close_curves({"o": ha.output_knockout, "e": ha.edge_knockout}, {"o": hb.output_knockout, "e": hb.edge_knockout},
                  pp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_locate_on_cuda_matches_cpu_top_sites(family, dtype):
    from locedit.localization.sites import locate

    cpu, gpu = pair(family, dtype)
    a, b = locate(cpu, FACT).to_dict(), locate(gpu, FACT).to_dict()
    assert a["target_id"] == b["target_id"]
    top_a = [m["layer"] for m in a["mlp_layers"]]
    top_b = [m["layer"] for m in b["mlp_layers"]]
    heads_a = [(h["layer"], h["head"]) for h in a["heads"]]
    heads_b = [(h["layer"], h["head"]) for h in b["heads"]]
    if dtype == torch.float32:
        assert top_a[0] == top_b[0] and heads_a[0] == heads_b[0]
        assert a["carrier"]["position"] == b["carrier"]["position"]
    else:  # bfloat16 rounding may swap near-ties: the CPU's top site stays among the GPU's top 3
        assert top_a[0] in top_b[:3] and heads_a[0] in heads_b[:3]


def test_dataset_run_on_cuda(tmp_path):
    from locedit.localization import run_dataset

    cpu, gpu = pair("gpt2", torch.float32)
    ran = run_dataset(gpu, "knockout", FACTS, tmp_path / "k.jsonl", progress=False)
    ref = run_dataset(cpu, "knockout", FACTS, tmp_path / "c.jsonl", progress=False)
    assert len(ran.results) == len(ref.results) == len(FACTS)
    for x, y in zip(ran.results, ref.results):
        _close_curves(x["result"]["relative_change"], y["result"]["relative_change"], 0.1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_edits_on_cuda(family, dtype, tmp_path, monkeypatch):
    """ROME, MEMIT and a head edit run on the device, move the prediction like on the CPU, revert bit-exactly, and
    an edit made on the GPU applies to the CPU copy (same weights) with the same effect."""
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path))
    cpu, gpu = pair(family, dtype)
    fast = {"v_lr": 0.5, "v_num_grad_steps": 40, "clamp_norm_factor": 10, "context_template_length_params": [[3, 2]]}
    fact = locedit.Fact("Eiffel Tower", "The city of the Eiffel Tower", " Paris")
    saved = {n: p.detach().clone() for n, p in gpu.model.named_parameters()}
    for method, where in (("rome", dict(layers=[1])), ("memit", dict(layers=[1, 2])),
                          ("head", dict(heads=[(2, 1), (3, 0)]))):
        edit = locedit.edit(gpu, locedit.EditRequest(fact, " the"),
                            method=method, key_position="subject_last", hparams=fast, **where)
        assert all(torch.isfinite(d.matrix()).all() for d in edit.deltas)
        if method != "head":
            assert gpu.predict(fact)[0].token == " the", (family, dtype, method)
        edit.revert()
        assert all(torch.equal(saved[n], p) for n, p in gpu.model.named_parameters())
    if dtype == torch.float32:  # the same bytes on both sides: a GPU edit applies to the CPU model
        edit = locedit.edit(gpu, locedit.EditRequest(fact, " the"),
                            method="rome", layers=[1], key_position="subject_last", hparams=fast)
        edit.revert()
        with edit.applied(cpu):
            assert cpu.predict(fact)[0].token == " the"

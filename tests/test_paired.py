"""`UneditedRows`: rows of one batch run as the unedited model while the edit is applied (verify's paired
generations), for every family; edits it cannot subtract are refused and verify then measures the states apart."""

from __future__ import annotations

import pytest
import torch

import tiny
from locedit.core.facts import Fact
from locedit.editing.edit import Edit, WeightDelta, geometry
from locedit.editing.rank_one import linear_delta
from locedit.errors import LoceditError
from locedit.verification import metrics as M
from locedit.verification.paired import UneditedRows

PROMPTS = ["The Eiffel Tower is located in the city of", "Big Ben is", "The capital of France is Paris and"]
FACT = Fact("The Eiffel Tower", "The Eiffel Tower is located in the city of", " Paris")


def random_edit(lm, layers=(0, 2), dense: bool = False, scale: float = 3.0) -> Edit:
    """A large random change of the MLP output projections at `layers` (low rank, or dense)."""
    g = torch.Generator().manual_seed(1)
    deltas = []
    for layer in layers:
        module = lm.adapter.layer_part(lm.model, layer, lm.adapter.mlp_down)
        out_in = module.weight.T if lm.adapter.conv1d else module.weight
        if dense:
            d = linear_delta(lm.model, module, torch.zeros(out_in.shape[0], 1), torch.zeros(out_in.shape[1], 1),
                             lm.adapter.conv1d)
            d.left = d.right = None
            d.dense = scale * torch.randn(out_in.shape, generator=g) / out_in.shape[1] ** 0.5
        else:
            d = linear_delta(lm.model, module, scale * torch.randn(out_in.shape[0], 2, generator=g),
                             torch.randn(out_in.shape[1], 2, generator=g) / out_in.shape[1] ** 0.5,
                             lm.adapter.conv1d)
        deltas.append(d)
    return Edit("test", [FACT], [" Rome"], {"layers": list(layers)}, {}, deltas,
                {"name": lm.name, "geometry": geometry(lm)})


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_flagged_rows_compute_the_unedited_model(family):
    lm = tiny.lm(family)
    edit = random_edit(lm, dense=family in ("gpt2", "llama"))
    ids = torch.tensor([lm.tokenizer(PROMPTS[0])["input_ids"]] * 2)
    with torch.no_grad():
        before = lm.model(input_ids=ids[:1]).logits[0]
        with edit.applied(lm):
            after = lm.model(input_ids=ids[:1]).logits[0]
            assert not torch.allclose(before, after, atol=1e-3)  # the edit changes the model
            with UneditedRows(lm, edit) as rows:
                rows.set_rows([True, False])
                mixed = lm.model(input_ids=ids).logits
            assert torch.equal(lm.model(input_ids=ids[:1]).logits[0], after)  # hooks gone on exit
    tol = dict(atol=1e-4, rtol=1e-4)
    assert torch.allclose(mixed[0], before, **tol) and torch.allclose(mixed[1], after, **tol)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_paired_generation_equals_each_state_alone(family):
    lm = tiny.lm(family)
    edit = random_edit(lm)
    lengths = [2, 7, 4]
    alone_before = M.greedy_generate_ids(lm, PROMPTS, lengths)
    with edit.applied(lm):
        alone_after = M.greedy_generate_ids(lm, PROMPTS, lengths)
        with UneditedRows(lm, edit) as rows:
            both = M.greedy_generate_ids(lm, [p for p in PROMPTS for _ in (0, 1)],
                                         [n for n in lengths for _ in (0, 1)],
                                         row_flags=[True, False] * 3, set_rows=rows.set_rows)
    assert both[0::2] == alone_before and both[1::2] == alone_after
    assert alone_before != alone_after  # the test can tell the states apart


def test_unsupported_edits_and_misuse_are_refused():
    lm = tiny.lm("llama")
    norm = lm.layers[0].input_layernorm.weight
    from locedit.editing.edit import tensor_sha256
    from locedit.editing.rank_one import param_name

    norm_edit = Edit("test", [FACT], [" Rome"], {}, {}, [WeightDelta(param_name(lm.model, norm), tensor_sha256(norm),
                                                                      tuple(norm.shape), dense=torch.ones(norm.shape))],
                     {"name": lm.name, "geometry": geometry(lm)})
    assert not UneditedRows.supports(lm, norm_edit)
    with pytest.raises(LoceditError, match="not a linear projection"):
        UneditedRows(lm, norm_edit)
    edit = random_edit(lm)
    assert UneditedRows.supports(lm, edit)
    with pytest.raises(LoceditError, match="needs the edit applied"):
        with UneditedRows(lm, edit):
            pass
    with edit.applied(lm), UneditedRows(lm, edit) as rows, torch.no_grad():
        rows.set_rows([True, False, True])
        with pytest.raises(LoceditError, match="3 row flags"):
            lm.model(input_ids=torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="go together"):
        M.greedy_generate_ids(lm, PROMPTS, 2, row_flags=[True, False, True])


def test_verify_gives_the_same_result_paired_or_not(monkeypatch):
    """verify's generations from one paired decode loop are the ones it makes state by state."""
    import importlib

    V = importlib.import_module("locedit.verification.verify")

    lm = tiny.lm("llama", "metaspace")
    fact = Fact(FACT.subject, FACT.prompt, lm.predict(FACT)[0].token)
    edit = random_edit(lm, layers=(0,))
    edit.facts = [fact]
    options = dict(paraphrases=["Where is The Eiffel Tower? It is in"], neighborhood=[("The Louvre is in", " Paris")],
                   generation_prompts=["The Eiffel"], generation_tokens=4, fluency_tokens=9, mechanism=False,
                   ripple=False)
    calls = []
    real = V.paired_generations
    monkeypatch.setattr(V, "paired_generations", lambda *a, **k: calls.append(1) or real(*a, **k))
    paired = V.verify(lm, edit, **options)
    monkeypatch.setattr(V.UneditedRows, "supports", staticmethod(lambda lm, edit: False))
    apart = V.verify(lm, edit, **options)
    assert calls == [1] and "generation_both" in paired.timings and "generation_both" not in apart.timings
    a, b = paired.behaviour["per_fact"][0], apart.behaviour["per_fact"][0]
    for key in ("generations_before", "generations_after", "fluency_texts_after", "before", "after"):
        assert a[key] == b[key]
    assert a["generations_before"] != a["generations_after"]

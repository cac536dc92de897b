"""The sampled statistics corpus: shipped with locedit for known weights (used only for exactly those weights and
sampler settings, a damaged file ignored), every core while sampling, and the GGUF metadata parsed once."""

from __future__ import annotations

import logging

import pytest
import torch

import tiny
from locedit.core import loading
from locedit.editing import corpus as corpus_mod
from locedit.editing.stats import key_statistics


@pytest.fixture(autouse=True)
def shipped_dir(tmp_path, monkeypatch):
    """An empty directory of shipped corpora and a fresh cache, for every test."""
    directory = tmp_path / "corpora"
    directory.mkdir()
    monkeypatch.setattr(corpus_mod, "SHIPPED", directory)
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))
    return directory


def sample_spy(monkeypatch) -> list:
    calls = []
    real = corpus_mod.sample_ids

    def spy(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(corpus_mod, "sample_ids", spy)
    return calls


def ship(lm, shipped_dir, tokens=200, seed=0, seq_len=64) -> torch.Tensor:
    """Ship recognisable ids (not what the sampler would draw) for `lm` and these settings."""
    spec = corpus_mod.sampler_spec(lm, tokens, seed, seq_len)
    ids = torch.arange(tokens, dtype=torch.int64) % lm.vocab_size
    path = corpus_mod.write_shipped(lm, spec, ids, shipped_dir)
    assert path.parent == shipped_dir and path.stat().st_size < 4 * tokens + 2000  # int32 ids plus a header
    return ids


def test_shipped_corpus_is_used_for_matching_weights_and_settings_only(monkeypatch, shipped_dir):
    lm = tiny.lm("gpt2")
    ids = ship(lm, shipped_dir)
    calls = sample_spy(monkeypatch)
    for cache in (True, False):
        stats = key_statistics(lm, [1], tokens=200, seed=0, batch_tokens=64, cache=cache, progress=False)
        text = corpus_mod.build_corpus(lm, None, 200, seed=0, seq_len=64, progress=False)
        assert torch.equal(text.ids, ids) and stats.corpus_hash == text.hash
    assert calls == []
    other = tiny.lm("gpt2", seed=1)  # same geometry, other weights
    assert not torch.equal(corpus_mod.build_corpus(other, None, 200, seed=0, seq_len=64, progress=False).ids, ids)
    for settings in ({"seed": 1, "seq_len": 64}, {"seed": 0, "seq_len": 32}):
        corpus_mod.build_corpus(lm, None, 200, progress=False, **settings)
    corpus_mod.build_corpus(lm, None, 199, seed=0, seq_len=64, progress=False)
    assert calls == [200, 200, 200, 199]
    monkeypatch.setattr(corpus_mod, "SAMPLER_VERSION", corpus_mod.SAMPLER_VERSION + 1)  # a changed sampler
    assert not torch.equal(corpus_mod.build_corpus(lm, None, 200, seed=0, seq_len=64, progress=False).ids, ids)
    assert len(calls) == 5


def test_an_edit_of_the_weights_misses_the_shipped_corpus(monkeypatch, shipped_dir):
    lm = tiny.lm("llama")
    ids = ship(lm, shipped_dir)
    down = lm.adapter.layer_part(lm.model, 1, lm.adapter.mlp_down).weight
    with torch.no_grad():
        down[0, 0] += 1.0
    calls = sample_spy(monkeypatch)
    assert not torch.equal(corpus_mod.build_corpus(lm, None, 200, seed=0, seq_len=64, progress=False).ids, ids)
    assert calls == [200]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other ids"])
def test_a_damaged_shipped_corpus_is_ignored_with_a_warning(monkeypatch, shipped_dir, caplog, damage):
    lm = tiny.lm("gpt2")
    ids = ship(lm, shipped_dir)
    (path,) = shipped_dir.iterdir()
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * len(data))
    else:  # right header, other ids: the checksum fails
        path.write_bytes(data[:-4] + (int.from_bytes(data[-4:], "little") ^ 1).to_bytes(4, "little"))
    calls = sample_spy(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="locedit.editing.corpus"):
        text = corpus_mod.build_corpus(lm, None, 200, seed=0, seq_len=64, progress=False)
    assert calls == [200] and not torch.equal(text.ids, ids)
    assert any("ignoring" in r.message and "shipped corpus" in r.message and "sampling instead" in r.message
               for r in caplog.records)


def test_sampling_uses_every_core_and_restores_the_thread_count(monkeypatch):
    lm = tiny.lm("gpt2")
    with corpus_mod.all_cores(lm) as small:
        assert small == torch.get_num_threads()  # a tiny model keeps the count it had
    monkeypatch.setattr(corpus_mod, "ALL_CORES_MIN_PARAMS", 0)  # as if it were as large as SmolLM2
    seen = []
    real = corpus_mod._sample

    def spy(logits, generator):
        seen.append(torch.get_num_threads())
        return real(logits, generator)

    monkeypatch.setattr(corpus_mod, "_sample", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = corpus_mod.sample_ids(lm, [[1], [2, 3]], 30, 0, 8, progress=False)
        assert torch.get_num_threads() == 1
        b = corpus_mod.sample_ids(lm, [[1], [2, 3]], 30, 0, 8, progress=False)
    finally:
        torch.set_num_threads(before)
    cores = len(__import__("os").sched_getaffinity(0))
    assert seen and set(seen) == {max(1, cores)} and torch.equal(a, b) and a.numel() == 30


def test_gguf_metadata_is_parsed_once_and_the_originals_come_back(monkeypatch):
    import gguf
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    built = []

    class Reader:
        def __init__(self, path, mode="r"):
            built.append(path)

    def metadata(path, return_tensors=False, **kwargs):
        built.append(("checkpoint", return_tensors))
        return {"config": {"vocab": [1, 2]}}

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    monkeypatch.setattr(hf_gguf, "load_gguf_checkpoint", metadata)
    with loading._gguf_parsed_once():
        assert gguf.GGUFReader("a.gguf") is gguf.GGUFReader("a.gguf")
        assert gguf.GGUFReader("b.gguf") is not gguf.GGUFReader("a.gguf")
        first = hf_gguf.load_gguf_checkpoint("a.gguf", return_tensors=False)
        first["config"]["vocab"].append(3)  # callers edit what they get: the next caller must not see it
        assert hf_gguf.load_gguf_checkpoint("a.gguf", return_tensors=False) == {"config": {"vocab": [1, 2]}}
        hf_gguf.load_gguf_checkpoint("a.gguf", return_tensors=True)
        hf_gguf.load_gguf_checkpoint("a.gguf", return_tensors=True)  # the weights are never memoised
    assert built == ["a.gguf", "b.gguf", ("checkpoint", False), ("checkpoint", True), ("checkpoint", True)]
    assert gguf.GGUFReader is Reader and hf_gguf.load_gguf_checkpoint is metadata


# --- the real model --------------------------------------------------------------------------------------------
def test_smollm2_default_corpus_is_shipped_and_is_its_own_sample(smollm2, monkeypatch):
    monkeypatch.setattr(corpus_mod, "SHIPPED", corpus_mod.Path(corpus_mod.__file__).parent.parent / "data" / "corpora")
    calls = sample_spy(monkeypatch)
    text = corpus_mod.build_corpus(smollm2, None, 15360, seed=0, seq_len=256, progress=False)
    assert calls == [] and text.tokens == 15360
    assert text.hash == "b3a8fb052b941d47"  # the corpus SmolLM2's statistics were cached under before shipping
    rows = text.ids.view(-1, 256)[:4]
    with torch.no_grad():
        logits = smollm2.model(input_ids=rows).logits[:, :-1]
    chosen = logits.gather(-1, rows[:, 1:, None])[..., 0]
    kth = logits.topk(corpus_mod.TOP_K, dim=-1).values[..., -1]
    assert (chosen >= kth - 1e-3).all()  # every sampled token is in the model's top-k: its own sample


def test_smollm2_conversion_gives_the_weights_the_shipped_data_is_keyed_by(smollm2):
    from locedit.core.lm import LM
    from locedit.editing.fingerprint import weights_fingerprint

    model, tokenizer = loading._load_gguf(loading.smollm2_gguf_path(), torch.float32)
    fresh = LM(loading._frozen(model), tokenizer, name="fresh")
    (shipped,) = (corpus_mod.Path(corpus_mod.__file__).parent.parent / "data" / "corpora").glob("*.safetensors")
    assert weights_fingerprint(fresh) == weights_fingerprint(smollm2)
    assert shipped.name.startswith(weights_fingerprint(fresh)[:32])
    text = "The Eiffel Tower is located in the city of"
    assert tokenizer(text)["input_ids"] == smollm2.tokenizer(text)["input_ids"]


def test_all_cores_blocks_nested_or_overlapping_in_threads_restore_each_threads_count():
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    inside, release = threading.Event(), threading.Event()

    def other():
        with corpus_mod.all_cores():
            inside.set()
            release.wait(10)

    try:
        thread = threading.Thread(target=other)
        with corpus_mod.all_cores() as n:
            thread.start()
            assert inside.wait(10)
            with corpus_mod.all_cores():
                pass
        release.set()  # the other thread's block ends last: this thread keeps its restored count
        thread.join(10)
        assert n == max(1, len(__import__("os").sched_getaffinity(0))) and torch.get_num_threads() == 1
    finally:
        release.set()
        torch.set_num_threads(before)

"""Key statistics: uncentred second moments E[k kᵀ] of the inputs of the edited projections, for any set of layers
in ONE forward pass over a corpus, cached on disk.

Kinds (per layer `l`):

* ``"mlp"``: the input of the MLP output projection (`adapter.mlp_down`), the ROME/MEMIT key; (d_k, d_k).
* ``"attn_in"``: the input of the value-producing projection (`adapter.qkv`), i.e. the normed residual that head
  value edits key on; (d_model, d_model).
* ``"attn_out"``: the input of the attention output projection (`adapter.attn_o`), the concatenated head outputs;
  (H·hd, H·hd).

How it is computed: the engine's `second_moments` accumulates ``x.float().T @ x`` (fp32, on the module's device)
for every requested (layer, kind) in the same forward, on every core (the thread count is restored after), and
stops the forward after the highest requested layer, so later layers and the unembedding cost nothing. Rows are packed with no padding, so every token counts.
ROME's code (`rome/layer_stats.py`) makes a separate pass per layer instead.

The default corpus differs from ROME's (see `locedit.editing.corpus`: for the built-in SmolLM2 it ships with
locedit, so its first edit does not sample). ROME estimates C on Wikipedia: 100,000 texts (about 44M tokens per
layer; 36-40 GPU hours for GPT-J or Llama-2-7B, Gupta et al. 2025). locedit's offline default is text *sampled from
the model itself* (temperature 1, top-k 50, from neutral one-word starts such as "The", "In", "She"), about
10 × d_k tokens, which Gupta et al. (2025, arXiv 2506.04226) found gives ≥95% of the full statistics' editing
quality. Self-generated text follows the model's own key distribution, which is what C is meant to whiten (ROME
treats C as the keys the layer normally sees), and needs no download; but it lacks Wikipedia's factual,
encyclopaedic skew, is blander and more repetitive than human text, and keys at rare entities are under-sampled.
For ROME-comparable numbers give Wikipedia text: ``corpus="wikimedia/wikipedia:20231101.en:train"`` (needs
``pip install datasets``), a .txt/.jsonl file or a list of strings, and more tokens.

Cache: ``cache_dir()/stats/<model fingerprint>/<kind>-layer<l>-<corpus hash>-<tokens>tok.safetensors``, one file
per (layer, kind), with the fingerprint, layer, kind, corpus hash, row length and token count also in the file's
metadata; all are checked on read, so an entry for another model, corpus or size is never used, and a corrupt file
is recomputed. Writes are atomic. A partial hit computes only the missing pairs, still in one pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from locedit.errors import InterventionError, LoceditError
from locedit.editing import corpus as corpus_mod

log = logging.getLogger(__name__)

KINDS = ("mlp", "attn_in", "attn_out")
CACHE_FORMAT = "1"
FINGERPRINT_SAMPLES = 1024
TOKENS_PER_DIM = 10


# the engine capture that records each kind's key
_CAPTURE = {"mlp": "mlp_keys", "attn_in": "attn_in", "attn_out": "heads"}


@dataclass
class KeyStats:
    """Second moments per kind: ``stats.mlp[layer]`` etc., float32 CPU tensors (E[x xᵀ], uncentred).

    `tokens`: tokens actually used; `corpus_hash`: hash of those token ids and the row length; `cache_key`:
    ``"<fingerprint>/<corpus_hash>/<tokens>"`` (per file, add kind and layer); `loaded`: the (kind, layer) pairs
    read from the disk cache rather than computed."""

    mlp: dict[int, torch.Tensor]
    attn_in: dict[int, torch.Tensor]
    attn_out: dict[int, torch.Tensor]
    tokens: int
    cache_key: str
    corpus_hash: str
    fingerprint: str
    seq_len: int
    source: str
    layers: tuple[int, ...]
    kinds: tuple[str, ...]
    loaded: frozenset[tuple[str, int]] = field(default_factory=frozenset)

    def get(self, kind: str, layer: int) -> torch.Tensor:
        """The second moment of `kind` at `layer`; LoceditError if it was not collected."""
        table = getattr(self, _check_kinds([kind])[0])
        if layer not in table:
            raise LoceditError(f"no {kind!r} statistics for layer {layer}; collected layers: {sorted(table)}")
        return table[layer]

    def to_dict(self) -> dict:
        """JSON-ready description (no tensors), e.g. to store in an Edit."""
        return {"cache_key": self.cache_key, "fingerprint": self.fingerprint, "corpus_hash": self.corpus_hash,
                "tokens": self.tokens, "seq_len": self.seq_len, "source": self.source, "layers": list(self.layers),
                "kinds": list(self.kinds)}


def model_fingerprint(lm) -> str:
    """A stable 16-hex-digit hash of a model: its config (sorted JSON, private keys dropped), dtype, and every
    parameter's name, shape, dtype and a strided sample of ≤1024 of its values. Two random inits of one config
    differ; a 7B model hashes in milliseconds (values are sampled, never read whole)."""
    model = getattr(lm, "model", lm)
    h = hashlib.sha256(b"locedit-fingerprint-v1")
    config = json.loads(model.config.to_json_string(use_diff=False))
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    params = list(model.named_parameters())
    h.update(str(next((p.dtype for _, p in params), None)).encode())
    for name, p in params:
        h.update(f"|{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        if p.device.type == "meta" or p.numel() == 0:  # offloaded weights: geometry only
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        h.update(flat[::step][:FINGERPRINT_SAMPLES].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def key_statistics(lm, layers: Iterable[int] | None = None, kinds: str | Sequence[str] = ("mlp",), corpus=None,
                   tokens: int | None = None, seed: int = 0, batch_tokens: int = 4096, cache: bool = True,
                   progress: bool = True) -> KeyStats:
    """Second moments of the keys of `kinds` at `layers` (None: every layer) in one forward pass over `corpus`.

    `corpus`: None (text sampled from the model, deterministic for `seed`), a list of strings, a .txt/.jsonl path,
    a dataset name ``"path[:config[:split]]"`` (needs `datasets`), or a 1-D tensor of token ids (see
    `locedit.editing.corpus`). `tokens`: default 10 × the widest requested key (10 × d_k with "mlp"); a smaller
    user corpus is used whole. `batch_tokens`: tokens per forward (rows are min(context, 256, batch_tokens) long).
    `cache`: read and write the disk cache (also for the sampled corpus). Raises LoceditError (InterventionError
    for a layer out of range, DatasetError for an empty or unreadable corpus)."""
    from locedit.core.loading import cache_dir, cache_lock

    kinds = _check_kinds(kinds)
    layers = _check_layers(lm, layers)
    widths = {(k, l): _width(lm, k, l) for k in kinds for l in layers}
    if tokens is None:
        tokens = TOKENS_PER_DIM * max(widths.values())
    for name, value in (("tokens", tokens), ("batch_tokens", batch_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LoceditError(f"{name} must be a positive integer, got {value!r}")
    fingerprint = model_fingerprint(lm)
    root = cache_dir() / "stats" / fingerprint
    text = corpus_mod.build_corpus(lm, corpus, tokens, seed=seed, seq_len=corpus_mod.seq_len_for(lm, batch_tokens),
                                   cache_root=root if cache else None, fingerprint=fingerprint, progress=progress)
    corpus_hash, n = text.hash, text.tokens

    def meta(kind: str, layer: int) -> dict[str, str]:
        return {"format": CACHE_FORMAT, "fingerprint": fingerprint, "kind": kind, "layer": str(layer),
                "corpus_hash": corpus_hash, "tokens": str(n), "seq_len": str(text.seq_len)}

    def path(kind: str, layer: int) -> Path:
        return root / f"{kind}-layer{layer:03d}-{corpus_hash}-{n}tok.safetensors"

    results: dict[tuple[str, int], torch.Tensor] = {}

    def read_cached() -> None:
        for (kind, layer), width in widths.items():
            if (kind, layer) not in results:
                found = _read(path(kind, layer), meta(kind, layer), width)
                if found is not None:
                    results[kind, layer] = found

    if cache:
        read_cached()
    if len(results) < len(widths):
        # one process computes the missing moments while others wait, then read what it wrote
        with cache_lock(root / f"moments-{corpus_hash}", "computing key statistics") if cache else nullcontext():
            if cache:
                read_cached()
            missing = [pair for pair in widths if pair not in results]
            if missing:
                with corpus_mod.all_cores(lm):  # the thread count is restored afterwards
                    computed = _accumulate(lm, text, missing, batch_tokens, progress)
                for (kind, layer), moment in computed.items():
                    results[kind, layer] = moment
                    if cache:
                        corpus_mod.atomic_save(path(kind, layer), {"moment": moment}, meta(kind, layer))
    else:
        missing = []
    loaded = frozenset(pair for pair in results if pair not in missing)
    tables: dict[str, dict[int, torch.Tensor]] = {k: {} for k in KINDS}
    for (kind, layer), moment in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        tables[kind][layer] = moment
    return KeyStats(mlp=tables["mlp"], attn_in=tables["attn_in"], attn_out=tables["attn_out"], tokens=n,
                    cache_key=f"{fingerprint}/{corpus_hash}/{n}", corpus_hash=corpus_hash, fingerprint=fingerprint,
                    seq_len=text.seq_len, source=text.source, layers=tuple(layers), kinds=kinds, loaded=loaded)


# --- one pass ---------------------------------------------------------------------------------------------------
def _module(lm, kind: str, layer: int) -> torch.nn.Module:
    adapter = lm.adapter
    path = {"mlp": adapter.mlp_down, "attn_in": adapter.qkv, "attn_out": adapter.attn_o}[kind]
    return adapter.layer_part(lm.model, layer, path)


def _width(lm, kind: str, layer: int) -> int:
    """Input width of the hooked module (GPT-2's Conv1D stores its weight as (in, out))."""
    module = _module(lm, kind, layer)
    width = getattr(module, "in_features", None)
    if not isinstance(width, int):
        weight = module.weight
        width = weight.shape[0] if lm.adapter.conv1d else weight.shape[-1]
    return int(width)


@torch.no_grad()
def _accumulate(lm, text: corpus_mod.Corpus, pairs: list[tuple[str, int]], batch_tokens: int,
                progress: bool) -> dict[tuple[str, int], torch.Tensor]:
    """One forward per batch over the corpus (the engine's `second_moments`, stopped after the highest layer),
    capturing every (kind, layer) in `pairs`. Returns E[x xᵀ] per pair (float32, CPU)."""
    from tqdm.auto import tqdm

    from locedit.core.engine import Capture, second_moments

    kinds = sorted({kind for kind, _ in pairs})
    capture = Capture(**{_CAPTURE[kind]: True for kind in kinds}, layers=sorted({layer for _, layer in pairs}))
    bar = tqdm(total=text.tokens, unit="tok", desc=f"key statistics ({len(pairs)} layer×kind)",
               disable=not progress)
    try:
        moments = second_moments(lm, (batch.to(lm.device) for batch in text.batches(batch_tokens)), capture,
                                 on_batch=bar.update)
    finally:
        bar.close()
    count = moments.tokens
    seen = {pair: moments.counts.get((_CAPTURE[pair[0]], pair[1]), 0) for pair in pairs}
    short = [pair for pair, k in seen.items() if k != count]
    if short:
        raise LoceditError(f"the hooked module for {short[0][0]!r} at layer {short[0][1]} saw {seen[short[0]]} of "
                           f"{count} tokens; the adapter does not match {lm.name}")
    sums = moments.sums
    return {pair: sums.pop((_CAPTURE[pair[0]], pair[1])).div_(count).cpu() for pair in pairs}  # in place


# --- cache and checks -------------------------------------------------------------------------------------------
def _read(path: Path, expected: dict[str, str], width: int) -> torch.Tensor | None:
    """The cached moment if the file exists, matches every key in `expected`, and is a finite (width, width)
    float32 matrix; None otherwise (a corrupt file is logged and ignored)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            moment = f.get_tensor("moment")
    except Exception as exc:  # truncated or garbage file: recompute, never crash
        log.warning("ignoring unreadable statistics cache file %s (%s)", path, exc)
        return None
    if any(meta.get(k) != v for k, v in expected.items()):
        log.warning("ignoring statistics cache file %s: made for another model, layer, kind or corpus", path)
        return None
    if moment.dtype != torch.float32 or tuple(moment.shape) != (width, width) or not torch.isfinite(moment).all():
        log.warning("ignoring statistics cache file %s: bad shape, dtype or values", path)
        return None
    return moment


def _check_kinds(kinds) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    if not kinds:
        raise LoceditError(f"no statistics kinds requested; choose from {', '.join(KINDS)}")
    for kind in kinds:
        if kind not in KINDS:
            raise LoceditError(f"unknown statistics kind {kind!r}; choose from {', '.join(KINDS)}")
    return tuple(k for k in KINDS if k in kinds)


def _check_layers(lm, layers) -> list[int]:
    n = lm.num_layers
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        try:
            index = operator.index(layer)
        except TypeError:
            raise InterventionError(f"layer {layer!r} is not an integer") from None
        if isinstance(layer, bool) or not 0 <= index < n:
            raise InterventionError(f"layer {layer!r} is out of range: {lm.name} has {n} layers (0..{n - 1})")
        out.append(index)
    if not out:
        raise LoceditError("no layers requested for key statistics")
    return sorted(set(out))

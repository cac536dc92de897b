"""Token corpora for key statistics: text the user gives, or text the model samples itself.

`build_corpus` turns any accepted `corpus=` value into a `Corpus`: one flat stream of token ids, packed into rows
of `seq_len` tokens (no padding). Accepted values:

* a list of strings (one document each);
* a path to a ``.txt`` file (documents separated by blank lines; a file without blank lines is one document) or a
  ``.jsonl`` file (the ``"text"`` field of each line);
* a Hugging Face dataset name ``"path[:config[:split]]"`` such as ``"wikitext:wikitext-103-raw-v1:train"``
  (streamed, needs ``pip install datasets``);
* a 1-D tensor of token ids (used as is);
* ``None``: text sampled from the model itself from neutral one-word starts (temperature 1, top-k 50), deterministic
  for a seed, on every core, cached on disk next to the statistics. For weights locedit knows (the built-in SmolLM2)
  the sampled ids ship in ``locedit/data/corpora/``, keyed by the weights' fingerprint
  (`locedit.editing.fingerprint`) and the sampler's version and settings, so they are not sampled again; any other
  model, seed, size or sampler version samples. A shipped file that fails its checks is ignored with a warning.

Every document is tokenized with the tokenizer's own special tokens and followed by EOS; documents are read only
until `tokens` tokens are collected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from locedit.core.adapters import text_config
from locedit.core.engine.run import output_cache
from locedit.errors import DatasetError

log = logging.getLogger(__name__)

STARTS = ("The", "In", "A", "It", "He", "She", "This", "When", "I", "We", "They", "There", "On", "After", "One",
          "If")
TOP_K = 50
TEMPERATURE = 1.0
GEN_BATCH = 32  # sequences sampled together (fixed, so the corpus does not depend on batch_tokens)
SAMPLER_VERSION = 1
MAX_SEQ_LEN = 256


@dataclass(frozen=True)
class Corpus:
    """A packed token stream. `ids`: 1-D int64 on the CPU; rows are consecutive `seq_len`-token slices."""

    ids: torch.Tensor
    seq_len: int
    source: str

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())

    @property
    def hash(self) -> str:
        """SHA-256 (16 hex digits) of the exact token ids and the row length: what the statistics depend on."""
        h = hashlib.sha256(f"locedit-corpus-v1|seq_len={self.seq_len}|".encode())
        h.update(self.ids.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def batches(self, batch_tokens: int) -> Iterator[torch.Tensor]:
        """(rows, seq_len) batches of at most `batch_tokens` tokens; a shorter last row comes alone."""
        per_batch = max(1, batch_tokens // self.seq_len)
        n_full = self.tokens // self.seq_len
        full = self.ids[: n_full * self.seq_len].view(n_full, self.seq_len)
        for start in range(0, n_full, per_batch):
            yield full[start : start + per_batch]
        if self.tokens > n_full * self.seq_len:
            yield self.ids[n_full * self.seq_len :].view(1, -1)


def seq_len_for(lm, batch_tokens: int) -> int:
    """Row length: min(the model's context, 256, batch_tokens)."""
    cfg = text_config(lm.model)
    limit = None
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            limit = value
            break
    return max(1, min(limit or MAX_SEQ_LEN, MAX_SEQ_LEN, batch_tokens))


def build_corpus(lm, corpus, tokens: int, *, seed: int = 0, seq_len: int, cache_root: Path | None = None,
                 fingerprint: str = "", progress: bool = True) -> Corpus:
    """Resolve `corpus` (see the module docstring) into at most `tokens` packed token ids.

    `cache_root`: where the sampled default corpus is cached (None: no caching). Raises DatasetError for an
    unreadable source or an empty corpus."""
    if corpus is None:
        ids, source = _sampled(lm, tokens, seed, seq_len, cache_root, fingerprint, progress), \
            f"sampled from the model (seed {seed}, temperature {TEMPERATURE:g}, top-k {TOP_K})"
    elif isinstance(corpus, torch.Tensor):
        if corpus.dim() != 1 or corpus.dtype.is_floating_point or corpus.dtype == torch.bool:
            raise DatasetError(f"a token-id corpus must be a 1-D integer tensor, got {tuple(corpus.shape)} "
                               f"{corpus.dtype}")
        ids, source = corpus[:tokens].to("cpu", torch.int64), f"{corpus.numel()} given token ids"
    else:
        texts, source = _texts(corpus)
        ids = _tokenize(lm.tokenizer, texts, tokens)
    if ids.numel() == 0:
        raise DatasetError(f"empty corpus: {source} holds no text to compute key statistics on")
    vocab = getattr(lm, "vocab_size", None)
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise DatasetError(f"corpus token ids must lie in [0, {vocab}); got {int(ids.min())}..{int(ids.max())}")
    return Corpus(ids.contiguous(), seq_len, source)


# --- user text ------------------------------------------------------------------------------------------------
def _texts(corpus) -> tuple[Iterable[str], str]:
    if isinstance(corpus, (list, tuple)):
        bad = [i for i, t in enumerate(corpus) if not isinstance(t, str)]
        if bad:
            raise DatasetError(f"corpus list item {bad[0]} is a {type(corpus[bad[0]]).__name__}, not a string")
        return corpus, f"a list of {len(corpus)} texts"
    if not isinstance(corpus, (str, os.PathLike)):
        raise DatasetError(f"cannot use a {type(corpus).__name__} as a corpus: give a list of strings, a .txt or "
                           ".jsonl path, a dataset name, a 1-D tensor of token ids, or None")
    spec = os.fspath(corpus)
    path = Path(spec)
    if path.is_file():
        return (_jsonl(path) if path.suffix.lower() == ".jsonl" else _txt(path)), str(path)
    if path.suffix.lower() in (".txt", ".jsonl", ".json") or os.sep in spec and ":" not in spec:
        raise DatasetError(f"corpus file not found: {spec}")
    return _dataset(spec), f"dataset {spec}"


def _txt(path: Path) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read corpus file {path}: {exc}") from exc
    yield from re.split(r"\n[ \t]*\n", text)


def _jsonl(path: Path) -> Iterator[str]:
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"cannot read corpus file {path}: {exc}") from exc
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise DatasetError(f"{path}:{number}: not a JSON line") from None
            text = row.get("text") if isinstance(row, dict) else None
            if isinstance(text, str):
                yield text


def _dataset(spec: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"corpus {spec!r} is not a file; reading it as a Hugging Face dataset name needs the "
                           "datasets package: pip install datasets") from None
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        rows = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as exc:  # the hub, a missing config, no network: one clear line
        raise DatasetError(f"cannot load dataset {spec!r}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    for row in rows:
        text = row.get("text")
        if isinstance(text, str):
            yield text


def _tokenize(tokenizer, texts: Iterable[str], tokens: int) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        if not text.strip():
            continue
        ids.extend(tokenizer(text.strip())["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= tokens:
            break
    return torch.tensor(ids[:tokens], dtype=torch.int64)


# --- the default corpus: the model's own samples ---------------------------------------------------------------
def sampler_spec(lm, tokens: int, seed: int, seq_len: int) -> dict:
    """Everything the sampled ids depend on besides the model's weights: the sampler's version and settings and
    the token ids of the start words. DatasetError when the tokenizer encodes none of the start words."""
    starts = [ids[: max(1, seq_len - 1)] for ids in (lm.tokenizer(s)["input_ids"] for s in STARTS) if ids]
    if not starts:
        raise DatasetError("empty corpus: the tokenizer encodes none of the default start words")
    return {"version": SAMPLER_VERSION, "seed": seed, "tokens": tokens, "seq_len": seq_len, "top_k": TOP_K,
            "temperature": TEMPERATURE, "batch": GEN_BATCH, "starts": starts}


def spec_key(spec: dict) -> str:
    """16 hex digits of SHA-256 over the sorted JSON of `spec`."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(cache_root: Path, spec: dict, fingerprint: str) -> Path:
    """The disk-cache file of the corpus sampled with `spec` from the model with (stats) `fingerprint`."""
    key = spec_key({**spec, "fingerprint": fingerprint})
    return Path(cache_root) / f"corpus-sampled-seed{spec['seed']}-{spec['tokens']}tok-{key}.safetensors"


def _sampled(lm, tokens: int, seed: int, seq_len: int, cache_root: Path | None, fingerprint: str,
             progress: bool) -> torch.Tensor:
    """The sampled corpus: from the disk cache, else shipped with locedit for these weights, else sampled now (one
    process samples while others wait; the result is cached)."""
    spec = sampler_spec(lm, tokens, seed, seq_len)
    key = spec_key({**spec, "fingerprint": fingerprint})
    path = cache_path(cache_root, spec, fingerprint) if cache_root else None
    if path is not None:
        cached = _read_ids(path, key, tokens)
        if cached is not None:
            return cached
    shipped = shipped_ids(lm, spec)
    if shipped is not None:
        return shipped
    if path is None:
        return sample_ids(lm, spec["starts"], tokens, seed, seq_len, progress)
    from locedit.core.loading import cache_lock

    with cache_lock(path, "sampling the statistics corpus"):  # one process samples, the others wait and read
        cached = _read_ids(path, key, tokens)
        if cached is not None:
            return cached
        ids = sample_ids(lm, spec["starts"], tokens, seed, seq_len, progress)
        _write_ids(path, ids, key)
    return ids


# --- sampled corpora shipped with locedit (the built-in model skips sampling) -------------------------------------
SHIPPED = Path(__file__).resolve().parent.parent / "data" / "corpora"


def shipped_path(weights_fingerprint: str, spec: dict) -> Path:
    """Where a shipped sampled corpus lives: ``locedit/data/corpora/<weights fingerprint[:32]>-<spec key>``."""
    return SHIPPED / f"{weights_fingerprint[:32]}-{spec_key(spec)}.safetensors"


def shipped_ids(lm, spec: dict) -> torch.Tensor | None:
    """The sampled corpus shipped for exactly these weights (`locedit.editing.fingerprint`) and sampler `spec`, or
    None. A shipped file that does not match its name or whose ids fail their checksum is ignored with a warning."""
    if not SHIPPED.is_dir() or not any(SHIPPED.glob("*.safetensors")):
        return None
    from locedit.editing.fingerprint import weights_fingerprint

    fingerprint = weights_fingerprint(lm)
    path = shipped_path(fingerprint, spec)
    if not path.is_file():
        return None
    try:
        meta, ids = _ids_file(path)
        expected = {"weights_fingerprint": fingerprint, "spec_key": spec_key(spec), "tokens": str(spec["tokens"])}
        if any(meta.get(k) != v for k, v in expected.items()) or ids.dim() != 1 or ids.numel() != spec["tokens"] \
                or _ids_sha256(ids) != meta.get("ids_sha256"):
            log.warning("ignoring shipped corpus %s: its metadata or checksum does not match; sampling instead", path)
            return None
        return ids.to(torch.int64)
    except Exception as exc:  # a damaged package file: sample instead, never fatal
        log.warning("ignoring unreadable shipped corpus %s (%s); sampling instead", path, exc)
        return None


def write_shipped(lm, spec: dict, ids: torch.Tensor, directory: Path = SHIPPED) -> Path:
    """Store `ids` (sampled with `spec` from `lm`) as a shipped corpus (int32 token ids, checksummed)."""
    from locedit.editing.fingerprint import weights_fingerprint

    fingerprint = weights_fingerprint(lm)
    path = Path(directory) / shipped_path(fingerprint, spec).name
    small = ids.to(torch.int32)
    if not torch.equal(small.to(torch.int64), ids):
        raise DatasetError("token ids do not fit in int32")
    meta = {"weights_fingerprint": fingerprint, "spec_key": spec_key(spec), "tokens": str(ids.numel()),
            "ids_sha256": _ids_sha256(ids), "spec": json.dumps(spec, sort_keys=True),
            "kind": "locedit shipped sampled corpus"}
    if not atomic_save(path, {"ids": small.contiguous()}, meta):
        raise DatasetError(f"could not write {path}")
    path.chmod(0o644)  # package data: readable by every user
    return path


def _ids_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


ALL_CORES_MIN_PARAMS = 20_000_000  # not tuned: SmolLM2 (135M) and larger use every core, the tiny test models not


@contextlib.contextmanager
def all_cores(lm=None) -> Iterator[int]:
    """Run the block with torch using every core this process may run on; the calling thread's thread count is
    restored after (torch's count is per calling thread under OpenMP). A model `lm` under ALL_CORES_MIN_PARAMS
    parameters keeps the current count: its steps are too small to split, and on a loaded machine threads that
    wait for each other make them far slower."""
    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or before
    small = lm is not None and sum(p.numel() for p in lm.model.parameters()) < ALL_CORES_MIN_PARAMS
    torch.set_num_threads(before if small else max(before, cores))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def sample_ids(lm, starts: list[list[int]], tokens: int, seed: int, seq_len: int, progress: bool = True
               ) -> torch.Tensor:
    """Sample ceil(tokens / seq_len) sequences of `seq_len` tokens (start + continuation) with the KV cache, in
    batches of GEN_BATCH sequences whose starts have equal length (no padding); return the first `tokens` ids, flat.
    Runs on every core (the thread count is restored after); the progress bar shows an ETA. Sampling draws from a
    CPU `torch.Generator` seeded with `seed`, so the global RNG is untouched."""
    from tqdm.auto import tqdm

    from locedit.core.engine.run import forward

    n_rows = math.ceil(tokens / seq_len)
    prompts = [starts[i % len(starts)] for i in range(n_rows)]
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    rows: list[torch.Tensor | None] = [None] * n_rows
    with all_cores(lm), tqdm(total=n_rows * seq_len, unit="tok", desc="sampling the statistics corpus",
                           disable=not progress) as bar:
        for length in sorted(by_length):
            group = by_length[length]
            for b in range(0, len(group), GEN_BATCH):
                index = group[b : b + GEN_BATCH]
                batch = torch.tensor([prompts[i] for i in index], dtype=torch.int64)
                out = forward(lm, batch, use_cache=True, logits_at=1)
                pieces = [batch]
                bar.update(batch.numel())
                for step in range(seq_len - length):
                    nxt = _sample(out.logits[:, -1], generator)
                    pieces.append(nxt)
                    bar.update(len(index))
                    if step + 1 < seq_len - length:
                        out = forward(lm, nxt, cache=output_cache(out), use_cache=True, logits_at=1)
                for i, row in zip(index, torch.cat(pieces, dim=1)):
                    rows[i] = row
    return torch.cat(rows)[:tokens]  # type: ignore[arg-type]


def _sample(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    values, indices = logits.float().topk(min(TOP_K, logits.shape[-1]), dim=-1)
    probs = (values.cpu() / TEMPERATURE).softmax(-1)
    choice = torch.multinomial(probs, 1, generator=generator)
    return indices.cpu().gather(1, choice)


def _ids_file(path: Path) -> tuple[dict[str, str], torch.Tensor]:
    """The metadata and the "ids" tensor of a corpus file (shipped or cached); raises on a damaged file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}, f.get_tensor("ids")


def _read_ids(path: Path, key: str, tokens: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        meta, ids = _ids_file(path)
        if meta.get("key") == key and ids.dim() == 1 and ids.numel() == tokens and ids.dtype == torch.int64:
            return ids
        log.warning("ignoring cached corpus %s: it was made for other settings", path)
    except Exception as exc:  # a corrupt or truncated file is recomputed, never fatal
        log.warning("ignoring unreadable cached corpus %s (%s)", path, exc)
    return None


def _write_ids(path: Path, ids: torch.Tensor, key: str) -> None:
    atomic_save(path, {"ids": ids.contiguous()}, {"key": key, "kind": "locedit sampled corpus"})


def atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """Write a safetensors file atomically (temp file in the same directory, then `os.replace`).
    A failure (read-only cache, full disk) is logged and returns False: the cache is an optimisation."""
    from safetensors.torch import save_file

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
        tmp = None
        return True
    except OSError as exc:
        log.warning("could not write cache file %s (%s)", path, exc)
        return False
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)

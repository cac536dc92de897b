"""Sample the built-in model's default key-statistics corpus once and store it as package data
(`locedit/data/corpora/`), so that a first edit of SmolLM2 skips sampling. Other models still sample (and cache).

The corpus is exactly what `key_statistics(lm)` samples by default (seed 0, 10 × d_k tokens, rows of 256): the same
`sampler_spec`, the same `sample_ids`. If this machine's statistics cache already holds that corpus (an entry is
keyed by the model, the sampler's version and every setting), it is taken from there unless `--resample`; a fresh
sample prints its rate (tokens/s) and its ratio to a clean forward.

    nice -n 10 python recipes/ship_corpus.py [--model smollm2-135m] [--resample]
"""

from __future__ import annotations

import argparse
import time

import torch

import locedit
from locedit.core.loading import cache_dir
from locedit.editing import corpus as corpus_mod
from locedit.editing.stats import TOKENS_PER_DIM, _width, model_fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resample", action="store_true", help="sample even if the cache holds the corpus")
    args = parser.parse_args()
    lm = locedit.load(args.model)
    tokens = TOKENS_PER_DIM * max(_width(lm, "mlp", layer) for layer in range(lm.num_layers))
    seq_len = corpus_mod.seq_len_for(lm, 4096)  # key_statistics' default batch_tokens
    spec = corpus_mod.sampler_spec(lm, tokens, args.seed, seq_len)
    cached = corpus_mod.cache_path(cache_dir() / "stats" / model_fingerprint(lm), spec, model_fingerprint(lm))
    ids = None if args.resample else corpus_mod._read_ids(cached, cached.stem.rsplit("-", 1)[1], tokens)
    if ids is not None:
        path = corpus_mod.write_shipped(lm, spec, ids)
        print(f"{path}: {tokens} tokens from the cache entry {cached}")
        return
    start = time.perf_counter()
    ids = corpus_mod.sample_ids(lm, spec["starts"], tokens, args.seed, seq_len)
    seconds = time.perf_counter() - start
    path = corpus_mod.write_shipped(lm, spec, ids)
    prompt = lm.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        best = min(_timed(lambda: lm.model(input_ids=prompt)) for _ in range(10))
    print(f"{path}: {tokens} tokens sampled in {seconds:.1f} s ({tokens / seconds:.1f} tok/s, "
          f"{torch.get_num_threads()} threads outside sampling) = {seconds / best:,.0f} clean forwards of "
          f"{best * 1000:.1f} ms")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()

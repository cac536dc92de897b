"""Benchmark every flow analysis on SmolLM2 (CPU by default): time per fact, and the ratio to a plain
per-configuration loop (one full forward per configuration, as the official notebook and ROME do), measured in the
same run on the same machine.

    python recipes/bench_flow.py [--facts 3] [--baseline-configs 40] [--full-baseline] [--device cuda]

The loop baseline runs every configuration through the same engine with `reuse_prefix=False` and one
configuration per forward (ROME's causal trace: one forward of samples+1 rows per cell). By default it times a
sample of `--baseline-configs` configurations per analysis and scales to the full count (the per-configuration
cost of a loop is uniform); `--full-baseline` runs them all. The script also checks that both ways give the same
probabilities.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

import locedit
from locedit import AddEmbeddingNoise, BlockAttention, Capture, SetHeads, SetResidual, SetSublayer, run
from locedit.core.datasets import curated_facts, known_facts
from locedit.localization import (attention_knockout, attribute_rate, causal_trace, extraction_events, head_effects,
                          head_projection, state_patching, sublayer_knockout)
from locedit.localization.attributes import AttributeSet
from locedit.localization.causal_trace import embedding_std
from locedit.localization.common import resolve_target, window_layers


def knockout_configs(lm, enc):
    g = enc.positions
    groups = [g.subject, g.non_subject, (g.last,)] + ([g.first] if g.first else [])
    return [([BlockAttention(window_layers(l, 9, lm.num_layers), [g.last], grp)], 0)
            for grp in groups for l in range(lm.num_layers)]


def patching_configs(lm, enc):
    g = enc.positions
    with torch.no_grad():
        clean = run(lm, enc, capture=Capture(residual=True)).captures
    out = []
    for grp in (g.subject, g.non_subject, (g.last,)):
        for source in (0, 1, 5, 10, 20):
            for layer in range(lm.num_layers):
                out.append(([SetResidual(layer, grp, clean["residual", source][0, list(grp)])], 0))
    return out


def sublayer_configs(lm, enc):
    n, L = len(enc), lm.num_layers
    measure = round(L * 40 / 48)
    return [([SetSublayer(site, range(s, min(s + 10, measure)), range(n))], 0)
            for site in ("mlp", "attn") for s in range(measure)]


def head_configs(lm, enc):
    g = enc.positions
    return ([([BlockAttention([l], [g.last], g.subject, heads=[h])], 0) for l in range(lm.num_layers)
             for h in range(lm.num_heads)] +
            [([SetHeads([l], [h], [g.last])], 0) for l in range(lm.num_layers) for h in range(lm.num_heads)])


def trace_configs(lm, enc, samples=10):
    """ROME's loop: per cell one forward of a clean row plus `samples` corrupted rows."""
    with torch.no_grad():
        clean = run(lm, enc, capture=Capture(residual=True)).captures
    std = embedding_std(lm)
    rng = np.random.RandomState(1)
    noise = torch.from_numpy(rng.randn(samples, len(enc.positions.subject), lm.d_model)).float() * 3 * std
    bases = [[]] + [[AddEmbeddingNoise(enc.positions.subject, noise[s])] for s in range(samples)]
    cells = []
    for t in range(len(enc)):
        for l in range(lm.num_layers):
            cells.append(([SetResidual(l + 1, [t], clean["residual", l + 1][0, t])], bases))
    return cells


def loop_time(lm, enc, configs, sample: int | None, target: int) -> tuple[float, int]:
    """Seconds for the whole loop (extrapolated from `sample` configurations when given)."""
    chosen = configs if sample is None or sample >= len(configs) else random.Random(0).sample(configs, sample)
    start = time.perf_counter()
    with torch.no_grad():
        for ivs, bases in chosen:
            if bases:  # ROME: one forward per cell, rows = clean + corrupted samples
                rows = [[] if i == 0 else ivs for i in range(len(bases))]
                run(lm, enc, rows, bases=bases, row_base=list(range(len(bases))), reuse_prefix=False)
            else:
                run(lm, enc, [ivs], reuse_prefix=False).prob_of(target)
    elapsed = time.perf_counter() - start
    return elapsed * len(configs) / len(chosen), len(configs)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=locedit.DEFAULT_MODEL)
    parser.add_argument("--facts", type=int, default=3, help="known curated facts to time (default 3)")
    parser.add_argument("--baseline-configs", type=int, default=40)
    parser.add_argument("--full-baseline", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = locedit.load(args.model, device=args.device)
    facts = known_facts(lm, curated_facts().facts[:80], progress=False)[: args.facts]
    sample = None if args.full_baseline else args.baseline_configs
    print(f"{lm.name} on {lm.device}, threads={torch.get_num_threads()}, {len(facts)} facts; loop baseline "
          f"{'complete' if sample is None else f'extrapolated from {sample} configurations'}")
    analyses = {
        "attention_knockout": (lambda f: attention_knockout(lm, f), knockout_configs),
        "state_patching": (lambda f: state_patching(lm, f), patching_configs),
        "sublayer_knockout": (lambda f: sublayer_knockout(lm, f, attributes=AttributeSet(f.subject, frozenset(),
                                                                                           "none")),
                              sublayer_configs),
        "head_effects": (lambda f: head_effects(lm, f), head_configs),
        "causal_trace": (lambda f: causal_trace(lm, f), trace_configs),
        "extraction_events": (lambda f: extraction_events(lm, f), None),
        "attribute_rate": (lambda f: attribute_rate(lm, f, attributes=AttributeSet(f.subject, frozenset(), "none")),
                           None),
        "head_projection": (lambda f: head_projection(lm, f), None),
    }
    print(f"{'analysis':20s} {'configs':>8s} {'batched s/fact':>15s} {'loop s/fact':>12s} {'ratio':>7s}")
    for name, (analysis, configs_of) in analyses.items():
        ours, loops, counts = [], [], []
        for fact in facts:
            enc = lm.encode(fact)
            t, _ = timed(lambda: analysis(fact))
            ours.append(t)
            if configs_of is not None:
                target = resolve_target(lm, enc).token_id
                configs = configs_of(lm, enc)
                loop, count = loop_time(lm, enc, configs, sample, target)
                loops.append(loop)
                counts.append(count)
        mean_ours = float(np.mean(ours))
        if loops:
            mean_loop = float(np.mean(loops))
            print(f"{name:20s} {int(np.mean(counts)):8d} {mean_ours:15.2f} {mean_loop:12.2f} {mean_loop / mean_ours:6.1f}x")
        else:
            print(f"{name:20s} {'-':>8s} {mean_ours:15.2f} {'-':>12s} {'-':>7s}  (one forward; nothing to batch)")


if __name__ == "__main__":
    main()

"""Throughput of `locate` and of the attention-knockout sweep on CPU, in clean forwards (issue 10's goals:
locate <= 80 clean forwards per fact, knockout <= 5), with the share of each of locate's analyses, and the
dataset mode (`locate_dataset`) per fact: one fact at a time (`batch_facts=1`) and packed (`locate_batch`, every
fact's rows in shared forward passes), with the model calls each needs.

    python recipes/bench_locate.py [--facts 3] [--threads 1] [--out data/results/bench_locate.txt]
    python recipes/bench_locate.py --facts 5 --packed-only   # only the single vs packed comparison

A "clean forward" is one plain forward of the fact's prompt (batch 1), timed right before and after each
measurement (the median), so that a machine shared with other jobs shifts both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import locedit
from locedit.localization import attention_knockout, causal_trace, head_effects, head_projection
from locedit.localization.common import resolve_target
from locedit.localization.sites import _head_candidates, _mlp_knockouts, locate, site_positions

from bench_facts import FACTS


class Clock:
    def __init__(self, lm, enc):
        self.lm, self.ids = lm, torch.tensor([enc.input_ids], device=lm.device)

    def clean(self, repeats: int = 5) -> float:
        times = []
        with torch.no_grad():
            for _ in range(repeats):
                start = time.perf_counter()
                self.lm.model(input_ids=self.ids)
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    def ratio(self, fn, repeats: int = 1) -> tuple[float, float, object]:
        """(seconds, clean forwards, result) of fn (best of `repeats`)."""
        before = self.clean()
        best, result = float("inf"), None
        for _ in range(repeats):
            start = time.perf_counter()
            result = fn()
            best = min(best, time.perf_counter() - start)
        clean = statistics.median([before, self.clean()])
        return best, best / clean, result


def count_forwards(lm, fn):
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return len(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=locedit.DEFAULT_MODEL)
    parser.add_argument("--facts", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the report to this file")
    parser.add_argument("--packed-only", action="store_true", help="only compare one-at-a-time and packed locate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = locedit.load(args.model)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"model {lm.name} ({lm.num_layers} layers, {lm.num_heads} heads), {args.threads} thread(s), "
        f"torch {torch.__version__}")
    facts = FACTS[: args.facts]
    if args.packed_only:
        packed_comparison(lm, facts, say)
        return _write(args, lines)
    locate_ratios, knockout_ratios = [], []
    parts_total: dict[str, list[float]] = {}
    for fact in facts:
        enc = lm.encode(fact)
        clock = Clock(lm, enc)
        target = resolve_target(lm, enc)
        t_ko, r_ko, _ = clock.ratio(lambda: attention_knockout(lm, enc, target=target), repeats=3)
        knockout_ratios.append(r_ko)
        t_loc, r_loc, sites = clock.ratio(lambda: locate(lm, enc))
        locate_ratios.append(r_loc)
        forwards = count_forwards(lm, lambda: locate(lm, enc))
        say(f"{fact.prompt!r} ({len(enc)} tokens) -> {sites.target!r}: clean forward {clock.clean() * 1e3:.0f} ms; "
            f"knockout sweep {t_ko:.2f} s = {r_ko:.1f} clean forwards; locate {t_loc:.1f} s = {r_loc:.0f} clean "
            f"forwards ({forwards} model calls)")
        subject = site_positions(enc)
        L = lm.num_layers
        opts = dict(samples=2, noise=3.0, positions=subject, target=target)
        parts = {
            "hidden trace": lambda: causal_trace(lm, enc, kind="hidden", layers=range(0, L, 2), **opts),
            "mlp trace": lambda: causal_trace(lm, enc, kind="mlp", window=3, layers=range(1, L, 3), **opts),
            "mlp knockouts": lambda: _mlp_knockouts(lm, enc, target.token_id, target.base_prob),
            "attention knockout": lambda: attention_knockout(lm, enc, target=target),
            "head effects": lambda: head_effects(lm, enc, target=target),
            "head projection (30 heads)": lambda: head_projection(
                lm, enc, top=0, target=target, heads=_head_candidates(head_effects(lm, enc, target=target), 30)),
        }
        for name, fn in parts.items():
            _, r, _ = clock.ratio(fn)
            parts_total.setdefault(name, []).append(r)
    say()
    say(f"mean over {len(facts)} facts: locate {statistics.mean(locate_ratios):.0f} clean forwards per fact "
        f"(goal <= 80); knockout sweep {statistics.mean(knockout_ratios):.1f} (goal <= 5)")
    say("locate's parts (clean forwards, mean; head projection includes one head_effects):")
    for name, values in parts_total.items():
        say(f"  {name:28s} {statistics.mean(values):6.1f}")

    # dataset mode: locate_dataset over the facts (targets resolved in one batched forward)
    from locedit.localization.sites import locate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock(lm, lm.encode(facts[0]))
        t_ds, r_ds, _ = clock.ratio(lambda: locate_dataset(lm, facts, Path(tmp) / "sites.jsonl", progress=False))
    say(f"dataset mode (locate_dataset, {len(facts)} facts): {t_ds / len(facts):.1f} s per fact = "
        f"{r_ds / len(facts):.0f} clean forwards per fact")
    packed_comparison(lm, facts, say)
    _write(args, lines)


def packed_comparison(lm, facts, say) -> None:
    """locate one fact at a time vs `locate_batch` (all facts packed): seconds, clean forwards and model calls per
    fact, and the largest difference of any number between the two."""
    from locedit.localization.sites import locate_batch

    clock = Clock(lm, lm.encode(facts[0]))
    t_one, r_one, singles = clock.ratio(lambda: [locate(lm, f) for f in facts])
    t_packed, r_packed, packed = clock.ratio(lambda: locate_batch(lm, facts))
    calls_one = count_forwards(lm, lambda: [locate(lm, f) for f in facts])
    calls_packed = count_forwards(lm, lambda: locate_batch(lm, facts))
    diff = max(max(abs(a - b) for a, b in zip(_numbers(p.evidence["hidden_trace"]) + [p.base_prob],
                                              _numbers(s.evidence["hidden_trace"]) + [s.base_prob]))
               for p, s in zip(packed, singles))
    same = sum(p.mlp_layers[0]["layer"] == s.mlp_layers[0]["layer"]
               and (p.heads[0]["layer"], p.heads[0]["head"]) == (s.heads[0]["layer"], s.heads[0]["head"])
               for p, s in zip(packed, singles))
    n = len(facts)
    say(f"locate, {n} facts one at a time: {t_one / n:.2f} s per fact = {r_one / n:.0f} clean forwards "
        f"({calls_one / n:.0f} model calls per fact)")
    say(f"locate_batch, {n} facts packed:   {t_packed / n:.2f} s per fact = {r_packed / n:.0f} clean forwards "
        f"({calls_packed / n:.1f} model calls per fact; {calls_packed} in all)")
    say(f"packed vs single: largest difference of a traced probability {diff:.1e}; top MLP layer and top head "
        f"identical on {same} of {n} facts")


def _numbers(nested) -> list[float]:
    import math

    if isinstance(nested, (list, tuple)):
        return [x for v in nested for x in _numbers(v)]
    return [0.0 if (nested is None or (isinstance(nested, float) and math.isnan(nested))) else float(nested)]


def _write(args, lines) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("$ python " + " ".join(sys.argv) + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

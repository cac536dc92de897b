"""Benchmark the intervention engine on SmolLM2 (CPU): a full attention-knockout sweep for one fact
(3 groups x every layer, window 9), done three ways, each as a ratio to one clean forward.

    python recipes/bench_engine.py [--threads N] [--repeats R]
"""

from __future__ import annotations

import argparse
import time

import torch

import locedit
from locedit import BlockAttention, Fact, run


def sweep_rows(lm, enc, window: int = 9):
    groups = enc.positions
    half = window // 2
    rows = []
    for group in (groups.subject, groups.non_subject, (groups.last,)):
        for layer in range(lm.num_layers):
            layers = range(max(0, layer - half), min(lm.num_layers, layer - half + window))
            rows.append([BlockAttention(layers, [groups.last], group)])
    return rows


def timed(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=locedit.DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: compare 1 and 2)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lm = locedit.load(args.model)
    fact = Fact("The Eiffel Tower", "The Eiffel Tower is located in the city of")
    enc = lm.encode(fact)
    ids = torch.tensor([enc.input_ids])

    print(f"model {lm.name}: {lm.num_layers} layers, prompt of {len(enc)} tokens")
    for threads in ([args.threads] if args.threads else [1, 2]):
        torch.set_num_threads(threads)
        with torch.no_grad():
            t_clean, _ = timed(lambda: lm.model(input_ids=ids), args.repeats * 3)
        print(f"threads={threads}: one clean forward {t_clean * 1e3:.1f} ms")
    torch.set_num_threads(args.threads or 1)

    with torch.no_grad():
        t_clean, out = timed(lambda: lm.model(input_ids=ids), args.repeats * 3)
        target = int(out.logits[0, -1].argmax())
        rows = sweep_rows(lm, enc)
        t_paper, paper = timed(lambda: torch.cat([run(lm, enc, [row], reuse_prefix=False).prob_of(target)
                                                  for row in rows]), 1)
        t_batched, batched = timed(lambda: run(lm, enc, rows, reuse_prefix=False).prob_of(target), args.repeats)
        t_reuse, reused = timed(lambda: run(lm, enc, rows).prob_of(target), args.repeats)
    print(f"sweep of {len(rows)} configurations (threads={torch.get_num_threads()}, best of runs):")
    print(f"  (i)   one full forward per configuration, batch 1 (the paper's way): {t_paper:7.3f} s "
          f"= {t_paper / t_clean:6.1f} clean forwards")
    print(f"  (ii)  batched full forwards:                                       {t_batched:7.3f} s "
          f"= {t_batched / t_clean:6.1f} clean forwards")
    print(f"  (iii) batched with prefix reuse:                                   {t_reuse:7.3f} s "
          f"= {t_reuse / t_clean:6.1f} clean forwards")
    print(f"  speed-up (i)/(iii) = {t_paper / t_reuse:.1f}x, (ii)/(iii) = {t_batched / t_reuse:.1f}x")
    print(f"  max |p(i) - p(iii)| = {(paper - reused).abs().max().item():.2e}, "
          f"max |p(i) - p(ii)| = {(paper - batched).abs().max().item():.2e}")


if __name__ == "__main__":
    main()

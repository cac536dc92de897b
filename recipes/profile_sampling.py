"""Where sampling the statistics corpus spends its time (CPU, SmolLM2): decode steps of one token per row with the
KV cache and `logits_to_keep=1`, as `corpus.sample_ids` runs them, for 32 and 64 rows per step with transformers'
dynamic cache and a static cache; plus the share of the time in matrix products (torch profiler). Greedy steps
from one start token (the sampling itself is not the cost). Tokens per second and the ratio to a clean forward.

    nice -n 10 python recipes/profile_sampling.py [--steps 20] [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import locedit
from locedit.core.engine.run import forward, output_cache

RESULT = Path(__file__).resolve().parent.parent / "data" / "results" / "profile_sampling.txt"


def steps(lm, rows: int, n: int, static: bool) -> float:
    """Tokens per second over `n` cached one-token steps of `rows` rows (after 2 warm-up steps)."""
    ids = torch.full((rows, 1), lm.tokenizer("The")["input_ids"][0])
    cache = None
    if static:
        from transformers import StaticCache

        cache = StaticCache(config=lm.model.config, max_cache_len=n + 4)
    with torch.no_grad():
        for i in range(n + 2):
            if i == 2:
                start = time.perf_counter()
            out = forward(lm, ids, cache=cache, use_cache=True, logits_at=1)
            cache = output_cache(out)
            ids = out.logits[:, -1].argmax(-1, keepdim=True)
    return rows * n / (time.perf_counter() - start)


def mm_share(lm, rows: int) -> float:
    from torch.profiler import ProfilerActivity, profile

    ids = torch.full((rows, 1), 1)
    with torch.no_grad():
        out = forward(lm, ids, use_cache=True, logits_at=1)
        cache = output_cache(out)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                out = forward(lm, ids, cache=cache, use_cache=True, logits_at=1)
                cache = output_cache(out)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = locedit.load("smollm2-135m", validate=False)
    prompt = lm.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        clean = min(_timed(lambda: lm.model(input_ids=prompt)) for _ in range(10))
    import os

    lines = [f"# {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC sampling decode steps, SmolLM2, "
             f"{args.threads} thread(s), {args.steps} steps, load average {os.getloadavg()[0]:.2f}, "
             f"clean forward {clean * 1000:.0f} ms"]
    for rows in (32, 64):
        for static in (False, True):
            rate = steps(lm, rows, args.steps, static)
            lines.append(f"{rows} rows, {'static' if static else 'dynamic'} cache: {rate:6.1f} tok/s = "
                         f"{1 / (rate * clean):.2f} clean forwards per token")
    lines.append(f"share of the step in matrix products (64 rows): {100 * mm_share(lm, 64):.0f}%")
    text = "\n".join(lines)
    print(text)
    if args.record:
        with RESULT.open("a") as f:
            f.write(text + "\n\n")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()

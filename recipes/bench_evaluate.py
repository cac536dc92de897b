"""Wall time per fact of `locedit evaluate` (issue #19: goal <= 10 s per fact with 2 workers) on SmolLM2 (CPU).

Runs `locedit.evaluate` on the first N known curated facts (round-robin over relations, as the CLI does) with ROME
at the default site and every behaviour metric and mechanistic check, `--jobs` worker processes of one thread,
into a fresh directory; prints the wall time per fact, the per-worker parts (edit, verify) and the ratio to a
clean forward of a 10-token prompt timed in the same run, before the workers start.

    OMP_NUM_THREADS=1 python recipes/bench_evaluate.py [--n 10] [--jobs 2] [--record]

`--record` appends the result to data/results/bench_evaluate.txt.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))
from long_run import clean_forward_s  # noqa: E402  (the same 10-token prompt, median of repeats)

RESULT = ROOT / "data" / "results" / "bench_evaluate.txt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()

    import torch

    import locedit
    from locedit.core.datasets import curated_facts
    from locedit.verification.evaluate import evaluate

    torch.set_num_threads(1)
    lm = locedit.load(args.model)
    forward = clean_forward_s(lm, repeats=10)
    with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as out:
        start = time.perf_counter()
        result = evaluate(args.model if args.jobs > 1 else lm, curated_facts(), out, method="rome",
                          n=args.n, jobs=args.jobs, progress=False)
        wall = time.perf_counter() - start
    rows = [line["result"] for line in result.lines if "result" in line]
    edit_s = statistics.mean(r["edit"]["timings"].get("total_s", float("nan")) for r in rows)
    verify_s = statistics.mean(r["seconds"] for r in rows)
    per_fact = wall / max(1, len(rows))
    lines = [f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: python recipes/bench_evaluate.py --n {args.n} "
             f"--jobs {args.jobs}",
             f"model {args.model}, ROME at the default site, every metric and check; {len(rows)} facts evaluated, "
             f"{result.counts.get('errors', 0)} errors; clean 10-token forward {forward * 1000:.0f} ms (median of 10)",
             f"wall {wall:.1f} s = {per_fact:.1f} s per fact with {args.jobs} worker(s) (goal <= 10 s) = "
             f"{per_fact / forward:.0f} clean forwards per fact",
             f"per fact and worker: edit {edit_s:.1f} s, verify {verify_s:.1f} s (the rest: loading the workers, "
             f"prefiltering the known facts)"]
    text = "\n".join(lines)
    print(text)
    if args.record:
        with RESULT.open("a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()

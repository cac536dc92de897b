"""LocFT-BF settings by WILD on the TUNING stream (issue #18 §2): the first N edit requests of
../shared/data/counterfact-val.json (disjoint from the reported cf/zsre streams), edited by an `EditSession`
of batch B with each setting, then scored with `WildEvaluator` (reliability, generalisation, locality, the
long runs' fixed probe set, perplexity drift) against the unedited model. One JSON row per setting goes to
data/results/long_run/locft_sweep.jsonl (a setting already there is skipped); `--report` writes the table.

    OMP_NUM_THREADS=1 python recipes/locft_sweep.py --n 100 --batch 100 \
        --setting '{"layer": 12, "lr": 5e-3, "batch_size": 5, "num_steps": 3}' [--setting ...]
    python recipes/locft_sweep.py --report
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_run import OUT, clean_forward_s, probe_facts, stream  # noqa: E402

ROWS = OUT / "locft_sweep.jsonl"
HEADER = ["# LocFT-BF settings by WILD on the tuning stream (SmolLM2-135M-Instruct, CPU)", "",
          "Written by `python recipes/locft_sweep.py --report` from `locft_sweep.jsonl`. Each row: the first 100 edit "
          "requests of counterfact-val.json (the tuning stream; the reported streams are counterfact-train and zsRE) "
          "edited by one `EditSession` (one breadth-first batch), scored by `WildEvaluator` against the unedited model "
          "(greedy 10 tokens; probes: the long runs' 150 known facts). s/edit is the session's wall time with the "
          "machine's other core busy; × clean fwd divides it by a clean 10-token forward timed in the same run.", ""]


def key(setting: dict, n: int, batch: int) -> str:
    return json.dumps({**setting, "n": n, "batch": batch}, sort_keys=True)


def run(settings: list[dict], n: int, batch: int) -> None:
    import locedit
    from locedit.editing.session import EditSession
    from locedit.verification.wild import WildEvaluator

    lm = locedit.load("smollm2-135m")
    requests = stream("tune")[:n]
    probes = probe_facts(lm, WildEvaluator, OUT)
    cache_path = OUT / "unedited_generations_10.json"
    cached = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    evaluator = WildEvaluator(lm, probes, max_new_tokens=10, unedited=cached)
    done = {json.loads(line)["key"] for line in ROWS.read_text().splitlines()} if ROWS.exists() else set()
    forward_s = clean_forward_s(lm)
    for setting in settings:
        k = key(setting, n, batch)
        if k in done:
            print(f"done already: {k}")
            continue
        hp = {a: b for a, b in setting.items() if a != "layer"}
        work = Path(tempfile.mkdtemp(prefix="locft_sweep_"))
        try:
            session = EditSession(lm, work, method="locft", hparams=hp, layers=[setting["layer"]],
                                  batch_size=batch, checkpoint_every=10 ** 6)
            start = time.perf_counter()
            session.run(requests)
            edit_s = time.perf_counter() - start
            scores = evaluator.score(requests)
            session.revert()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        row = {"key": k, "setting": setting, "n": n, "batch": batch, **scores.to_dict(),
               "s_per_edit": edit_s / n, "forwards_per_edit": edit_s / n / forward_s, "clean_forward_s": forward_s}
        with ROWS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        from locedit.core.results import write_atomic

        write_atomic(cache_path, json.dumps(evaluator.unedited_cache))
        print(json.dumps({a: row[a] for a in ("setting", "batch", "reliability", "generalisation", "locality",
                                              "probe_retention", "perplexity_drift", "s_per_edit",
                                              "forwards_per_edit")}), flush=True)


def report() -> None:
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    lines = ["| layer | lr | mini-batch | epochs | edits / session batch | reliability | generalisation | locality | "
             "probes kept | ppl drift | s/edit | × clean fwd |", "|" + "---|" * 12]
    for r in rows:
        s = r["setting"]
        lines.append(f"| {s['layer']} | {s.get('lr', '')} | {s.get('batch_size', '')} | {s.get('num_steps', '')} | "
                     f"{r['n']} / {r['batch']} | {r['reliability']:.0%} | {r['generalisation']:.0%} | "
                     f"{r['locality']:.0%} | {r['probe_retention']:.0%} | {r['perplexity_drift']:+.1%} | "
                     f"{r['s_per_edit']:.2f} | {r['forwards_per_edit']:.1f} |")
    rule = [r for r in rows if abs(r["perplexity_drift"]) <= 0.05]
    best = max(rule, key=lambda r: r["reliability"]) if rule else None
    text = "\n".join(HEADER + lines + ["", "Rule (fixed before these runs, as in tuning.md): the highest reliability whose "
                                      "perplexity drift is within the issue's 5%: " +
                                      (f"**{json.dumps(best['setting'])}**." if best else "none qualifies.")]) + "\n"
    from locedit.core.results import write_atomic

    write_atomic(OUT / "locft_sweep.md", text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", action="append", default=[], help="JSON: layer, lr, batch_size, num_steps, ...")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--batch", type=int, default=100, help="the session's batch (requests per joint update)")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    if args.report:
        report()
    else:
        run([json.loads(s) for s in args.setting], args.n, args.batch)


if __name__ == "__main__":
    main()

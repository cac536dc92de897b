"""Long sequential editing runs with WILD evaluation at checkpoints (issue #18 §5; docs/sessions.md).

    OMP_NUM_THREADS=1 nice -n 10 python recipes/long_run.py run --method locft --stream cf --edits 1000
    python recipes/long_run.py report          # tables (md + jsonl) and the figure from every run's rows

Streams (from ../shared/data/, disjoint): `tune` = the first 200 records of counterfact-val.json (for choosing
hyper-parameters only), `cf` = the first 1,000 of counterfact-train.json, `zsre` = the usable rows of
zsre_mend_train-1k.json. A run edits its stream with an `EditSession` in `<out>/<name>/session` and, at each
checkpoint (10, 100, 1,000 edits), scores the edits so far with `locedit.verification.wild.WildEvaluator` against
the unedited model; one row per checkpoint goes to `<out>/<name>/rows.jsonl` as it finishes. Run the same command
again to resume (finished checkpoints are kept; the session resumes from its checkpoint).

Probes: facts of ROME's known_1000.json whose subject no stream edits and whose continuation by the unedited model
contains the true target; the first 150 of them, fixed in `<out>/probes.json`. Wall time per edit is the sum of the
session's batch times (no evaluation), and is printed beside a clean 10-token forward timed in the same run."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# ../shared/data of the checkout (a git worktree one level deeper finds it one level up)
DATA = next((p for p in (ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data") if p.is_dir()),
            ROOT.parent / "shared" / "data")
OUT = ROOT / "data" / "results" / "long_run"
CHECKPOINTS = (10, 100, 1000)
PROBES = 150


def stream(name: str):
    """The EditRequests of a stream (see the module docstring)."""
    from locedit.core.datasets import edit_request, read_facts
    from locedit.errors import FactError

    if name == "tune":
        facts = read_facts(DATA / "counterfact-val.json").facts[:200]
    elif name == "cf":
        facts = read_facts(DATA / "counterfact-train.json").facts[:1000]
    elif name == "zsre":
        facts = read_facts(DATA / "zsre_mend_train-1k.json").facts
    else:
        raise SystemExit(f"unknown stream {name!r}: tune, cf or zsre")
    requests = []
    for fact in facts:  # rows whose new target is the true one (or missing) are not edit requests
        try:
            request = edit_request(fact)
        except FactError:
            continue
        if request is not None:
            requests.append(request)
    return requests


def clean_forward_s(lm, repeats: int = 7) -> float:
    """Median wall time of one forward of a 10-token prompt (no edit, no grad)."""
    import torch

    ids = lm.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")["input_ids"][:, :10]
    times = []
    with torch.no_grad():
        lm.model(ids.to(lm.device))
        for _ in range(repeats):
            t = time.perf_counter()
            lm.model(ids.to(lm.device))
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def probe_facts(lm, evaluator_cls, out: Path):
    """The fixed probe set (computed once, then read from `out/probes.json`)."""
    from locedit.core.datasets import read_facts
    from locedit.core.facts import Fact

    path = out / "probes.json"
    if path.exists():
        return [Fact(p["subject"], p["prompt"], p["target"]) for p in json.loads(path.read_text())]
    edited = {r.fact.subject for name in ("tune", "cf", "zsre") for r in stream(name)}
    candidates = [f for f in read_facts(DATA / "known_1000.json").facts if f.subject not in edited]
    known = evaluator_cls(lm, []).known_probes(candidates)[:PROBES]
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"subject": f.subject, "prompt": f.prompt, "target": f.target} for f in known],
                               indent=1))
    return known


def run(args) -> None:
    import locedit
    from locedit.core.store import RunStore
    from locedit.editing.session import EditSession
    from locedit.verification.wild import WildEvaluator

    name = args.name or f"{args.stream}-{args.method}" + ("-alphaedit" if args.nullspace else "")
    out = Path(args.out)
    run_dir = out / name
    lm = locedit.load(args.model)
    requests = stream(args.stream)  # the whole stream: a later, longer run resumes this one
    edits = min(args.edits, len(requests))
    hparams = json.loads(args.hparams) if args.hparams else {}
    if args.nullspace:
        hparams["nullspace"] = True
    probes = probe_facts(lm, WildEvaluator, out)
    cache_path = out / f"unedited_generations_{args.max_new_tokens}.json"  # the unedited model's, once per prompt
    cached = json.loads(cache_path.read_text()) if cache_path.exists() and args.model == "smollm2-135m" else {}
    evaluator = WildEvaluator(lm, probes, max_new_tokens=args.max_new_tokens, unedited=cached)
    rows = RunStore(run_dir / "rows.jsonl", key="checkpoint")
    done = {int(r["checkpoint"]) for r in rows.read()[0]}
    forward_s = clean_forward_s(lm)
    session = EditSession(lm, run_dir / "session", method=args.method, hparams=hparams or None,
                          layers=args.layers, batch_size=args.batch_size, checkpoint_every=args.checkpoint_every,
                          progress=True)
    checkpoints = [c for c in (args.checkpoints or CHECKPOINTS) if c < edits] + [edits]
    for c in sorted(set(checkpoints)):
        report = session.run(requests, limit=c)
        if report.interrupted:
            sys.exit(130)
        if c in done:
            continue
        log, _ = session.log.read()
        edited = [requests[int(r["position"])] for r in log if r["status"] == "edited"]
        batches = {}
        for r in log:
            batches[r["batch_start"]] = r["batch_s"]
        edit_s = sum(batches.values())
        scores = evaluator.score(edited)
        forward_now = clean_forward_s(lm)  # the same machine load as the edits, roughly
        row = {"checkpoint": str(c), "run": name, "stream": args.stream, "method": args.method,
               "nullspace": bool(args.nullspace), "hparams": hparams,
               "params": {k: v for k, v in vars(session.params).items()}, "layers": session.layers,
               "batch_size": session.batch_size, "requests": c, "skipped": c - len(edited),
               **scores.to_dict(), "edit_s": edit_s, "s_per_edit": edit_s / max(1, c),
               "clean_forward_s": forward_s, "clean_forward_s_now": forward_now,
               "forwards_per_edit": edit_s / max(1, c) / forward_s}
        rows.append([row])
        if args.model == "smollm2-135m":
            from locedit.core.results import write_atomic

            write_atomic(cache_path, json.dumps(evaluator.unedited_cache))
        print(json.dumps({k: row.get(k) for k in ("run", "requests", "reliability", "generalisation", "locality",
                                               "probe_retention", "perplexity_drift", "tf_reliability",
                                               "s_per_edit", "forwards_per_edit")}), flush=True)
    session.revert()


COLUMNS = [("edits", "requests", "{}"), ("reliability", "reliability", "{:.1%}"),
           ("generalisation", "generalisation", "{:.1%}"), ("locality", "locality", "{:.1%}"),
           ("loc. strict", "locality_strict", "{:.1%}"),
           ("probes kept", "probe_retention", "{:.1%}"), ("ppl drift", "perplexity_drift", "{:+.1%}"),
           ("TF rel.", "tf_reliability", "{:.1%}"), ("TF gen.", "tf_generalisation", "{:.1%}"),
           ("s/edit", "s_per_edit", "{:.2f}"), ("× clean fwd", "forwards_per_edit", "{:.1f}"),
           ("eval s", "seconds", "{:.0f}")]


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from locedit.core.results import write_atomic

    out = Path(args.out)
    runs = {}
    for path in sorted(out.glob("*/rows.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for r in rows:  # rows written before `locality` compared the answer's tokens: theirs is the strict one
            if "locality_strict" not in r:
                r["locality_strict"], r["locality"] = r["locality"], None
        runs[path.parent.name] = sorted(rows, key=lambda r: int(r["requests"]))
    lines = ["# Long sequential editing runs (WILD evaluation)", "",
             "Written by `python recipes/long_run.py report` from `*/rows.jsonl`; see docs/sessions.md.", ""]
    everything = []
    for name, rows in runs.items():
        r0 = rows[0]
        lines += [f"## {name}", "", f"method {r0['method']}{' + null space (AlphaEdit)' if r0['nullspace'] else ''},"
                  f" layers {r0['layers']}, batch {r0['batch_size']}, hparams given `{json.dumps(r0['hparams'])}`"
                  + (f" (lr {r0['params']['lr']}, mini-batch {r0['params']['batch_size']}, "
                     f"{r0['params']['num_steps']} epochs)" if r0["method"] == "locft" and "params" in r0 else "")
                  + (f" ({r0['note']})" if r0.get("note") else "") + "; "
                  f"clean 10-token forward {r0['clean_forward_s']:.3f} s", "",
                  "| " + " | ".join(c for c, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in rows:
            lines.append("| " + " | ".join("–" if r.get(k) is None else f.format(r[k]) for _, k, f in COLUMNS) + " |")
            everything.append(r)
        lines.append("")
    write_atomic(out / "tables.md", "\n".join(lines))
    write_atomic(out / "tables.jsonl", "".join(json.dumps(r) + "\n" for r in everything))
    metrics = [("reliability", "reliability"), ("generalisation", "generalisation"), ("locality", "locality"),
               ("probe_retention", "probes kept"), ("perplexity_drift", "perplexity drift")]
    goals = {"reliability": 0.9, "generalisation": 0.5, "probe_retention": 0.9, "perplexity_drift": 0.05}  # §5
    streams = [s for s in ("cf", "zsre") if any(rows[0]["stream"] == s for rows in runs.values())]
    fig, grid = plt.subplots(len(streams), len(metrics), figsize=(4 * len(metrics), 3.2 * len(streams)),
                             squeeze=False)
    for axes, stream_name in zip(grid, streams):
        for ax, (key, title) in zip(axes, metrics):
            for name, rows in runs.items():
                if rows[0]["stream"] != stream_name:
                    continue  # the tuning stream is not reported
                xs = [int(r["requests"]) for r in rows if r.get(key) is not None]
                ys = [r[key] for r in rows if r.get(key) is not None]
                ax.plot(xs, ys, marker="o", label=name)
            if key in goals:
                ax.axhline(goals[key], color="grey", linestyle="--", linewidth=0.8)  # the goal
            if key != "perplexity_drift":
                ax.set_ylim(-0.03, 1.03)
            ax.set_xscale("log")
            ax.set_xlabel("sequential edits")
            ax.set_title(f"{stream_name}: {title}")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    print(f"wrote {out / 'tables.md'}, {out / 'tables.jsonl'} and {out / 'curves.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--method", default="locft", choices=["locft", "memit", "rome", "ft"])
    r.add_argument("--nullspace", action="store_true", help="memit: AlphaEdit")
    r.add_argument("--stream", default="cf", choices=["tune", "cf", "zsre"])
    r.add_argument("--edits", type=int, default=1000)
    r.add_argument("--batch-size", type=int, default=None)
    r.add_argument("--checkpoint-every", type=int, default=100)
    r.add_argument("--checkpoints", type=int, nargs="+", default=None,
                   help=f"edit counts at which WILD is measured (default {' '.join(map(str, CHECKPOINTS))}); the "
                        "session's batches end there too")
    r.add_argument("--layers", type=int, nargs="+", default=None)
    r.add_argument("--hparams", default=None, help="JSON object of hyper-parameters")
    r.add_argument("--max-new-tokens", type=int, default=10)
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--name", default=None)
    r.add_argument("--out", default=str(OUT))
    q = sub.add_parser("report")
    q.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()

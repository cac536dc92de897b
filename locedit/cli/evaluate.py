"""`locedit evaluate`: edit each fact of a file alone (or in sequence) and aggregate the verification metrics."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from locedit.cli import common


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="edit each fact of a file alone and aggregate the verification metrics",
                       description="Edit each fact (with a target_new) alone: apply, verify, revert; one JSON "
                                   "line per fact in OUT/results.jsonl (resumable), then aggregate.json, table.md "
                                   "and report.html with bootstrap 95% CIs overall and per relation. Facts the "
                                   "model does not know are skipped and counted. --sequential keeps the edits "
                                   "applied and draws the collapse curve.")
    p.add_argument("--facts", type=Path, required=True,
                   help="fact file with target_new (CounterFact, EasyEdit, plain rows) or 'curated'")
    p.add_argument("--method", default="rome", choices=["rome", "memit", "head", "ft"], help="editing method")
    p.add_argument("--layers", type=common.nonnegative_int, nargs="+", default=None,
                   help="layers to edit (default: located per fact)")
    p.add_argument("--key-position", choices=["subject_last", "carrier"], default=None,
                   help="where the edit keys (default: locate's carrier token; subject_last skips locating when "
                        "--layers is given)")
    common.add_model_args(p)
    p.add_argument("--n", type=common.positive_int, default=None,
                   help="at most N known facts, spread over relations (default: all)")
    p.add_argument("--sequential", action="store_true", help="keep edits applied; measure every --every edits")
    p.add_argument("--every", type=common.positive_int, default=None,
                   help="sequential: measure every K edits (default 10)")
    p.add_argument("--probes", type=common.positive_int, default=None, help="sequential: probe facts (default 20)")
    p.add_argument("--jobs", type=common.positive_int, default=1,
                   help="worker processes, each loading the model (default 1)")
    p.add_argument("--no-mechanism", action="store_true", help="skip the mechanistic checks")
    p.add_argument("--all-facts", action="store_true", help="also edit facts the model does not know")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from locedit.core.results import write_atomic
    from locedit.verification.evaluate import evaluate, table
    from locedit.verification.report import evaluation_report

    fact_file = common.read_fact_file(args.facts)
    for flag, value in (("--every", args.every), ("--probes", args.probes)):
        if value is not None and not args.sequential:
            raise common.UsageError(f"{flag} applies with --sequential")
    every = 10 if args.every is None else args.every
    probes = 20 if args.probes is None else args.probes
    out = common.check_output_dir(args.out, "--out")
    common.check_model_spec(args.model)
    with common.removed_on_failure([out]):
        lm = common.load_model(args)
        start = time.perf_counter()
        result = evaluate(lm, fact_file, out, method=args.method,
                          layers=args.layers, n=args.n, sequential=args.sequential, every=every,
                          probes=probes, jobs=args.jobs, mechanism=not args.no_mechanism,
                          edit_options={"key_position": args.key_position} if args.key_position else None,
                          only_known=not args.all_facts, threads=args.threads, dtype=args.dtype, device=args.device,
                          model_spec=str(args.model))
        figures = {}
        if args.sequential:
            from locedit.verification.plots import collapse_figure

            figures["Collapse curve"] = collapse_figure(result.sequential)
            for p in result.sequential:
                print(f"{p['edits']:5d} edits: edit ES {p['edit_efficacy']}, probe accuracy {p['probe_accuracy']}, "
                      f"perplexity {p['perplexity']:.2f}")
        else:
            from locedit.verification.plots import metrics_figure

            figures["Metrics and mechanistic pass rates"] = metrics_figure(result.aggregate)
            print(table(result.aggregate), end="")
        write_atomic(out / "report.html", evaluation_report(result.aggregate, lm.name, args.method, figures))
    print(f"{result.counts} in {time.perf_counter() - start:.0f} s")
    print(f"report: {(out / 'report.html').resolve()}")
    return 0

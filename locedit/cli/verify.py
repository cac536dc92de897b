"""The `verify` and `evaluate` subcommands of the `locedit` command line (registered by `locedit.cli.main`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from locedit.errors import LoceditError


class UserError(LoceditError):
    """A mistake in the command line or its inputs (a LoceditError, so `locedit.cli.main.main` prints one line and
    exits 2 also when the module runs as `python -m locedit.cli.main`)."""


def add_parsers(sub, model_args) -> None:
    """Add `verify` and `evaluate` to the subparsers `sub`; `model_args(parser)` adds --model/--device/..."""
    ver = sub.add_parser("verify", help="verify a saved edit: behaviour metrics and mechanistic checks, before/after",
                         description="Load a saved edit (locedit edit --out DIR), apply it to --model, measure the "
                                     "behaviour metrics and the mechanistic checks before and after, revert it, "
                                     "print a summary and write verification.json, figures and report.html.")
    ver.add_argument("--edit", type=Path, required=True, help="directory of a saved edit")
    model_args(ver)
    ver.add_argument("--out", type=Path, default=None, help="output directory (default: the edit's directory)")
    ver.add_argument("--paraphrase", action="append", default=None, metavar="PROMPT",
                     help="a paraphrase of the edit prompt (repeatable; default: the fact's dataset record's)")
    ver.add_argument("--neighbor", action="append", default=None, metavar="PROMPT",
                     help="a neighbourhood prompt whose true attribute is the fact's (repeatable)")
    ver.add_argument("--generation-prompt", action="append", default=None, metavar="PROMPT",
                     help="a prompt for the fluency generations (repeatable)")
    ver.add_argument("--no-mechanism", action="store_true", help="skip the mechanistic checks")

    ev = sub.add_parser("evaluate", help="edit each fact of a file alone and aggregate the verification metrics",
                        description="Edit each fact (with a target_new) alone: apply, verify, revert; one JSON "
                                    "line per fact in OUT/results.jsonl (resumable), then aggregate.json, table.md "
                                    "and report.html with bootstrap 95% CIs overall and per relation. Facts the "
                                    "model does not know are skipped and counted. --sequential keeps the edits "
                                    "applied and draws the collapse curve.")
    ev.add_argument("--facts", type=Path, required=True,
                    help="fact file with target_new (CounterFact, EasyEdit, plain rows) or 'curated'")
    ev.add_argument("--method", default="rome", choices=["rome", "memit", "head", "ft"], help="editing method")
    ev.add_argument("--layers", type=int, nargs="+", default=None, help="layers to edit (default: located per fact)")
    ev.add_argument("--key-position", choices=["subject_last", "carrier"], default=None,
                    help="where the edit keys (default: locate's carrier token; subject_last skips locating when "
                         "--layers is given)")
    model_args(ev)
    ev.add_argument("--n", type=int, default=None, help="at most N known facts, spread over relations (default: all)")
    ev.add_argument("--sequential", action="store_true", help="keep edits applied; measure every --every edits")
    ev.add_argument("--every", type=int, default=10, help="sequential: measure every K edits (default 10)")
    ev.add_argument("--probes", type=int, default=20, help="sequential: probe facts (default 20)")
    ev.add_argument("--jobs", type=int, default=1, help="worker processes, each loading the model (default 1)")
    ev.add_argument("--no-mechanism", action="store_true", help="skip the mechanistic checks")
    ev.add_argument("--all-facts", action="store_true", help="also edit facts the model does not know")
    ev.add_argument("--out", type=Path, required=True, help="output directory")


def cmd_verify(args) -> int:
    from locedit.cli.main import _load, _save_figure
    from locedit.editing import load_edit
    from locedit.core.report import write_atomic
    from locedit.verification.report import verification_report
    from locedit.verification.verify import verify

    if not args.edit.exists():
        raise UserError(f"edit directory {str(args.edit)!r} does not exist")
    edit = load_edit(args.edit)
    lm = _load(args)
    edit.apply(lm)  # refuses another model's edit (EditError -> one line, exit 2)
    try:
        ver = verify(lm, edit, paraphrases=args.paraphrase, neighborhood=args.neighbor,
                     generation_prompts=args.generation_prompt, mechanism=not args.no_mechanism)
    finally:
        if edit.is_applied:
            edit.revert()
    out: Path = args.out or args.edit
    out.mkdir(parents=True, exist_ok=True)
    d = ver.to_dict()
    write_atomic(out / "verification.json", json.dumps(d, indent=1))
    _save_figure(ver.plot(), out, "verification")
    report = write_atomic(out / "report.html", verification_report(d))
    print(ver.summary())
    print(f"report: {report.resolve()}")
    return 0


def cmd_evaluate(args) -> int:
    from locedit.core.datasets import curated_facts_path, read_facts
    from locedit.core.report import write_atomic
    from locedit.verification.evaluate import evaluate, table
    from locedit.verification.report import evaluation_report

    path = curated_facts_path() if str(args.facts) == "curated" else args.facts
    fact_file = read_facts(path)
    for error in fact_file.errors:
        print(f"locedit: skipping {path}: {error}", file=sys.stderr)
    if not fact_file.facts:
        raise UserError(f"no usable facts in {path}")
    if args.jobs < 1:
        raise UserError("--jobs must be at least 1")
    import torch

    from locedit.core.loading import load

    torch.set_num_threads(max(1, args.threads))
    print(f"loading {args.model} ...", file=sys.stderr)
    lm = load(args.model, device=args.device, dtype=args.dtype)
    start = time.perf_counter()
    result = evaluate(lm, fact_file, args.out, method=args.method,
                      layers=args.layers, n=args.n, sequential=args.sequential, every=args.every,
                      probes=args.probes, jobs=args.jobs, mechanism=not args.no_mechanism,
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
    write_atomic(args.out / "report.html", evaluation_report(result.aggregate, lm.name, args.method, figures))
    print(f"{result.counts} in {time.perf_counter() - start:.0f} s")
    print(f"report: {(args.out / 'report.html').resolve()}")
    return 0

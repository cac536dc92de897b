"""`locedit locate`: rank the MLP layers and attention heads that retrieve a fact (or each fact of a file)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from locedit.cli import common


def add_parser(sub) -> None:
    p = sub.add_parser("locate", help="rank the MLP layers and attention heads that retrieve a fact",
                       description="Rank where a fact is retrieved (carrier token, MLP enrichment layers, relation "
                                   "window, extraction heads) and write sites.json, figures and report.html.")
    common.add_model_args(p)
    common.add_fact_args(p)
    p.add_argument("--out", type=Path, default=Path("results"), help="output directory (default: results/)")
    p.add_argument("--samples", type=common.positive_int, default=2,
                   help="noise samples for the causal traces (default 2)")
    p.add_argument("--batch-facts", type=common.positive_int, default=None,
                   help="with --facts: facts packed into the same forward passes (default 16 on a GPU, 1 on the "
                        "CPU; results do not depend on it)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    facts = common.facts_from_args(args)
    if args.batch_facts is not None and args.facts is None:
        raise common.UsageError("--batch-facts applies with --facts")
    out = common.check_output_dir(args.out, "--out")
    common.check_model_spec(args.model)
    with common.removed_on_failure([out]):
        lm = common.load_model(args)
        facts = common.keep_known(lm, facts, args)
        if args.facts is None:
            return _one(lm, facts[0], out, args)
        return _dataset(lm, facts, out, args)


def _one(lm, fact, out: Path, args: argparse.Namespace) -> int:
    from locedit.core.report import sitemap_report
    from locedit.core.results import write_atomic
    from locedit.localization.sites import locate

    with common.forward_progress(lm, "locate"):
        sitemap = locate(lm, fact, samples=args.samples)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "sites.json", json.dumps(sitemap.to_dict(), indent=1))
    common.save_figure(sitemap.plot(), out, "sitemap")
    report = write_atomic(out / "report.html", sitemap_report(sitemap, lm.name))
    print(sitemap.summary())
    print(f"report: {report.resolve()}")
    return 0


def _dataset(lm, facts: list, out: Path, args: argparse.Namespace) -> int:
    from locedit.core.plots import heads_table
    from locedit.core.report import dataset_report
    from locedit.core.results import write_atomic
    from locedit.localization.runner import run_dataset
    from locedit.localization.sites import SiteMap, locate

    start = time.perf_counter()
    result = run_dataset(lm, locate, facts, out / "sites.jsonl", options={"samples": args.samples},
                         batch_facts=args.batch_facts)
    dicts = [r["result"] for r in result.results]
    aggregate = SiteMap.aggregate(dicts)
    write_atomic(out / "aggregate.json", json.dumps(aggregate, indent=1))
    figures = {}
    if dicts:
        rows = [{"head": k, "facts": v} for k, v in list(aggregate["top_head"].items())[:15]]
        figures["Heads ranked top most often"] = heads_table(rows, title="Top heads across facts")
    report = write_atomic(out / "report.html", dataset_report(aggregate, lm.name, len(result.errors), figures))
    print(f"{len(dicts)} facts located ({result.skipped} already done, {len(result.errors)} errors) in "
          f"{time.perf_counter() - start:.0f} s; top MLP layers {list(aggregate['top_mlp_layer'].items())[:3]}")
    print(f"report: {report.resolve()}")
    return 0

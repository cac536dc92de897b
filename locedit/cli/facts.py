"""`locedit facts`: list or filter a fact set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from locedit.cli import common


def add_parser(sub) -> None:
    p = sub.add_parser("facts", help="list or filter a fact set (default: locedit's curated set)",
                       description="List facts as a table or JSONL, filtered by relation or by what a model knows.")
    p.add_argument("--file", type=Path, default=None, help="fact file (default: the curated set)")
    p.add_argument("--relation", default=None, help="keep one relation id")
    p.add_argument("--known", action="store_true", help="keep the facts --model gets right (top-1)")
    p.add_argument("--model", default=common.DEFAULT_MODEL,
                   help=f"model for --known (default {common.DEFAULT_MODEL})")
    p.add_argument("--limit", type=common.positive_int, default=None, help="at most N facts")
    p.add_argument("--format", choices=["table", "jsonl"], default="table")
    p.add_argument("--relations", action="store_true", help="print the relations and their counts instead")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from locedit.core.datasets import known_facts

    fact_file = common.read_fact_file(args.file if args.file is not None else Path("curated"), "--file")
    facts = fact_file.facts
    if args.relation:
        facts = [f for f in facts if f.relation == args.relation]
        if not facts:
            relations = sorted({f.relation for f in fact_file.facts if f.relation})
            raise common.UsageError(f"no facts with relation {args.relation!r}; relations: {', '.join(relations)}")
    if args.known:
        from locedit.core.loading import load

        common.check_model_spec(args.model)
        facts = known_facts(load(args.model), facts)
    elif args.model != common.DEFAULT_MODEL:
        raise common.UsageError("--model applies with --known")
    if args.limit:
        facts = facts[: args.limit]
    if args.relations:
        counts: dict[str, int] = {}
        for f in facts:
            counts[f.relation or "-"] = counts.get(f.relation or "-", 0) + 1
        for relation, count in sorted(counts.items()):
            print(f"{relation}\t{count}")
        return 0
    for f in facts:
        if args.format == "jsonl":
            print(json.dumps({"id": f.meta.get("id"), "relation": f.relation, "subject": f.subject,
                              "prompt": f.prompt, "target": f.target, "target_new": f.meta.get("target_new")}))
        else:
            print(f"{f.meta.get('id', '')}\t{f.relation or ''}\t{f.prompt} -> {f.target}")
    print(f"{len(facts)} facts", file=sys.stderr)
    return 0

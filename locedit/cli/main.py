"""The `locedit` command line: locate, analyze, facts, models."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ANALYSES = {
    "knockout": ("locedit.localization.knockout", "attention_knockout"),
    "knockout-map": ("locedit.localization.knockout", "knockout_map"),
    "attribute-rate": ("locedit.localization.attribute_rate", "attribute_rate"),
    "sublayer": ("locedit.localization.sublayer", "sublayer_knockout"),
    "extraction": ("locedit.localization.extraction", "extraction_events"),
    "heads": ("locedit.localization.heads", "head_projection"),
    "head-effects": ("locedit.localization.heads", "head_effects"),
    "patching": ("locedit.localization.patching", "state_patching"),
    "trace": ("locedit.localization.causal_trace", "causal_trace"),
}


class UserError(Exception):
    """A mistake in the command line or its inputs: one line on stderr, exit status 2."""


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="hub id, local directory, .gguf file or alias (default: smollm2-135m, the built-in model)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="default float32")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: fastest measured on a busy 2-core machine, see README)")


def _fact_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("one fact (or --facts FILE)")
    g.add_argument("--subject", help="the subject, as written in the prompt")
    g.add_argument("--prompt", help="the prompt, containing the subject (or '{}' in its place)")
    g.add_argument("--target", default=None,
                   help="the attribute to track (default: the model's own top-1 prediction)")
    g.add_argument("--facts", type=Path, help="a fact file: ROME known_1000, CounterFact or EasyEdit JSON/JSONL, "
                                             "or 'curated' for locedit's own fact set")
    g.add_argument("--limit", type=int, default=None, help="use only the first N facts of --facts")
    g.add_argument("--only-known", action="store_true",
                   help="keep only the facts whose true target is the model's top-1 (the paper's protocol)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locedit", description="Locate, edit and verify factual knowledge in causal language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    loc = sub.add_parser("locate", help="rank the MLP layers and attention heads that retrieve a fact",
                         description="Rank where a fact is retrieved (carrier token, MLP enrichment layers, relation "
                                     "window, extraction heads) and write sites.json, figures and report.html.")
    _model_args(loc)
    _fact_args(loc)
    loc.add_argument("--out", type=Path, default=Path("results"), help="output directory (default: results/)")
    loc.add_argument("--samples", type=int, default=2, help="noise samples for the causal traces (default 2)")
    loc.add_argument("--batch-facts", type=int, default=None,
                     help="with --facts: facts packed into the same forward passes (default 16 on a GPU, 1 on the "
                          "CPU; results do not depend on it)")

    ana = sub.add_parser("analyze", help="run one flow analysis of Geva et al. 2023 (or ROME's causal trace)",
                         description="Run one analysis on a fact or a fact file; writes JSON (JSONL for a file) "
                                     "and figures (PNG and SVG).")
    ana.add_argument("analysis", choices=sorted(ANALYSES), help="which analysis")
    _model_args(ana)
    _fact_args(ana)
    ana.add_argument("--out", type=Path, default=Path("results"), help="output directory (default: results/)")
    ana.add_argument("--batch-facts", type=int, default=None,
                     help="with --facts: facts packed into the same forward passes where the analysis supports it "
                          "(knockout, trace, heads; default 16 on a GPU, 1 on the CPU; results do not depend on it)")
    ana.add_argument("--window", type=int, default=None, help="layer window (knockout: 9, sublayer: 10, trace: 10)")
    ana.add_argument("--projection", choices=["model", "paper"], default=None,
                     help="vocabulary projection: model (final norm + unembedding) or paper (input embeddings)")
    ana.add_argument("--groups", choices=["default", "paper"], default=None,
                     help="knockout position groups: default (position 0 apart) or the paper's")
    ana.add_argument("--kind", choices=["hidden", "mlp", "attn"], default=None, help="trace: which states to restore")
    ana.add_argument("--samples", type=int, default=None, help="trace: noise samples (default 10)")
    ana.add_argument("--mode", choices=["zero", "paper"], default=None, help="sublayer knockout mode")
    ana.add_argument("--paragraphs", type=Path, default=None,
                     help="attribute-rate/sublayer: JSONL or CSV of subject,text paragraphs (default: text the "
                          "model generates about the subject)")

    facts = sub.add_parser("facts", help="list or filter a fact set (default: locedit's curated set)",
                           description="List facts as a table or JSONL, filtered by relation or by what a model knows.")
    facts.add_argument("--file", type=Path, default=None, help="fact file (default: the curated set)")
    facts.add_argument("--relation", default=None, help="keep one relation id")
    facts.add_argument("--known", action="store_true", help="keep the facts --model gets right (top-1)")
    facts.add_argument("--model", default="smollm2-135m", help="model for --known (default smollm2-135m)")
    facts.add_argument("--limit", type=int, default=None, help="at most N facts")
    facts.add_argument("--format", choices=["table", "jsonl"], default="table")
    facts.add_argument("--relations", action="store_true", help="print the relations and their counts instead")

    from locedit.cli.edit import add_parser as _edit_parser
    from locedit.cli.verify import add_parsers as _verification_parsers

    _edit_parser(sub, _model_args, _fact_args)

    _verification_parsers(sub, _model_args)
    sub.add_parser("models", help="list the supported model families and built-in aliases")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from locedit.errors import LoceditError

    try:
        from locedit.cli.verify import cmd_evaluate, cmd_verify

        return {"locate": cmd_locate, "analyze": cmd_analyze, "facts": cmd_facts, "models": cmd_models,
                "verify": cmd_verify, "evaluate": cmd_evaluate, "edit": cmd_edit}[args.command](args)
    except (LoceditError, UserError) as exc:
        print(f"locedit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("locedit: interrupted", file=sys.stderr)
        return 130


# --- helpers -------------------------------------------------------------------------------------------------
def _load(args):
    import torch

    import locedit

    torch.set_num_threads(max(1, args.threads))
    device = args.device
    if device is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under accelerate launch / torchrun
        from accelerate import PartialState

        device = str(PartialState(cpu=not torch.cuda.is_available()).device)
    print(f"loading {args.model} ...", file=sys.stderr)
    return locedit.load(args.model, device=device, dtype=args.dtype)


def _facts(args, lm=None) -> list:
    from locedit.core.datasets import curated_facts_path, known_facts, read_facts
    from locedit.core.facts import Fact

    if args.facts is not None:
        if args.subject or args.prompt:
            raise UserError("give either --facts or --subject/--prompt, not both")
        path = curated_facts_path() if str(args.facts) == "curated" else args.facts
        fact_file = read_facts(path)
        for error in fact_file.errors:
            print(f"locedit: skipping {path}: {error}", file=sys.stderr)
        facts = fact_file.facts[: args.limit] if args.limit else fact_file.facts
        if args.only_known and lm is not None:
            facts = known_facts(lm, facts)
            print(f"{len(facts)} facts the model gets right", file=sys.stderr)
        if not facts:
            raise UserError(f"no usable facts in {path}")
        return facts
    if not args.subject or not args.prompt:
        raise UserError("give --subject and --prompt (or --facts FILE)")
    return [Fact(args.subject, args.prompt, args.target)]


def _save_figure(fig, out: Path, name: str) -> None:
    from locedit.core.plots import save_figure

    save_figure(fig, out / "figures" / name)


# --- commands --------------------------------------------------------------------------------------------------
def cmd_edit(args) -> int:
    from locedit.cli.edit import cmd_edit as run_edit

    return run_edit(args, _load, _facts, UserError)


def cmd_locate(args) -> int:
    from locedit.localization.sites import SiteMap, locate
    from locedit.core.report import dataset_report, sitemap_report, write_atomic

    if args.facts is None:
        facts = _facts(args)  # validate the fact before loading a model
    lm = _load(args)
    if args.facts is not None:
        facts = _facts(args, lm)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    options = {"samples": args.samples}  # a given target is the one tracked, None the top-1 (issue #15)
    if len(facts) == 1 and args.facts is None:
        sitemap = locate(lm, facts[0], **options)
        write_atomic(out / "sites.json", json.dumps(sitemap.to_dict(), indent=1))
        _save_figure(sitemap.plot(), out, "sitemap")
        report = write_atomic(out / "report.html", sitemap_report(sitemap, lm.name))
        print(sitemap.summary())
    else:
        from locedit.localization.runner import run_dataset
        from locedit.core.plots import heads_table

        start = time.perf_counter()
        result = run_dataset(lm, locate, facts, out / "sites.jsonl", options=options,
                             batch_facts=getattr(args, "batch_facts", None))
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


def cmd_analyze(args) -> int:
    import importlib

    from locedit.core.report import write_atomic

    module_name, fn_name = ANALYSES[args.analysis]
    fn = getattr(importlib.import_module(module_name), fn_name)
    if args.facts is None:
        facts = _facts(args)
    lm = _load(args)
    if args.facts is not None:
        facts = _facts(args, lm)
    options = _analysis_options(args, lm)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    name = args.analysis.replace("-", "_")
    if args.facts is None:
        result = fn(lm, facts[0], **options)
        write_atomic(out / f"{name}.json", json.dumps(result.to_dict(), indent=1))
        try:
            _save_figure(result.plot(), out, name)
        except NotImplementedError:
            pass
        print(f"wrote {out / (name + '.json')}")
        return 0
    from locedit.localization.runner import run_dataset

    result = run_dataset(lm, fn, facts, out / f"{name}.jsonl", options=options,
                         batch_facts=getattr(args, "batch_facts", None))
    aggregate = result.aggregate()
    write_atomic(out / f"{name}_aggregate.json", json.dumps(aggregate, indent=1, default=str))
    figure = result.figure(aggregate)
    if figure is not None:  # the paper's figure: mean curves with 95% CIs over facts, next to the JSONL
        from locedit.core.plots import save_figure

        save_figure(figure, out / name)
    print(f"{len(result.results)} facts, {len(result.errors)} errors; wrote {out / (name + '.jsonl')}"
          + (f", {out / (name + '.png')}" if figure is not None else ""))
    return 0


def _analysis_options(args, lm) -> dict:
    options: dict = {}
    if args.window is not None:
        options["window"] = args.window
    if args.projection is not None and args.analysis in ("attribute-rate", "sublayer", "extraction", "heads",
                                                         "patching"):
        options["projection"] = args.projection
    if args.groups is not None and args.analysis == "knockout":
        options["groups"] = args.groups
    if args.kind is not None and args.analysis == "trace":
        options["kind"] = args.kind
    if args.samples is not None and args.analysis == "trace":
        options["samples"] = args.samples
    if args.mode is not None and args.analysis == "sublayer":
        options["mode"] = args.mode
    if args.paragraphs is not None:
        if args.analysis not in ("attribute-rate", "sublayer"):
            raise UserError("--paragraphs only applies to attribute-rate and sublayer")
        from locedit.localization.attributes import load_paragraphs

        options["paragraphs"] = load_paragraphs(args.paragraphs)
    return options


def cmd_facts(args) -> int:
    from locedit.core.datasets import curated_facts_path, known_facts, read_facts

    path = args.file or curated_facts_path()
    fact_file = read_facts(path)
    for error in fact_file.errors:
        print(f"locedit: skipping {path}: {error}", file=sys.stderr)
    facts = fact_file.facts
    if args.relation:
        facts = [f for f in facts if f.relation == args.relation]
        if not facts:
            relations = sorted({f.relation for f in fact_file.facts if f.relation})
            raise UserError(f"no facts with relation {args.relation!r}; relations: {', '.join(relations)}")
    if args.known:
        import locedit

        facts = known_facts(locedit.load(args.model), facts)
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


def cmd_models(args) -> int:
    from locedit.core.adapters import ADAPTERS
    from locedit.core.loading import ALIASES

    print("aliases:")
    for alias, description in ALIASES.items():
        print(f"  {alias}: {description}")
    print("supported families (config.model_type):")
    for adapter in ADAPTERS:
        print(f"  {adapter.family}: {', '.join(adapter.model_types)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

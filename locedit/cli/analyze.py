"""`locedit analyze NAME`: one analysis of the registry (`locedit.localization.registry`) on a fact or a fact
file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from locedit.cli import common
from locedit.localization.registry import CLI_OPTIONS, cli_records, record

# per CLI option of the registry: (flag, add_argument keywords)
OPTION_FLAGS: dict[str, tuple[str, dict]] = {
    "window": ("--window", dict(type=common.positive_int, help="layer window (knockout: 9, sublayer: 10, trace: 10)")),
    "projection": ("--projection", dict(choices=["model", "paper"], help="vocabulary projection: model (final norm "
                                        "+ unembedding) or paper (input embeddings)")),
    "groups": ("--groups", dict(choices=["default", "paper"],
                                help="knockout position groups: default (position 0 apart) or the paper's")),
    "kind": ("--kind", dict(choices=["hidden", "mlp", "attn"], help="trace: which states to restore")),
    "samples": ("--samples", dict(type=common.positive_int, help="trace: noise samples (default 10)")),
    "mode": ("--mode", dict(choices=["zero", "paper"], help="sublayer knockout mode")),
    "paragraphs": ("--paragraphs", dict(type=Path, help="attribute-rate/sublayer: JSONL or CSV of subject,text "
                                        "paragraphs (default: text the model generates about the subject)")),
}
assert set(OPTION_FLAGS) == set(CLI_OPTIONS)


def add_parser(sub) -> None:
    records = cli_records()
    p = sub.add_parser("analyze", help="run one flow analysis of Geva et al. 2023 (or ROME's causal trace)",
                       description="Run one analysis on a fact or a fact file; writes JSON (JSONL for a file) "
                                   "and figures (PNG and SVG). Analyses: "
                                   + "; ".join(f"{r.cli_name}: {r.help}" for r in records) + ".")
    p.add_argument("analysis", choices=[r.cli_name for r in records], help="which analysis")
    common.add_model_args(p)
    common.add_fact_args(p)
    p.add_argument("--out", type=Path, default=Path("results"), help="output directory (default: results/)")
    batched = ", ".join(r.cli_name for r in records if r.batched)
    p.add_argument("--batch-facts", type=common.positive_int, default=None,
                   help=f"with --facts: facts packed into the same forward passes where the analysis supports it "
                        f"({batched}; default 16 on a GPU, 1 on the CPU; results do not depend on it)")
    for option, (flag, kwargs) in OPTION_FLAGS.items():
        users = ", ".join(r.cli_name for r in records if option in r.cli_options)
        p.add_argument(flag, default=None, **{**kwargs, "help": f"{kwargs['help']} [{users}]"})
    p.set_defaults(run=run)


def options_of(args: argparse.Namespace) -> dict:
    """The analysis options given on the command line; UsageError for one the analysis does not take."""
    rec = record(args.analysis)
    options: dict = {}
    for option, (flag, _) in OPTION_FLAGS.items():
        value = getattr(args, option)
        if value is None:
            continue
        if option not in rec.cli_options:
            takers = [r.cli_name for r in cli_records() if option in r.cli_options]
            raise common.UsageError(f"{flag} does not apply to {rec.cli_name} (only to {', '.join(takers)})")
        options[option] = value
    if "paragraphs" in options:
        from locedit.localization.attributes import load_paragraphs

        options["paragraphs"] = load_paragraphs(common.check_input_file(options["paragraphs"], "--paragraphs"))
    return options


def run(args: argparse.Namespace) -> int:
    rec = record(args.analysis)
    fn = rec.load()
    options = options_of(args)
    facts = common.facts_from_args(args)
    if args.batch_facts is not None and (args.facts is None or not rec.batched):
        raise common.UsageError(f"--batch-facts applies with --facts to {', '.join(r.cli_name for r in cli_records() if r.batched)}")
    out = common.check_output_dir(args.out, "--out")
    common.check_model_spec(args.model)
    with common.removed_on_failure([out]):
        lm = common.load_model(args)
        facts = common.keep_known(lm, facts, args)
        common.warn_if_long(lm, facts, rec.cli_name)
        if args.facts is None:
            return _one(lm, rec, fn, facts[0], options, out)
        return _dataset(lm, rec, fn, facts, options, out, args)


def _one(lm, rec, fn, fact, options: dict, out: Path) -> int:
    from locedit.core.results import write_atomic

    with common.forward_progress(lm, rec.cli_name):
        result = fn(lm, fact, **options)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{rec.name}.json", json.dumps(result.to_dict(), indent=1))
    try:
        common.save_figure(result.plot(), out, rec.name)
    except NotImplementedError:
        pass
    print(f"wrote {out / (rec.name + '.json')}")
    return 0


def _dataset(lm, rec, fn, facts: list, options: dict, out: Path, args: argparse.Namespace) -> int:
    from locedit.core.plots import save_figure
    from locedit.core.results import write_atomic
    from locedit.localization.runner import run_dataset

    result = run_dataset(lm, fn, facts, out / f"{rec.name}.jsonl", options=options, batch_facts=args.batch_facts)
    aggregate = result.aggregate()
    write_atomic(out / f"{rec.name}_aggregate.json", json.dumps(aggregate, indent=1, default=str))
    figure = result.figure(aggregate)
    if figure is not None:  # the paper's figure: mean curves with 95% CIs over facts, next to the JSONL
        save_figure(figure, out / rec.name)
    print(f"{len(result.results)} facts, {len(result.errors)} errors; wrote {out / (rec.name + '.jsonl')}"
          + (f", {out / (rec.name + '.png')}" if figure is not None else ""))
    return 0

"""`locedit edit`: edit one fact (or a fact file with MEMIT) and write the edit."""

from __future__ import annotations

import sys
from pathlib import Path

from locedit.editing.api import METHODS


def add_parser(sub, model_args, fact_args) -> None:
    p = sub.add_parser("edit", help="edit a fact where it is retrieved (ROME, MEMIT, AlphaEdit, head edits, FT-L)",
                       description="Edit a fact so the model gives --new-target, at the sites `locate` finds (or "
                                   "--layers / --heads). Prints the sites, p(old)/p(new) and the greedy continuation "
                                   "before and after, and writes the edit (edit.json + edit.safetensors) to --out.")
    model_args(p)
    fact_args(p)
    p.add_argument("--new-target", default=None,
                   help="the new attribute (one fact); with --facts each fact's target_new is used")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="default: the --hparams file's alg_name, else rome (one fact) or memit (--facts)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="edit these layers (default: located)")
    p.add_argument("--heads", nargs="+", default=None, help="head edit: heads as LAYER.HEAD, e.g. 23.4")
    p.add_argument("--key-position", choices=["subject_last", "carrier"], default=None,
                   help="where the key is read (default: as locate recommends)")
    p.add_argument("--nullspace", action="store_true", help="memit: AlphaEdit's null-space projection")
    p.add_argument("--hparams", type=Path, default=None, help="JSON/YAML hyper-parameters of the method")
    p.add_argument("--corpus", default=None, help="text for the key statistics (.txt/.jsonl, or a dataset name); "
                                                  "default: text the model samples itself")
    p.add_argument("--stats-tokens", type=int, default=None, help="tokens for the key statistics (default 10×d_k)")
    p.add_argument("--out", type=Path, default=Path("results/edit"), help="where to write the edit")
    p.add_argument("--save-model", type=Path, default=None, help="also write the edited model as a HF directory")
    p.add_argument("--verify", action="store_true", help="verify the edit and write report.html (locedit verify)")


def cmd_edit(args, load, facts_of, user_error) -> int:
    import locedit

    from locedit.core.facts import EditRequest

    method = args.method  # None: the --hparams file's alg_name, else rome (one fact) or memit (--facts)
    heads = [_head(h, user_error) for h in args.heads] if args.heads else None
    if args.facts is None:
        if not args.new_target or not args.new_target.strip():
            raise user_error("give --new-target, the attribute the edited model should produce")
        facts = [_with_curated_record(f) for f in facts_of(args)]  # validates the fact before the model loads
    if args.hparams is not None and not args.hparams.is_file():
        raise user_error(f"hyper-parameter file not found: {args.hparams}")
    lm = load(args)
    if args.facts is not None:
        facts = facts_of(args, lm)
        targets = [f.meta.get("target_new") for f in facts]
        missing = [f.meta.get("id", i) for i, f in enumerate(facts) if not targets[i]]
        if missing:
            raise user_error(f"facts without target_new (needed to edit a fact file): {missing[:5]}")
    else:
        targets = [args.new_target]
    if args.nullspace and method not in (None, "memit"):
        raise user_error("--nullspace applies to --method memit")
    if args.nullspace:
        method = "memit"  # AlphaEdit
    hparams = _hparams(args, method)
    options = dict(method=method, layers=args.layers, heads=heads, key_position=args.key_position,
                   hparams=hparams, corpus=args.corpus, progress=True)
    before = _readout(lm, facts[0], targets[0])
    requests = [EditRequest(f, t) for f, t in zip(facts, targets)]
    edit = locedit.edit(lm, requests[0] if args.facts is None else requests, **options)
    after = _readout(lm, edit.facts[0], edit.new_targets[0])
    sites = edit.sites
    where = f"heads {sites['heads']}" if edit.method == "head" else f"layer(s) {sites['layers']}"
    print(f"{edit.method} edit of {len(edit.facts)} fact(s) at {where}, key position {sites['key_position']}"
          f"{_source(sites)}; {edit.timings.get('total_s', 0):.1f} s")
    for note in edit.notes:
        print(f"note: {note}")
    fact = edit.facts[0]
    print(f"prompt: {fact.prompt!r}")
    print(f"  p(old {fact.target!r}): {before['p_old']:.4f} -> {after['p_old']:.4f}")
    print(f"  p(new {edit.new_targets[0]!r}): {before['p_new']:.4f} -> {after['p_new']:.4f}")
    print(f"  before: {before['continuation']!r}")
    print(f"  after:  {after['continuation']!r}")
    saved = edit.save(args.out)
    print(f"edit written to {saved.resolve()}")
    if args.save_model is not None:
        locedit.save_model(lm, args.save_model)
        print(f"edited model written to {args.save_model.resolve()}")
    if args.verify:
        from locedit.verification.report import verify_and_report

        verification = verify_and_report(lm, edit, args.out)
        print(verification.summary())
        print(f"report: {(args.out / 'report.html').resolve()}")
    edit.revert()
    return 0


def _with_curated_record(fact):
    """A fact typed on the command line that is in locedit's curated set gets that record's paraphrases,
    neighbourhood and generation prompts (what `--verify` measures); its target stays the user's."""
    from locedit.core.datasets import curated_facts
    from locedit.core.facts import Fact

    for record in curated_facts():
        if record.prompt == fact.prompt:
            print(f"using the paraphrases and neighbours of curated fact {record.meta.get('id')}", file=sys.stderr)
            return Fact(fact.subject, fact.prompt, fact.target, record.relation, dict(record.meta))
    return fact


def _readout(lm, fact, new_target: str) -> dict:
    from locedit.verification.metrics import greedy_generate, target_probs

    old = fact.target_text() or lm.predict(fact)[0].token
    p_old, p_new = target_probs(lm, [(fact.prompt, old), (fact.prompt, new_target)])
    return {"p_old": float(p_old), "p_new": float(p_new),
            "continuation": greedy_generate(lm, [fact.prompt], max_new_tokens=12)[0]}


def _head(text: str, user_error):
    from locedit.core.head import Head
    from locedit.errors import HeadSpecError

    try:
        return Head.parse(text)
    except HeadSpecError:
        raise user_error(f"--heads takes LAYER.HEAD pairs such as 23.4 (or L23H4), not {text!r}") from None


def _hparams(args, method: str | None):
    from locedit.editing.hparams import read_hparams_file

    data = read_hparams_file(args.hparams) if args.hparams is not None else {}
    if args.nullspace:
        data["nullspace"] = True
    if args.stats_tokens is not None and method != "ft":
        data["stats_tokens"] = args.stats_tokens
    return data or None


def _source(sites: dict) -> str:
    if not sites.get("located"):
        return ""
    if sites.get("layer_source") == "measured":
        return " (this model's measured edit layer; see README, \"Does localization inform editing?\")"
    return " (located)"

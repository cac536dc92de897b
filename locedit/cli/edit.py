"""`locedit edit`: edit one fact (or a fact file with MEMIT) and write the edit; `--sequential`: an editing
session over a fact file, resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from locedit.cli import common
from locedit.core.head import Head
from locedit.editing.api import METHODS

# flag -> (argparse dest, the methods it applies to)
METHOD_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "--heads": ("heads", ("head",)),
    "--layers": ("layers", ("rome", "memit", "ft", "locft")),
    "--nullspace": ("nullspace", ("memit",)),
    "--stats-tokens": ("stats_tokens", ("rome", "memit", "head")),
    "--corpus": ("corpus", ("rome", "memit", "head")),
    "--key-position": ("key_position", ("rome", "memit", "head")),
}


def add_parser(sub) -> None:
    p = sub.add_parser("edit", help="edit a fact where it is retrieved (ROME, MEMIT, AlphaEdit, head edits, FT-L)",
                       description="Edit a fact so the model gives --new-target, at the sites `locate` finds (or "
                                   "--layers / --heads). Prints the sites, p(old)/p(new) and the greedy continuation "
                                   "before and after, and writes the edit (edit.json + edit.safetensors) to --out.",
                       epilog="exit status: 0 when the edit was written (with --verify: and the verification "
                              "passed), 1 with --verify when the verification failed, 2 for a user error.")
    common.add_model_args(p)
    common.add_fact_args(p)
    p.add_argument("--new-target", default=None,
                   help="the new attribute (one fact); with --facts each fact's target_new is used")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="default: the --hparams file's alg_name, else rome (one fact) or memit (--facts); with "
                        "--sequential, memit with --nullspace (AlphaEdit)")
    p.add_argument("--layers", type=common.nonnegative_int, nargs="+", default=None,
                   help="edit these layers (default: located; not with --method head)")
    p.add_argument("--heads", type=common.head_spec, nargs="+", default=None,
                   help="--method head only: heads as LAYER.HEAD (23.4) or L23H4 (default: located)")
    p.add_argument("--key-position", choices=["subject_last", "carrier", "last"], default=None,
                   help="where the key is read (default: as locate recommends; not with --method ft); 'last' "
                        "(the prompt's last token) is a control edit that bypasses the subject")
    p.add_argument("--sites", choices=["default", "select"], default="default",
                   help="select: choose the layer per fact by trial edits scored on selection probes (never the "
                        "fact's own paraphrases or neighbours; docs/study.md); default: the calibrated/located site")
    p.add_argument("--select-pool", type=Path, default=None,
                   help="--sites select: a fact file whose known facts give the selection's neighbours and "
                        "relation templates (default: locedit's curated facts)")
    p.add_argument("--nullspace", action="store_true", help="memit: AlphaEdit's null-space projection")
    p.add_argument("--hparams", type=Path, default=None, help="JSON/YAML hyper-parameters of the method")
    p.add_argument("--corpus", default=None, help="text for the key statistics (.txt/.jsonl, or a dataset name); "
                                                  "default: text the model samples itself (not with --method ft)")
    p.add_argument("--stats-tokens", type=common.positive_int, default=None,
                   help="tokens for the key statistics (default 10×d_k; not with --method ft)")
    p.add_argument("--out", type=Path, default=Path("results/edit"), help="where to write the edit")
    p.add_argument("--save-model", type=Path, default=None, help="also write the edited model as a HF directory")
    p.add_argument("--verify", action="store_true",
                   help="verify the edit and write report.html (locedit verify); the exit status is then 0 when "
                        "the verification passed and 1 when it failed (the edit is written either way)")
    g = p.add_argument_group("many edits, one after another (an editing session; docs/sessions.md)")
    g.add_argument("--sequential", action="store_true",
                   help="edit the --facts one batch after another into one model, logging every edit and "
                        "checkpointing to --out; the same command again resumes. Without --method and --hparams: "
                        "MEMIT with the null-space option (AlphaEdit), which kept the most S over the 200-edit "
                        "chains of data/results/study/ (S 83 vs 76 for MEMIT and ROME); an --hparams file "
                        "without alg_name or nullspace keeps that default")
    g.add_argument("--batch-size", type=common.positive_int, default=None,
                   help="--sequential: requests per joint edit (memit and locft: default 100; rome and ft: 1)")
    g.add_argument("--checkpoint-every", type=common.positive_int, default=None,
                   help="--sequential: write a checkpoint every K requests (default 100; also on stop)")
    p.set_defaults(run=run)


def check_method_flags(args: argparse.Namespace, method: str) -> None:
    """UsageError for a flag given that `method` does not use."""
    for flag, (dest, methods) in METHOD_FLAGS.items():
        if getattr(args, dest) not in (None, False) and method not in methods:
            raise common.UsageError(f"{flag} does not apply to --method {method} (only to {', '.join(methods)})")


def run(args: argparse.Namespace) -> int:
    from locedit.core.datasets import edit_request
    from locedit.core.facts import EditRequest

    single = args.facts is None
    if args.sites == "select" and (args.sequential or not single):
        raise common.UsageError("--sites select chooses the site of one fact: give --prompt/--subject, not --facts")
    if args.select_pool is not None and args.sites != "select":
        raise common.UsageError("--select-pool applies only with --sites select")
    if args.sequential:
        if single:
            raise common.UsageError("--sequential edits a fact file one batch after another: give --facts")
        if args.method is None and not _names_method(args.hparams):
            args.nullspace = True  # AlphaEdit: the best of the 200-edit chains (data/results/study/)
    else:
        for flag, value in (("--batch-size", args.batch_size), ("--checkpoint-every", args.checkpoint_every)):
            if value is not None:
                raise common.UsageError(f"{flag} applies only with --sequential")
    method, hparams = _method_and_hparams(args, single)
    check_method_flags(args, method)
    if args.sequential:
        return _run_sequential(args, method, hparams)
    if single:
        if not args.new_target or not args.new_target.strip():
            raise common.UsageError("give --new-target, the attribute the edited model should produce")
        facts = [_with_curated_record(f) for f in common.facts_from_args(args)]
        requests = EditRequest(facts[0], args.new_target)
    else:
        if args.new_target is not None:
            raise common.UsageError("--new-target is for one fact; with --facts each fact's target_new is used")
        facts = common.facts_from_args(args)
        _check_new_targets(facts)
        if method not in ("memit", "locft") and len(facts) > 1:
            raise common.UsageError(f"--method {method} edits one fact at a time; use --method memit or locft for a "
                                    "fact file")
    if args.corpus is not None and Path(args.corpus).suffix.lower() in (".txt", ".jsonl"):
        common.check_input_file(Path(args.corpus), "--corpus")
    out = common.check_output_dir(args.out, "--out")
    outputs = [out]
    if args.save_model is not None:
        outputs.append(common.check_output_dir(args.save_model, "--save-model"))
    common.check_model_spec(args.model)
    with common.removed_on_failure(outputs):
        lm = common.load_model(args)
        if not single:
            facts = common.keep_known(lm, facts, args)
            requests = [edit_request(f) for f in facts]
        return _edit_and_write(lm, requests, method, hparams, args)


def _check_new_targets(facts) -> None:
    """A fact file to edit needs a `target_new` in every row; name the first rows without one."""
    from locedit.core.datasets import edit_request

    missing = [f.meta.get("id", i) for i, f in enumerate(facts) if edit_request(f) is None]
    if missing:
        raise common.UsageError(f"facts without target_new (needed to edit a fact file): {missing[:5]}")


def _method_and_hparams(args: argparse.Namespace, single: bool) -> tuple[str, dict | None]:
    """The method (--method, else the --hparams file's alg_name, else rome for one fact and memit for a file; memit
    with --nullspace) and the hyper-parameters to pass (the file's mapping with --nullspace and --stats-tokens on
    top), read and checked now, before any model loads."""
    from locedit.editing.hparams import read_hparams, read_hparams_file

    data = read_hparams_file(common.check_input_file(args.hparams, "--hparams")) if args.hparams is not None else {}
    method = args.method or ("memit" if args.nullspace else None)
    default = "rome" if single else "memit"
    method = method or read_hparams(None, dict(data) or None, default_method=default, warn=False).method or default
    if args.nullspace:
        data["nullspace"] = True
    if args.stats_tokens is not None:
        data["stats_tokens"] = args.stats_tokens
    if data:
        check_method_flags(args, method)  # a flag that does not apply, before its value is checked
        read_hparams(method, dict(data), default_method=default, warn=False)
    return method, data or None


def _names_method(path: Path | None) -> bool:
    """Whether the --hparams file chooses the method itself (an `alg_name`, or a `nullspace` setting)."""
    if path is None:
        return False
    from locedit.editing.hparams import read_hparams_file

    data = read_hparams_file(common.check_input_file(path, "--hparams"))
    return "alg_name" in data or "nullspace" in data


def compute_edit(lm, requests, **options):
    """The edit of `requests` (one EditRequest, or a list edited jointly), applied to `lm`."""
    import locedit

    return locedit.edit(lm, requests, **options)


def _edit_and_write(lm, requests, method: str, hparams, args: argparse.Namespace) -> int:
    import locedit

    heads = list(args.heads) if args.heads else None
    options = dict(method=method, layers=args.layers, heads=heads, key_position=args.key_position,
                   hparams=hparams, corpus=args.corpus, progress=True)
    if getattr(args, "sites", "default") == "select":
        from locedit.editing.select import Selection

        pool = None
        if args.select_pool is not None:
            from locedit.core.datasets import read_facts

            pool = list(read_facts(common.check_input_file(args.select_pool, "--select-pool")).facts)
        options = {**options, "sites": Selection(pool=pool), "progress": False}
    first = requests[0] if isinstance(requests, list) else requests
    site_given = heads is not None if method == "head" else args.layers is not None
    if not isinstance(requests, list) and "sites" not in options and not site_given and method != "locft":
        # one fact: locate it (the edit's site where the weights have no calibration; the extraction heads that
        # verify reads either way), and say what it found; LocFT-BF's layer never comes from locate
        site_map = locedit.locate(lm, first.fact)
        rank_one, head_edit = site_map.recommendation["rank_one"], site_map.recommendation["head_edit"]
        print(f"located: top MLP layers {rank_one.get('located_layers', rank_one['layers'])}, extraction heads "
              f"{', '.join(str(Head.parse(h)) for h in head_edit['heads'])}")
        options["sites"] = site_map
    before = _readout(lm, first.fact, first.new_target)
    edit = compute_edit(lm, requests, **options)
    try:
        after = _readout(lm, edit.facts[0], edit.new_targets[0])
        sites = edit.sites
        where = f"heads {sites['heads']}" if edit.method == "head" else f"layer(s) {sites['layers']}"
        print(f"{edit.method} edit of {len(edit.facts)} fact(s) at {where}, key position {sites['key_position']}"
              f"{_source(sites)}; {edit.timings.get('total_s', 0):.1f} s")
        for note in edit.notes:
            print(f"note: {note}")
        for i, t in enumerate(sites.get("selection", {}).get("trials", [])):
            mark = "*" if i == sites["selection"]["chosen"] else " "
            print(f" {mark} trial layer {t['layer']} ({t['key_position']}, {t['source']}): S_sel {t['S_sel']:.2f} "
                  f"PS_sel {t['PS_sel']:.2f} NS_sel {t['NS_sel']:.2f} NKL_sel {t['NKL_sel']:.3f}")
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
        status = 0
        if args.verify:
            from locedit.verification.report import verify_and_report

            verification = verify_and_report(lm, edit, args.out)
            print(verification.summary())
            print(f"report: {(args.out / 'report.html').resolve()}")
            status = verification.exit_status
    finally:
        if edit.is_applied:
            edit.revert()
    return status


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


def _source(sites: dict) -> str:
    if sites.get("layer_source") == "selected":
        return f" (selected by {len(sites['selection']['trials'])} trial edits on selection probes)"
    if sites.get("layer_source") == "calibrated":
        return " (the calibrated edit layer of these weights; see docs/calibrate.md)"
    return " (located)" if sites.get("located") else ""


# --- --sequential: an editing session over a fact file (docs/sessions.md) -----------------------------------
NOT_SEQUENTIAL = {"--new-target": "new_target", "--verify": "verify", "--heads": "heads"}


def _run_sequential(args: argparse.Namespace, method: str, hparams: dict | None) -> int:
    """Edit every fact of --facts (its target_new) into the model in batches, logging and checkpointing to --out;
    a run stopped by Ctrl-C (exit 130) or killed continues when the same command is run again."""
    from locedit.core.datasets import edit_request
    from locedit.editing.session import SESSION_METHODS

    for flag, dest in NOT_SEQUENTIAL.items():
        if getattr(args, dest) not in (None, False):
            raise common.UsageError(f"{flag} does not apply with --sequential")
    if method not in SESSION_METHODS:
        raise common.UsageError(f"--sequential edits with {', '.join(SESSION_METHODS)}, not --method {method}")
    if method not in ("memit", "locft") and args.batch_size not in (None, 1):
        raise common.UsageError(f"--method {method} edits one fact at a time: --batch-size must be 1")
    facts = common.facts_from_args(args)
    _check_new_targets(facts)
    out = common.check_output_dir(args.out, "--out")
    if args.save_model is not None:
        common.check_output_dir(args.save_model, "--save-model")
    common.check_model_spec(args.model)
    lm = common.load_model(args)
    facts = common.keep_known(lm, facts, args)
    requests = [edit_request(f) for f in facts]
    return _run_session(lm, requests, method, hparams, args, out)


def _run_session(lm, requests, method: str, hparams: dict | None, args: argparse.Namespace, out) -> int:
    import locedit
    from locedit.editing.session import EditSession

    session = EditSession(lm, out, method=method, hparams=hparams, layers=args.layers,
                          key_position=args.key_position, batch_size=args.batch_size,
                          checkpoint_every=args.checkpoint_every or 100, corpus=args.corpus, progress=True)
    report = session.run(requests)
    print(report.summary())
    print(f"log and checkpoint in {out.resolve()}")
    if report.interrupted:
        print("run the same command again to continue", file=sys.stderr)
        return 130
    if args.save_model is not None:
        locedit.save_model(lm, args.save_model)
        print(f"edited model written to {args.save_model.resolve()}")
    return 0

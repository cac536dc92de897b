"""`locedit verify`: a saved edit (--edit DIR, applied to --model, measured before/after and reverted) or a model
edited by another tool (--base M --edited M2 and the fact); summary, verification.json, figures, report.html, and
an exit status a script can gate on."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from locedit.cli import common

EXIT_STATUS_HELP = ("exit status: 0 when the verification passed (behaviour and every applicable mechanistic "
                    "check), 1 when it failed, 2 for a user error (a missing file, a bad flag, models that do not "
                    "match).")


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="verify an edit: behaviour metrics and mechanistic checks, before/after",
                       description="Verify a saved edit (--edit DIR: applied to --model, measured before and after, "
                                   "reverted) or a model edited by another tool (--base M --edited M2 --subject S "
                                   "--prompt P --new-target T: the tensors that differ and the rank of each change, "
                                   "then behaviour against the base and the mechanistic checks at the changed MLP "
                                   "layers). Prints a summary and writes verification.json, figures and "
                                   "report.html.",
                       epilog=EXIT_STATUS_HELP)
    p.add_argument("--edit", type=Path, default=None, help="directory of a saved edit (locedit edit --out DIR)")
    common.add_model_args(p)
    p.set_defaults(model=None)  # --model is for --edit (default: the built-in model); --base/--edited otherwise
    g = p.add_argument_group("a model edited by another tool (instead of --edit)")
    g.add_argument("--base", default=None, help="the unedited model (hub id, local directory, .gguf or alias)")
    g.add_argument("--edited", default=None, help="the edited model (e.g. a save_pretrained directory)")
    g.add_argument("--subject", default=None, help="the edited fact's subject, as written in the prompt")
    g.add_argument("--prompt", default=None, help="the edited fact's prompt, containing the subject")
    g.add_argument("--target", default=None, help="the old attribute (default: the base model's top-1)")
    g.add_argument("--new-target", default=None, help="the attribute the edited model should give")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: the edit's directory; results/verify with --base)")
    p.add_argument("--paraphrase", action="append", default=None, metavar="PROMPT",
                   help="a paraphrase of the edit prompt (repeatable; default: the fact's dataset record's)")
    p.add_argument("--neighbor", action="append", default=None, metavar="PROMPT",
                   help="a neighbourhood prompt whose true attribute is the fact's (repeatable)")
    p.add_argument("--generation-prompt", action="append", default=None, metavar="PROMPT",
                   help="a prompt for the fluency generations (repeatable)")
    p.add_argument("--no-mechanism", action="store_true", help="skip the mechanistic checks")
    p.set_defaults(run=run)


MODEL_FLAGS = ("base", "edited", "subject", "prompt", "target", "new_target")


def run(args: argparse.Namespace) -> int:
    if args.edit is not None:
        given = [f"--{k.replace('_', '-')}" for k in MODEL_FLAGS if getattr(args, k) is not None]
        if given:
            raise common.UsageError(f"{given[0]} is for --base/--edited; with --edit give the fact's prompts only")
        return _verify_edit(args)
    if args.base is None and args.edited is None:
        raise common.UsageError("give --edit DIR (a saved edit), or --base M --edited M2 with the fact")
    return _verify_models(args)


def _verify_edit(args: argparse.Namespace) -> int:
    from locedit.editing import load_edit
    from locedit.verification.verify import verify

    edit = load_edit(common.check_input_dir(args.edit, "--edit"))
    out = common.check_output_dir(args.out or args.edit, "--out")
    args.model = args.model or common.DEFAULT_MODEL
    common.check_model_spec(args.model)
    with common.removed_on_failure([out]):
        lm = common.load_model(args)
        edit.apply(lm)  # refuses another model's edit (EditError -> one line, exit 2)
        try:
            ver = verify(lm, edit, paraphrases=args.paraphrase, neighborhood=args.neighbor,
                         generation_prompts=args.generation_prompt, mechanism=not args.no_mechanism)
        finally:
            if edit.is_applied:
                edit.revert()
        report = _write(ver, out)
    return _finish(ver, report)


def _verify_models(args: argparse.Namespace) -> int:
    from locedit.core.facts import EditRequest, Fact
    from locedit.verification.verify import request_for_models, verify_models

    if args.model is not None:
        raise common.UsageError("--model is for --edit; give --base (the unedited model) and --edited")
    for flag, value in (("--base", args.base), ("--edited", args.edited), ("--subject", args.subject),
                        ("--prompt", args.prompt), ("--new-target", args.new_target)):
        if value is None or not value.strip():
            raise common.UsageError(f"give {flag} (verifying --base against --edited needs --base, --edited, "
                                    "--subject, --prompt and --new-target)")
    request = EditRequest(Fact(args.subject, args.prompt, args.target), args.new_target)  # FactError: exit 2
    out = common.check_output_dir(args.out or Path("results/verify"), "--out")
    common.check_model_spec(args.base)
    common.check_model_spec(args.edited)
    with common.removed_on_failure([out]):
        base = common.load_model(argparse.Namespace(**{**vars(args), "model": args.base}))
        edited = common.load_model(argparse.Namespace(**{**vars(args), "model": args.edited}))
        request = request_for_models(base, request)
        ver = verify_models(base, edited, request, paraphrases=args.paraphrase, neighborhood=args.neighbor,
                            generation_prompts=args.generation_prompt, mechanism=not args.no_mechanism)
        report = _write(ver, out)
    return _finish(ver, report)


def _write(ver, out: Path) -> Path:
    from locedit.core.results import write_atomic
    from locedit.verification.report import verification_report

    out.mkdir(parents=True, exist_ok=True)
    d = ver.to_dict()
    write_atomic(out / "verification.json", json.dumps(d, indent=1))
    common.save_figure(ver.plot(), out, "verification")
    return write_atomic(out / "report.html", verification_report(d))


def _finish(ver, report: Path) -> int:
    print(ver.summary())
    print(f"report: {report.resolve()}")
    return ver.exit_status

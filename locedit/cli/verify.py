"""`locedit verify`: apply a saved edit, measure behaviour and mechanism before/after, revert, report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from locedit.cli import common


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="verify a saved edit: behaviour metrics and mechanistic checks, before/after",
                       description="Load a saved edit (locedit edit --out DIR), apply it to --model, measure the "
                                   "behaviour metrics and the mechanistic checks before and after, revert it, "
                                   "print a summary and write verification.json, figures and report.html.")
    p.add_argument("--edit", type=Path, required=True, help="directory of a saved edit")
    common.add_model_args(p)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the edit's directory)")
    p.add_argument("--paraphrase", action="append", default=None, metavar="PROMPT",
                   help="a paraphrase of the edit prompt (repeatable; default: the fact's dataset record's)")
    p.add_argument("--neighbor", action="append", default=None, metavar="PROMPT",
                   help="a neighbourhood prompt whose true attribute is the fact's (repeatable)")
    p.add_argument("--generation-prompt", action="append", default=None, metavar="PROMPT",
                   help="a prompt for the fluency generations (repeatable)")
    p.add_argument("--no-mechanism", action="store_true", help="skip the mechanistic checks")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from locedit.core.report import write_atomic
    from locedit.editing import load_edit
    from locedit.verification.report import verification_report
    from locedit.verification.verify import verify

    edit = load_edit(common.check_input_dir(args.edit, "--edit"))
    out = common.check_output_dir(args.out or args.edit, "--out")
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
        out.mkdir(parents=True, exist_ok=True)
        d = ver.to_dict()
        write_atomic(out / "verification.json", json.dumps(d, indent=1))
        common.save_figure(ver.plot(), out, "verification")
        report = write_atomic(out / "report.html", verification_report(d))
    print(ver.summary())
    print(f"report: {report.resolve()}")
    return 0

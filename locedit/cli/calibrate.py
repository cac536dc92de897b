"""`locedit calibrate`: measure where a model edits best (trial edits over layers x key positions) and store the
result as the calibration of its weights; or import a calibration file (--import) for the weights it names."""

from __future__ import annotations

import argparse
from pathlib import Path

from locedit.cli import common


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="measure where a model edits best; later edits of the same weights use it",
                       description="Trial edits on facts the model knows (locedit's curated set, or --facts), over "
                                   "candidate layers (coarse-to-fine unless --layers) and key positions, scored with "
                                   "verify's behaviour metrics on each fact's paraphrases and neighbours. The chosen "
                                   "site per method is stored as the calibration of the model's weights (keyed by "
                                   "their fingerprint, in the locedit cache), which `edit` and `locate` then use. "
                                   "--out DIR gets calibration.json, the resumable trials.jsonl, an EasyEdit YAML per "
                                   "method and a figure. See docs/calibrate.md.")
    common.add_model_args(p)
    p.add_argument("--facts", type=Path, default=None,
                   help="fact file with counterfactual targets (CounterFact / EasyEdit format; default: curated)")
    p.add_argument("--n", type=common.positive_int, default=8, help="facts to calibrate on (default 8)")
    p.add_argument("--methods", default="rome", help="comma-separated: rome, memit, ft (default rome)")
    p.add_argument("--layers", default=None,
                   help="comma-separated candidate layers (default: coarse-to-fine over every layer)")
    p.add_argument("--key-positions", default="subject_last",
                   help="comma-separated: subject_last, carrier (default subject_last)")
    p.add_argument("--budget", type=float, default=None, metavar="MIN",
                   help="minutes after which no new trial edit starts (the stored trials resume later)")
    p.add_argument("--hparams", type=Path, default=None,
                   help="hyper-parameter file (JSON/YAML) for the first method's trial edits")
    p.add_argument("--out", type=Path, default=None, help="output directory (required unless --import)")
    p.add_argument("--import", dest="import_file", type=Path, default=None, metavar="FILE",
                   help="install a calibration JSON (calibration.json of another run) instead of calibrating; it "
                        "must be the calibration of --model's weights")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from locedit.errors import UsageError

    if args.import_file is not None:
        return _import(args)
    if args.out is None:
        raise UsageError("--out DIR is required (where calibration.json and the resumable trials go)")
    out = common.check_output_dir(args.out, "--out")
    common.check_model_spec(args.model)
    facts = common.read_fact_file(args.facts) if args.facts is not None else None
    methods = _names(args.methods)
    layers = None if args.layers is None else _layers(args.layers)
    if args.hparams is not None:
        common.check_input_file(args.hparams, "--hparams")
    from locedit.core.results import write_atomic
    from locedit.editing.calibrate import calibrate
    from locedit.editing.calibration import calibration_path

    with common.removed_on_failure([out]):
        lm = common.load_model(args)
        hparams = {methods[0]: str(args.hparams)} if args.hparams is not None else None
        cal = calibrate(lm, facts, methods=methods, layers=layers, key_positions=_names(args.key_positions),
                        n=args.n, budget=args.budget, out=out, hparams=hparams, progress=True)
        for method in cal.chosen:
            if method in ("rome", "memit") and cal.chosen[method]["key_position"] == "subject_last":
                write_atomic(out / f"easyedit-{method}.yaml", cal.to_easyedit_yaml(method))
        common.save_figure(cal.plot(), out, "calibration")
    print(cal.summary())
    print(f"calibration: {(out / 'calibration.json').resolve()} (installed as {calibration_path(cal.fingerprint)})")
    return 0


def _import(args: argparse.Namespace) -> int:
    from locedit.editing.calibration import install_calibration, load_calibration
    from locedit.editing.fingerprint import weights_fingerprint
    from locedit.errors import UsageError

    cal = load_calibration(common.check_input_file(args.import_file, "--import"))
    common.check_model_spec(args.model)
    lm = common.load_model(args)
    if weights_fingerprint(lm) != cal.fingerprint:
        raise UsageError(f"{args.import_file} is the calibration of other weights ({cal.fingerprint[:12]}), not of "
                         f"{args.model}'s ({weights_fingerprint(lm)[:12]})")
    path = install_calibration(cal)
    print(cal.summary())
    print(f"installed: {path}")
    return 0


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _layers(text: str) -> list[int]:
    from locedit.errors import UsageError

    try:
        return [int(t) for t in _names(text)]
    except ValueError:
        raise UsageError(f"--layers takes comma-separated layer numbers, not {text!r}") from None

"""`locedit edit --facts FILE --sequential`: an editing session over a fact file, resumable (docs/sessions.md)."""

from __future__ import annotations

import argparse
import sys

from locedit.cli import common

NOT_SEQUENTIAL = {"--new-target": "new_target", "--verify": "verify", "--heads": "heads"}


def run_sequential(args: argparse.Namespace, method: str, hparams: dict | None) -> int:
    """Edit every fact of --facts (its target_new) into the model in batches, logging and checkpointing to --out;
    a run stopped by Ctrl-C (exit 130) or killed continues when the same command is run again."""
    from locedit.core.facts import EditRequest
    from locedit.editing.session import SESSION_METHODS

    for flag, dest in NOT_SEQUENTIAL.items():
        if getattr(args, dest) not in (None, False):
            raise common.UsageError(f"{flag} does not apply with --sequential")
    if method not in SESSION_METHODS:
        raise common.UsageError(f"--sequential edits with {', '.join(SESSION_METHODS)}, not --method {method}")
    if method != "memit" and args.batch_size not in (None, 1):
        raise common.UsageError(f"--method {method} edits one fact at a time: --batch-size must be 1")
    facts = common.facts_from_args(args)
    missing = [f.meta.get("id", i) for i, f in enumerate(facts) if not f.meta.get("target_new")]
    if missing:
        raise common.UsageError(f"facts without target_new (needed to edit a fact file): {missing[:5]}")
    out = common.check_output_dir(args.out, "--out")
    if args.save_model is not None:
        common.check_output_dir(args.save_model, "--save-model")
    common.check_model_spec(args.model)
    lm = common.load_model(args)
    facts = common.keep_known(lm, facts, args)
    requests = [EditRequest(f, f.meta["target_new"]) for f in facts]
    return _run(lm, requests, method, hparams, args, out)


def _run(lm, requests, method: str, hparams: dict | None, args: argparse.Namespace, out) -> int:
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

"""The `locedit` command line: builds the parser from one module per verb and runs the chosen one."""

from __future__ import annotations

import argparse
import sys
import warnings

from locedit.cli import analyze, calibrate, edit, evaluate, facts, locate, models, verify

VERBS = (locate, analyze, facts, calibrate, edit, verify, evaluate, models)


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one `locedit: error: ...` line (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"locedit: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="locedit", description="Locate, edit and verify factual knowledge in causal language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit status; usage errors and user errors (any LoceditError) print one
    `locedit: error:` line and return 2."""
    from locedit.errors import LoceditError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # a usage error (one line printed, status 2) or --help (status 0)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return args.run(args)
    except LoceditError as exc:
        print(f"locedit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("locedit: interrupted", file=sys.stderr)
        return 130


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings as one `locedit: warning:` line on stderr (no source line)."""
    print(f"locedit: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

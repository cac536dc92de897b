"""`locedit models`: the supported model families and built-in aliases."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the supported model families and built-in aliases")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from locedit.core.adapters import ADAPTERS
    from locedit.core.loading import ALIASES

    print("aliases:")
    for alias, description in ALIASES.items():
        print(f"  {alias}: {description}")
    print("supported families (config.model_type):")
    for adapter in ADAPTERS:
        print(f"  {adapter.family}: {', '.join(adapter.model_types)}")
    return 0

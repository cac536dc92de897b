"""Paired comparison of two `locedit evaluate` runs on the same facts (e.g. two edit-site policies).

    python recipes/compare_evaluations.py A_DIR B_DIR [--names located default] [--out OUT_DIR]

Reads A_DIR/results.jsonl and B_DIR/results.jsonl, keeps the facts (by id) both edited, and writes, per metric
of `locedit.verification.evaluate.METRICS` (behaviour, generation, fluency/GE, the mechanistic pass rates), the
mean of each run, the mean paired difference B − A with a bootstrap 95% CI, and how many facts each run won.
Outputs OUT_DIR/comparison.{json,md} (default OUT_DIR: B_DIR). A run still in progress compares the facts it has
finished."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from locedit.core.results import write_atomic
from locedit.verification.evaluate import evaluation_lines, paired_comparison


def _ci(c: list) -> str:
    low, high = c
    return "–" if low is None else f"[{low:+.3f}, {high:+.3f}]"


def comparison_table(cmp: dict, name_a: str, name_b: str) -> str:
    lines = [f"Paired over {cmp['n_shared']} facts both runs edited; difference = {name_b} − {name_a}, "
             "bootstrap 95% CI of the per-fact differences.", "",
             f"| metric | n | {name_a} | {name_b} | difference | 95% CI | {name_b} better / {name_a} better |",
             "|---|---|---|---|---|---|---|"]
    for name, m in cmp["metrics"].items():
        lines.append(f"| {name} | {m['n']} | {m['a']:.3f} | {m['b']:.3f} | {m['difference']:+.3f} | "
                     f"{_ci(m['ci95'])} | {m['b_better']} / {m['a_better']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--names", nargs=2, default=None, metavar=("A", "B"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    name_a, name_b = args.names or (args.a.name, args.b.name)
    cmp = paired_comparison(evaluation_lines(args.a), evaluation_lines(args.b))
    cmp.update({"a": str(args.a), "b": str(args.b), "names": [name_a, name_b]})
    out = args.out or args.b
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "comparison.json", json.dumps(cmp, indent=1))
    text = comparison_table(cmp, name_a, name_b)
    write_atomic(out / "comparison.md", text)
    print(text)


if __name__ == "__main__":
    main()

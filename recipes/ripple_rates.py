"""Ripple rates of ROME edits on SmolLM2-135M (RippleEdits, Cohen et al. 2024): logical generalisation, two-hop
composition and relation specificity, from the knowledge table's probes (`locedit.verification.ripple`).

Facts: the TUNING split of data/facts/heldout and the curated set (never the held-out split), those the model knows
(top-1) and whose edit has at least one logical-generalisation or composition probe; `--n` of them (default 20),
taken round-robin over (set, relation) in file order. Each is edited alone with ROME at the default site, verified
(behaviour and ripple probes; `mechanism=False` to spare the CPU) and reverted, by `locedit.verification.evaluate`
into `<out>/results.jsonl` (one row per fact as it finishes; a rerun resumes). Then `<out>/summary.md`: per probe
kind the success rate before and after the edit, per fact (mean and bootstrap 95% CI over facts, evaluate's
aggregate) and pooled over probes, overall and for the facts whose edit succeeded (ES = 1).

Run:  nice -n 10 python recipes/ripple_rates.py [--n 20] [--out data/results/ripple] [--summary-only]
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "data" / "facts" / "heldout" / "facts.jsonl"
CURATED = ROOT / "data" / "facts" / "facts.jsonl"
KINDS = ("logical_generalisation", "composition", "relation_specificity")


def tuning_facts():
    """(set name, Fact) of the held-out set's tuning split, then the curated set."""
    from locedit.core.datasets import read_facts

    splits = {str(json.loads(line)["case_id"]): json.loads(line)["split"]
              for line in HELDOUT.read_text(encoding="utf-8").splitlines() if line.strip()}
    out = [("heldout-tuning", f) for f in read_facts(HELDOUT) if splits[f.meta["id"]] == "tuning"]
    return out + [("curated", f) for f in read_facts(CURATED)]


def with_probes(lm, facts) -> list:
    """The facts the model knows whose edit has a logical-generalisation or composition probe, with ids made
    unique across the two sets."""
    from dataclasses import replace

    from locedit.core.datasets import edit_request, known_facts
    from locedit.verification.ripple import probes_for

    keep = []
    for name, fact in facts:
        request = edit_request(fact)
        if request is None:
            continue
        probes, _ = probes_for(fact, request.new_target)
        if any(p.kind in ("logical_generalisation", "composition") for p in probes):
            keep.append((name, replace(fact, meta={**fact.meta, "id": f"{name}:{fact.meta['id']}"})))
    known = {id(f) for f in known_facts(lm, [f for _, f in keep], progress=False)}
    return [(name, f) for name, f in keep if id(f) in known]


def spread(items: list, n: int) -> list:
    """Round-robin over (set, relation) groups, in file order within each."""
    groups: dict[tuple, list] = defaultdict(list)
    for name, fact in items:
        groups[name, fact.relation].append(fact)
    order, out = list(groups.values()), []
    while len(out) < n and any(order):
        for g in order:
            if g and len(out) < n:
                out.append(g.pop(0))
    return out


def pooled(rows: list[dict], only_success: bool) -> dict:
    """Per kind: pooled probe successes before and after, over the rows' probes."""
    out = {}
    for kind in KINDS:
        probes = [p for r in rows if "result" in r and (not only_success or r["result"]["behaviour"]["efficacy_score"]
                                                         == 1.0)
                  for p in (r["result"].get("ripple") or {}).get("probes", []) if p["kind"] == kind]
        out[kind] = {"n": len(probes), "before": sum(p["success_before"] for p in probes),
                     "after": sum(p["success_after"] for p in probes)}
    return out


def mark_second_hops(lm, rows: list[dict]) -> None:
    """Set `second_hop_known` on every logical-generalisation and composition probe of the rows (rows written
    before `measure` recorded it get it here): does the unedited model prefer z to z0 on the table's prompt for
    (o*, r', z)? `lm` must be the unedited model."""
    from locedit import Fact
    from locedit.verification.ripple import RippleProbe, probes_for, score

    todo = []
    for line in rows:
        if "result" not in line:
            continue
        f = line["fact"]
        fact = Fact(f["subject"], f["prompt"], f["target"], f["relation"], f.get("meta") or {})
        hops = {p.prompt: p.second_hop for p in probes_for(fact, line["result"]["facts"][0]["new_target"])[0]}
        for p in (line["result"].get("ripple") or {}).get("probes", []):
            if p["kind"] in ("logical_generalisation", "composition") and hops.get(p["prompt"]):
                todo.append((p, RippleProbe(p["kind"], hops[p["prompt"]], p["expected"], tuple(p["alternatives"]))))
    for (p, _), s in zip(todo, score(lm, [h for _, h in todo])):
        p["second_hop_known"] = s["success"]


def summary(out: Path, agg: dict, rows: list[dict], n_asked: int) -> str:
    o = agg["overall"]
    lines = ["# Ripple rates of ROME edits on SmolLM2-135M", "",
             f"Recipe: `nice -n 10 python recipes/ripple_rates.py --n {n_asked} --out {out.relative_to(ROOT)}` "
             "(facts: the held-out set's tuning split and the curated set; ROME at the default site; one edit at "
             "a time). A probe succeeds when P(expected) > P(each alternative), whole-string.", "",
             f"Edits: {agg['n']} (errors {agg['errors']}); ES {o['efficacy_score']['mean']:.2f}, "
             f"PS {o.get('paraphrase_score', {}).get('mean', float('nan')):.2f}, "
             f"NS {o.get('neighborhood_score', {}).get('mean', float('nan')):.2f}.", "",
             "| probes | facts with probes | per-fact rate before | per-fact rate after (95% CI) |",
             "|---|---:|---:|---|"]
    for kind in KINDS:
        a, b = o.get(f"ripple_{kind}"), o.get(f"ripple_{kind}_before")
        if a is None:
            lines.append(f"| {kind.replace('_', ' ')} | 0 | - | - |")
            continue
        lines.append(f"| {kind.replace('_', ' ')} | {a['n']} | {b['mean']:.2f} | {a['mean']:.2f} "
                     f"[{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}] |")
    for title, only in (("all edits", False), ("edits with ES = 1", True)):
        p = pooled(rows, only)
        lines += ["", f"Pooled over probes, {title}: " + "; ".join(
            f"{k.replace('_', ' ')} {v['before']}/{v['n']} before -> {v['after']}/{v['n']} after"
            for k, v in p.items()) + "."]
    known = [p for r in rows if "result" in r for p in (r["result"].get("ripple") or {}).get("probes", [])
             if p.get("second_hop_known")]
    lines += ["", "Logical-generalisation and composition probes whose second hop the unedited model knows (it "
              "prefers z to z0 on the table's prompt for (o*, r', z)): " + "; ".join(
                  f"{k.replace('_', ' ')} {sum(p['success_before'] for p in known if p['kind'] == k)}/"
                  f"{sum(p['kind'] == k for p in known)} before -> "
                  f"{sum(p['success_after'] for p in known if p['kind'] == k)}/{sum(p['kind'] == k for p in known)} "
                  "after" for k in KINDS[:2]) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "results" / "ripple")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--summary-only", action="store_true",
                        help="only summarise the rows already in <out>/results.jsonl (an unfinished run)")
    args = parser.parse_args(argv)
    if args.summary_only:
        from locedit.verification.evaluate import aggregate, evaluation_lines

        import locedit

        lines = evaluation_lines(args.out)
        mark_second_hops(locedit.load(args.model), lines)
        text = summary(args.out.resolve(), aggregate(lines), lines, args.n)
        (args.out / "summary.md").write_text(text, encoding="utf-8")
        print(text)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    import locedit
    from locedit.verification.evaluate import evaluate

    torch.set_num_threads(1)
    lm = locedit.load(args.model)
    facts = spread(with_probes(lm, tuning_facts()), args.n)
    print(f"{len(facts)} facts with probes: " + ", ".join(f.meta["id"] for f in facts))
    ev = evaluate(lm, facts, args.out, method="rome", mechanism=False, only_known=False)
    mark_second_hops(lm, ev.lines)
    text = summary(args.out.resolve(), ev.aggregate, ev.lines, args.n)
    (args.out / "summary.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Key consistency (issue #16 §3): does tokenizing ROME's templated prompts with the bare prompt's own tokens
(`template_tokens="prompt"`) edit better than tokenizing the joined text (`"text"`, ROME's way)? TUNING facts only.

    nice -n 10 python recipes/key_tokens.py [--n 16] [--layer 1] [--stop-at 01:05] [--summary-only]

Facts: the tuning split of `data/facts/heldout/facts.jsonl`, in sha256(fact id) order (not chosen by any result),
first `--n`. Each fact is edited with ROME (default hyper-parameters, subject-last key, at `--layer`: SmolLM2's
calibrated layer) once per `template_tokens` choice, measured (`locedit.study.measure`) and reverted. Resumable:
one row per (fact, choice) in `data/results/key_tokens/rows.jsonl`; `summary.{json,md}` hold the mean per choice
and the paired differences prompt − text (bootstrap 95% CI), for all facts and for those whose prompt starts with
the subject (where the two tokenizations give the subject different tokens on a tokenizer without BOS).

Decision rule (written before any row existed): the default becomes "prompt" only if its paired ΔS over all facts
is positive with a CI whose lower end is ≥ 0; otherwise it stays "text" (ROME's tokenization).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "results" / "key_tokens"
FACTS = ROOT / "data" / "facts" / "heldout" / "facts.jsonl"
CHOICES = ("text", "prompt")
METRICS = ("S", "ES", "PS", "NS", "NKL", "gen_efficacy")


def tuning_facts(n: int) -> list:
    from locedit.core.datasets import read_facts
    from locedit.study.split import fact_hash

    splits = [json.loads(line)["split"] for line in FACTS.read_text().splitlines() if line.strip()]
    facts = [f for f, split in zip(read_facts(FACTS).facts, splits) if split == "tuning"]
    return sorted(facts, key=lambda f: fact_hash(f.meta["id"]))[:n]


def summary(rows: dict, facts: list) -> dict:
    from locedit.core.statistics import bootstrap_mean, paired_difference

    out: dict = {"n_facts": len(facts), "choices": {}, "paired": {}}
    groups = {"all": facts, "subject_first": [f for f in facts if f.prompt.startswith(f.subject)],
              "subject_later": [f for f in facts if not f.prompt.startswith(f.subject)]}
    for choice in CHOICES:
        per = [rows.get(f"{f.meta['id']}|{choice}") for f in facts]
        out["choices"][choice] = {m: bootstrap_mean([r[m] for r in per if r is not None])._asdict()
                                  for m in METRICS}
    for name, group in groups.items():
        out["paired"][name] = {}
        for m in METRICS:
            a = {f.meta["id"]: rows[f"{f.meta['id']}|prompt"][m] for f in group if f"{f.meta['id']}|prompt" in rows}
            b = {f.meta["id"]: rows[f"{f.meta['id']}|text"][m] for f in group if f"{f.meta['id']}|text" in rows}
            out["paired"][name][m] = paired_difference(a, b)
    return out


def markdown(s: dict, command: str) -> str:
    def ci(d: dict, scale: float) -> str:
        if d.get("mean") is None:
            return "—"
        lo, hi = d.get("low"), d.get("high")
        body = f"{d['mean'] * scale:+.1f}" if "n" in d else f"{d['mean'] * scale:.1f}"
        return body + ("" if lo is None else f" [{lo * scale:+.1f}, {hi * scale:+.1f}]")

    lines = ["# Key consistency: template_tokens 'prompt' vs 'text' (tuning facts)", "", f"    {command}", "",
             "| choice | S | ES | PS | NS | NKL | gen. efficacy |", "|---|---|---|---|---|---|---|"]
    for c, m in s["choices"].items():
        lines.append(f"| {c} | " + " | ".join(ci(m[k], 1 if k == "NKL" else 100) for k in METRICS) + " |")
    lines += ["", "Paired prompt − text (pp; NKL in nats), 95% bootstrap CI; wins/ties/losses in S:", "",
              "| facts | n | ΔS | ΔES | ΔPS | ΔNS | ΔNKL | Δgen | S w/t/l |", "|---|---|---|---|---|---|---|---|---|"]
    for g, m in s["paired"].items():
        wtl = "/".join(str(m["S"].get(k, "")) for k in ("wins", "ties", "losses"))
        lines.append(f"| {g} | {m['S']['n']} | " + " | ".join(ci(m[k], 1 if k == "NKL" else 100) for k in METRICS)
                     + f" | {wtl} |")
    lines += ["", f"Default by the rule in the recipe's docstring: **{s.get('default')}**."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--stop-at", default=None, help="HH:MM (UTC): start no new fact after it")
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args(argv)
    from locedit.core.store import RunStore

    OUT.mkdir(parents=True, exist_ok=True)
    store = RunStore(OUT / "rows.jsonl", key="key")
    rows = dict(store.latest())
    facts = tuning_facts(args.n)
    if not args.summary_only:
        import locedit
        from locedit.core.facts import EditRequest
        from locedit.study.measure import edit_metrics, snapshot

        lm = locedit.load("smollm2-135m")
        for fact in facts:
            if args.stop_at and datetime.utcnow().strftime("%H:%M") >= args.stop_at:
                print("stop time reached", file=sys.stderr)
                break
            before = None
            for choice in CHOICES:
                key = f"{fact.meta['id']}|{choice}"
                if key in rows:
                    continue
                before = before or snapshot(lm, fact)
                t0 = time.perf_counter()
                e = locedit.edit(lm, EditRequest(fact, " " + fact.meta["target_new"].strip()), layers=[args.layer],
                                 key_position="subject_last", hparams={"template_tokens": choice})
                seconds = time.perf_counter() - t0
                try:
                    m = edit_metrics(fact, before, snapshot(lm, fact))
                finally:
                    e.revert()
                row = {"key": key, "fact": fact.meta["id"], "choice": choice, "layer": args.layer,
                       "subject_first": fact.prompt.startswith(fact.subject), "edit_s": seconds, "t": time.time(),
                       **{k: v for k, v in m.items() if k != "generation"}}
                store.append(row)
                rows[key] = row
                print(f"{key} S={m['S']:.2f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    s = summary(rows, facts)
    d = s["paired"]["all"]["S"]
    s["default"] = "prompt" if d["mean"] is not None and d["mean"] > 0 and (d["low"] or 0) >= 0 else "text"
    command = "python recipes/key_tokens.py " + " ".join(argv if argv is not None else sys.argv[1:])
    s["command"] = command
    (OUT / "summary.json").write_text(json.dumps(s, indent=1, default=str) + "\n")
    (OUT / "summary.md").write_text(markdown(s, command))
    print(markdown(s, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

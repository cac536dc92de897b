"""Key consistency (issue #16 §3): does tokenizing ROME's templated prompts with the bare prompt's own tokens
(`template_tokens="prompt"`) edit better than tokenizing the joined text (`"text"`, ROME's way)? TUNING facts only.

    nice -n 10 python recipes/key_tokens.py [--n 16] [--layer 1] [--stop-at 01:05] [--summary-only]

Facts: the tuning split of `data/facts/heldout/facts.jsonl`, in sha256(fact id) order (not chosen by any result),
first `--n`. Each fact is edited with ROME (default hyper-parameters, subject-last key, at `--layer`: SmolLM2's
calibrated layer) once per `template_tokens` choice, measured (`locedit.study.measure`) and reverted. Resumable:
one row per (fact, choice) in `data/results/key_tokens/rows.jsonl`; `summary.{json,md}` hold the mean per choice
and the paired differences prompt − text (bootstrap 95% CI), for all facts and for those whose prompt starts with
the subject (where the two tokenizations give the subject different tokens on a tokenizer without BOS).

`--keys` (forwards only, no edit; every tuning fact): at `--layer`, the cosine between the bare prompt's key and
ROME's template-averaged key k*, and the share of the change written at k* that the bare prompt's key receives,
(k_bareᵀC⁻¹k*)/(k*ᵀC⁻¹k*) (1 = all of δ reaches the bare prompt), per choice: `keys.jsonl` and `keys` in the summary.

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

import numpy as np

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


def key_geometry(lm, fact, layer: int, choice: str, C) -> dict:
    """Cosine(k_bare, k*) and the reach ratio of k_bare for ROME's templates tokenized by `choice`."""
    import torch

    from locedit.editing.hparams import read_hparams
    from locedit.editing.layer_predictor import reach_ratio
    from locedit.editing.templates import context_templates
    from locedit.editing.values import pad_rows, templated_prompts

    hp = read_hparams("rome", None).params
    templates = context_templates(lm, hp.context_template_length_params, hp.seed)
    rows, keys, _ = templated_prompts(lm, fact, templates, "subject_last", None, choice)
    ids, mask = pad_rows(lm, rows)
    got = {}
    module = lm.adapter.layer_part(lm.model, layer, lm.adapter.mlp_down)
    hook = module.register_forward_pre_hook(
        lambda m, a: got.__setitem__("k", a[0][torch.arange(len(rows)), torch.tensor(keys)].float()))
    try:
        with torch.no_grad():
            lm.model(input_ids=ids, attention_mask=mask)
    finally:
        hook.remove()
    k_bare, k_star = got["k"][0], got["k"].mean(0)
    return {"cos": float(torch.nn.functional.cosine_similarity(k_bare, k_star, dim=0)),
            "share": float(reach_ratio(C, k_star, k_bare[None])[0])}


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


def key_summary(key_rows: dict) -> dict:
    """Mean [CI] of cos and share per choice, for all facts and those whose prompt starts with the subject."""
    from locedit.core.statistics import bootstrap_mean, paired_difference

    out: dict = {}
    for group, keep in (("all", lambda r: True), ("subject_first", lambda r: r["subject_first"]),
                        ("subject_later", lambda r: not r["subject_first"])):
        for choice in CHOICES:
            rs = [r for r in key_rows.values() if r["choice"] == choice and keep(r)]
            out[f"{group}|{choice}"] = {"n": len(rs), "cos": bootstrap_mean([r["cos"] for r in rs])._asdict(),
                                        "share": bootstrap_mean([r["share"] for r in rs])._asdict(),
                                        "share_below_half": float(np.mean([r["share"] < 0.5 for r in rs]))
                                        if rs else None}
        pairs = {c: {r["fact"]: r for r in key_rows.values() if r["choice"] == c and keep(r)} for c in CHOICES}
        for m in ("cos", "share"):
            out[f"{group}|prompt − text|{m}"] = paired_difference({f: r[m] for f, r in pairs["prompt"].items()},
                                                                  {f: r[m] for f, r in pairs["text"].items()})
    return out


def markdown(s: dict, command: str) -> str:
    def ci(d: dict, scale: float) -> str:
        if d.get("mean") is None:
            return "—"
        lo, hi = d.get("low"), d.get("high")
        f = ("{:+" if "n" in d else "{:") + (".1f}" if scale != 1 else ".3f}")
        interval = "" if lo is None else f" [{f.format(lo * scale)}, {f.format(hi * scale)}]"
        return f.format(d["mean"] * scale) + interval

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
    if s.get("keys"):
        lines += ["", "Key geometry (forwards only, tuning facts): cos(k_bare, k*) and the share of δ that "
                  "reaches the bare prompt's key, (k_bareᵀC⁻¹k*)/(k*ᵀC⁻¹k*):", "",
                  "| facts | choice | n | cos | share | share < 0.5 |", "|---|---|---|---|---|---|"]
        for name, k in s["keys"].items():
            if name.count("|") == 2:
                continue
            if k["n"]:
                g, c = name.split("|")
                lines.append(f"| {g} | {c} | {k['n']} | {ci(k['cos'], 1)} | {ci(k['share'], 1)} | "
                             f"{100 * k['share_below_half']:.0f}% |")
    if s.get("keys"):
        lines += ["", "Paired prompt − text over the same facts:", "", "| facts | n | Δcos | Δshare | share w/t/l |",
                  "|---|---|---|---|---|"]
        for g in ("all", "subject_first", "subject_later"):
            c, sh = s["keys"].get(f"{g}|prompt − text|cos"), s["keys"].get(f"{g}|prompt − text|share")
            if c and c["n"]:
                wtl = f"{sh['wins']}/{sh['ties']}/{sh['losses']}"
                lines.append(f"| {g} | {c['n']} | {ci(c, 1)} | {ci(sh, 1)} | {wtl} |")
    lines += ["", f"Default by the rule in the recipe's docstring: **{s.get('default')}**."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--stop-at", default=None, help="HH:MM (UTC): start no new fact after it")
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--keys", action="store_true", help="the forwards-only key geometry of every tuning fact")
    args = ap.parse_args(argv)
    from locedit.core.store import RunStore

    OUT.mkdir(parents=True, exist_ok=True)
    store = RunStore(OUT / "rows.jsonl", key="key")
    rows = dict(store.latest())
    facts = tuning_facts(args.n)
    key_store = RunStore(OUT / "keys.jsonl", key="key")
    key_rows = dict(key_store.latest())
    if args.keys:
        import locedit
        from locedit.editing.stats import key_statistics

        lm = locedit.load("smollm2-135m")
        C = key_statistics(lm, layers=[args.layer], kinds=("mlp",), progress=False).get("mlp", args.layer)
        for fact in tuning_facts(10 ** 6):
            for choice in CHOICES:
                key = f"{fact.meta['id']}|{choice}|L{args.layer}"
                if key not in key_rows:
                    row = {"key": key, "fact": fact.meta["id"], "choice": choice, "layer": args.layer,
                           "subject_first": fact.prompt.startswith(fact.subject),
                           **key_geometry(lm, fact, args.layer, choice, C)}
                    key_store.append(row)
                    key_rows[key] = row
    if not args.summary_only and not args.keys:
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
    s["keys"] = key_summary(key_rows)
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

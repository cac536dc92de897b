"""The site study on the NEW held-out split (issue #16 §5): calibrated fixed layer vs located, predictor, per-fact
selection, random layer and a dense oracle, ROME on SmolLM2-135M.

    nice -n 10 python recipes/study_heldout.py [--facts 40] [--oracle-facts 4] [--random-every 1]
        [--template-tokens text]
        [--stop-at 02:00] [--summary-only]

Facts: the `heldout` split of `data/facts/heldout/facts.jsonl` in sha256(fact id) order (`locedit.study.split.
fact_hash`; chosen by hash, never by a result): the first `--facts`. A larger `--facts` resumes and extends the
run, up to the whole split (398). Per fact, every site a policy needs is edited once with ROME (default
hyper-parameters, `template_tokens` as given), measured and reverted; a site shared by several policies is one
edit. Each edit row carries both the evaluation metrics (`locedit.study.measure`: ES, PS, NS, S, NKL, generation
efficacy; plus NS+ = NS on the neighbourhood prompts after "prompt new.") and the selection-probe scores
(`locedit.editing.select`), which are never computed on the evaluation's prompts.

Policies: `fixed` (SmolLM2's calibrated site: layer 1, subject-last key), `located` (locate's top MLP layer,
carrier key), `predictor` (the layer ROME's closed-form neighbour leak ranks first, on the selection probes,
subject-last key), `selection` (`sites="select"`'s rule: the shortlist's trial with the best selection score),
`random` (a layer per fact seeded by its id, carrier key), and, on the first `--oracle-facts`, `oracle` (the best
of layers 0-8 then every 3rd, subject-last key, chosen on the evaluation itself: an upper bound).
Cost per policy: seconds and clean-forward equivalents (each fact's clean forward of its prompt is timed in the same
run). Rows: `data/results/study_heldout/rows.jsonl` (resumable); `summary.{json,md}`.
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
OUT = ROOT / "data" / "results" / "study_heldout"
FACTS = ROOT / "data" / "facts" / "heldout" / "facts.jsonl"
METRICS = ("S", "ES", "PS", "NS", "NS_plus", "NKL", "gen_efficacy")
POLICIES = ("fixed", "located", "predictor", "selection", "random", "oracle")


def all_facts() -> tuple[list, list]:
    """(held-out facts in sha256 order, every fact of the file: the selection pool)."""
    from locedit.core.datasets import read_facts
    from locedit.study.split import fact_hash

    splits = [json.loads(line)["split"] for line in FACTS.read_text().splitlines() if line.strip()]
    facts = list(read_facts(FACTS).facts)
    held = [f for f, s in zip(facts, splits) if s == "heldout"]
    return sorted(held, key=lambda f: fact_hash(f.meta["id"])), facts


def oracle_layers(num_layers: int) -> list[int]:
    return sorted(set(range(min(9, num_layers))) | set(range(8, num_layers, 3)))


def site_key(fid: str, layer: int, key: str, tokens: str) -> str:
    return f"site|{fid}|L{layer}|{key}|{tokens}"


# --- measuring ---------------------------------------------------------------------------------------------------
def ns_plus(lm, fact) -> np.ndarray:
    from locedit.study.measure import probe_inputs
    from locedit.verification.metrics import continuation, target_probs

    p = probe_inputs(fact)
    pairs = [(x, continuation(x, t)) for x in p.prefixed for t in (p.true, p.new)]
    return np.asarray(target_probs(lm, pairs), dtype=float).reshape(-1, 2)


def clean_forward_seconds(lm, fact, repeats: int = 5) -> float:
    import torch

    ids = lm.tokenizer(fact.prompt, return_tensors="pt")["input_ids"].to(lm.device)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            lm.model(input_ids=ids)
            times.append(time.perf_counter() - t0)
    return float(min(times))  # the least-contended of the repeats (a shared CPU)


class FactRun:
    """Everything measured around one fact: the unedited snapshots, selection probes, locate, predictor."""

    def __init__(self, lm, fact, pool, stats, tokens: str) -> None:
        from locedit.core.facts import EditRequest
        from locedit.editing.select import probe_snapshot, selection_probes
        from locedit.study.measure import snapshot

        self.lm, self.fact, self.stats, self.tokens = lm, fact, stats, tokens
        self.request = EditRequest(fact, " " + fact.meta["target_new"].strip())
        self.fid = fact.meta["id"]
        self.forward_s = clean_forward_seconds(lm, fact)
        self.before = snapshot(lm, fact)
        self.before_plus = ns_plus(lm, fact)
        t0 = time.perf_counter()
        self.probes = selection_probes(lm, fact, self.request.new_target_text(), pool)
        self.probe_before = probe_snapshot(lm, fact, self.probes)
        self.probes_s = time.perf_counter() - t0
        self._site_map = None
        self.locate_s = None

    def site_map(self):
        if self._site_map is None:
            from locedit.localization.sites import locate

            t0 = time.perf_counter()
            self._site_map = locate(self.lm, self.fact)
            self.locate_s = time.perf_counter() - t0
        return self._site_map

    def edit_row(self, layer: int, key: str) -> dict:
        import locedit
        from locedit.editing.select import probe_score, probe_snapshot
        from locedit.study.measure import edit_metrics, snapshot
        from locedit.verification.metrics import success_and_magnitude

        t0 = time.perf_counter()
        e = locedit.edit(self.lm, self.request, layers=[layer], key_position=key, stats=self.stats,
                         sites=self.site_map() if key == "carrier" else None,
                         hparams={"template_tokens": self.tokens})
        edit_s = time.perf_counter() - t0
        try:
            m = edit_metrics(self.fact, self.before, snapshot(self.lm, self.fact))
            plus = ns_plus(self.lm, self.fact)
            sel = probe_score(self.probe_before, probe_snapshot(self.lm, self.fact, self.probes))
        finally:
            e.revert()
        m["NS_plus"] = success_and_magnitude(plus[:, 0], plus[:, 1])[0] if len(plus) else None
        m.pop("generation", None)
        return {"key": site_key(self.fid, layer, key, self.tokens), "phase": "site", "fact": self.fid,
                "layer": layer, "key_position": key, "template_tokens": self.tokens, "edit_s": edit_s,
                "forward_s": self.forward_s, **m, **sel, "t": time.time()}


def canonical(plan: dict, layer: int, key: str) -> tuple[int, str]:
    """A site as edited: the carrier key is the subject-last key when locate's carrier is the subject's last token
    (the same edit, made once)."""
    return (layer, "subject_last") if key == "carrier" and plan.get("carrier_is_subject_last") else (layer, key)


def past(stop_at: str | None) -> bool:
    """Whether the wall clock (UTC) is at or after `stop_at` ("HH:MM")."""
    return bool(stop_at) and datetime.utcnow().strftime("%H:%M") >= stop_at


def run_fact(lm, fact, pool, stats, tokens, rows, store, oracle: bool, stop_at: str | None = None,
             random: bool = True) -> None:
    from locedit.editing.calibration import calibrated_site
    from locedit.editing.select import Selection, best_trial, predicted_layer, shortlist
    from locedit.study.policies import located_layer, random_layer

    fid = fact.meta["id"]
    plan_key = f"plan|{fid}|{tokens}"
    run = FactRun(lm, fact, pool, stats, tokens)
    if plan_key in rows:
        plan = rows[plan_key]
    else:
        sm = run.site_map()
        t0 = time.perf_counter()
        predicted = predicted_layer(lm, run.request, run.probes, stats)
        predictor_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        short = shortlist(lm, run.request, run.probes, Selection(), sm, stats, predicted=predicted)
        shortlist_s = time.perf_counter() - t0 + predictor_s
        fixed, _ = calibrated_site(lm, "rome", warn=False)
        enc = lm.encode(fact)
        plan = {"key": plan_key, "phase": "plan", "fact": fid, "template_tokens": tokens, "num_layers": lm.num_layers,
                "sites": {"fixed": [fixed["layers"][-1], fixed["key_position"]],
                          "located": [located_layer(sm), "carrier"],
                          "predictor": [predicted, "subject_last"],
                          "random": [random_layer(fid, lm.num_layers), "carrier"]},
                "shortlist": short, "carrier_is_subject_last": int(sm.carrier["position"]) == enc.subject_end - 1,
                "locate_s": run.locate_s, "predictor_s": predictor_s,
                "shortlist_s": shortlist_s, "probes_s": run.probes_s, "forward_s": run.forward_s,
                "probe_sources": run.probes.sources, "t": time.time()}
        store.append(plan)
        rows[plan_key] = plan
    sites = [tuple(s) for name, s in plan["sites"].items() if random or name != "random"]
    sites += [(c["layer"], c["key_position"]) for c in plan["shortlist"]]
    if oracle:
        sites += [(l, "subject_last") for l in oracle_layers(lm.num_layers)]
    for layer, key in dict.fromkeys(canonical(plan, l, k) for l, k in sites):
        k = site_key(fid, layer, key, tokens)
        if k not in rows:
            if past(stop_at):
                return  # resumable: the next run makes the rest
            row = run.edit_row(layer, key)
            store.append(row)
            rows[k] = row
            print(f"{fid} L{layer} {key}: S={row['S']} S_sel={row['S_sel']} ({row['edit_s']:.0f} s)",
                  file=sys.stderr, flush=True)
    trials = [{**c, **rows[site_key(fid, *canonical(plan, c["layer"], c["key_position"]), tokens)]}
              for c in plan["shortlist"]]
    choice = plan["shortlist"][best_trial(trials)]
    if plan.get("selected") != [choice["layer"], choice["key_position"]]:
        plan = {**plan, "selected": [choice["layer"], choice["key_position"]], "t": time.time()}
        store.append(plan)
        rows[plan_key] = plan


def fixed_score(rows: dict, fid: str, tokens: str) -> float | None:
    """S of the fact's fixed-site edit, when it has been made."""
    plan = rows.get(f"plan|{fid}|{tokens}")
    if plan is None:
        return None
    row = rows.get(site_key(fid, *canonical(plan, *plan["sites"]["fixed"]), tokens))
    return None if row is None else row["S"]


# --- summary -----------------------------------------------------------------------------------------------------
def policy_rows(rows: dict, tokens: str) -> dict[str, dict[str, dict]]:
    """`{policy: {fact: edit row (+ cost)}}` for every fact whose plan and policy sites are complete."""
    out: dict[str, dict] = {p: {} for p in POLICIES}
    for plan in (r for r in rows.values() if r.get("phase") == "plan" and r["template_tokens"] == tokens):
        fid = plan["fact"]
        get = lambda l, k: rows.get(site_key(fid, *canonical(plan, l, k), tokens))  # noqa: E731
        per_edit = lambda r: r["edit_s"]  # noqa: E731
        for name, (layer, key) in plan["sites"].items():
            r = get(layer, key)
            if r is not None:
                extra = {"located": plan["locate_s"] or 0.0, "predictor": plan["predictor_s"]}.get(name, 0.0)
                out[name][fid] = {**r, "cost_s": per_edit(r) + extra, "trial_edits": 1}
        if "selected" in plan and all(get(c["layer"], c["key_position"]) for c in plan["shortlist"]):
            r = get(*plan["selected"])
            trials = [get(c["layer"], c["key_position"]) for c in plan["shortlist"]]
            cost = sum(per_edit(t) for t in trials) + plan["shortlist_s"] + plan["probes_s"] + (plan["locate_s"] or 0)
            # every trial is scored on the selection probes; the chosen trial's edit is kept, not recomputed
            out["selection"][fid] = {**r, "cost_s": cost, "trial_edits": len(trials)}
        dense = [get(l, "subject_last") for l in oracle_layers(plan["num_layers"])]
        if all(d is not None for d in dense):
            best = min(dense, key=lambda d: (-(d["S"] or 0), d["NKL"] if d["NKL"] is not None else 9e9, d["layer"]))
            out["oracle"][fid] = {**best, "cost_s": sum(per_edit(d) for d in dense), "trial_edits": len(dense)}
    return out


def ceiling(rows: dict, tokens: str, fixed: dict[str, dict]) -> dict:
    """The most any per-fact site choice could gain in S over the fixed site: per fact, the best S of every site
    edited for it (chosen on the evaluation itself, so optimistic), over the facts where that is the dense
    ceiling: the fixed site already scored S = 1 (nothing can score more), or the dense oracle layers were run."""
    from locedit.core.statistics import paired_difference

    best: dict[str, float] = {}
    dense_run = 0
    for fid, row in fixed.items():
        if row["S"] >= 1:
            best[fid] = 1.0
            continue
        plan = rows[f"plan|{fid}|{tokens}"]
        sites = [rows.get(site_key(fid, l, "subject_last", tokens)) for l in oracle_layers(plan["num_layers"])]
        if all(r is not None for r in sites):
            dense_run += 1
            edited = [r for k, r in rows.items() if k.startswith(f"site|{fid}|") and k.endswith(f"|{tokens}")]
            best[fid] = max(r["S"] for r in edited)
    diff = paired_difference(best, {f: fixed[f]["S"] for f in best})
    gains = [best[f] - fixed[f]["S"] for f in best if fixed[f]["S"] < 1]
    imperfect = sum(1 for r in fixed.values() if r["S"] < 1)
    return {"n": len(best), "fixed_perfect": len(best) - dense_run, "dense": dense_run,
            "fixed_imperfect_total": imperfect,
            "imperfect_gain_mean": float(np.mean(gains)) if gains else None,
            # every fact: 0 where the fixed site scored 1, the swept imperfect facts' mean gain for the others
            "estimated_gain_all": float(np.mean(gains)) * imperfect / len(fixed) if gains and fixed else None,
            "S_ceiling": float(np.mean(list(best.values()))) if best else None,
            "S_fixed": float(np.mean([fixed[f]["S"] for f in best])) if best else None, "delta_S": diff}


def summarize(rows: dict, tokens: str) -> dict:
    from locedit.core.statistics import bootstrap_mean, paired_difference

    per = policy_rows(rows, tokens)
    s: dict = {"template_tokens": tokens, "policies": {}, "paired_vs_fixed": {}, "layers": {}}
    for name, facts in per.items():
        if not facts:
            continue
        rs = list(facts.values())
        s["policies"][name] = {"n": len(rs), **{m: bootstrap_mean([r.get(m) for r in rs])._asdict() for m in METRICS},
                               "cost_s": float(np.mean([r["cost_s"] for r in rs])),
                               "cost_forwards": float(np.mean([r["cost_s"] / r["forward_s"] for r in rs])),
                               "trial_edits": float(np.mean([r["trial_edits"] for r in rs]))}
        counts: dict = {}
        for r in rs:
            counts[f"L{r['layer']}/{r['key_position']}"] = counts.get(f"L{r['layer']}/{r['key_position']}", 0) + 1
        s["layers"][name] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
        if name != "fixed":
            s["paired_vs_fixed"][name] = {m: paired_difference({f: r.get(m) for f, r in facts.items()},
                                                               {f: r.get(m) for f, r in per["fixed"].items()})
                                          for m in METRICS}
            both = [f for f in facts if f in per["fixed"]]
            s["paired_vs_fixed"][name]["cost_ratio"] = (
                float(np.mean([facts[f]["cost_s"] for f in both]) / np.mean([per["fixed"][f]["cost_s"] for f in both]))
                if both else None)
    s["ceiling"] = ceiling(rows, tokens, per["fixed"])
    sel = s["paired_vs_fixed"].get("selection", {}).get("S")
    if sel:
        s["goal"] = {"delta_S_pp": None if sel["mean"] is None else 100 * sel["mean"],
                     "ci_excludes_zero": bool(sel["excludes_zero"]),
                     "cost_ratio": s["paired_vs_fixed"]["selection"]["cost_ratio"],
                     "met": bool(sel["mean"] is not None and sel["mean"] >= 0.03 and sel["low"] is not None
                                 and sel["low"] > 0 and (s["paired_vs_fixed"]["selection"]["cost_ratio"] or 9) <= 4)}
    return s


def markdown(s: dict, command: str) -> str:
    def ci(d, scale=100.0, signed=False):
        if not d or d.get("mean") is None:
            return "—"
        f = "{:+.1f}" if signed else "{:.1f}"
        body = f.format(d["mean"] * scale)
        if d.get("low") is None:
            return body
        return body + f" [{f.format(d['low'] * scale)}, {f.format(d['high'] * scale)}]"

    lines = [f"# Site study on the new held-out split (SmolLM2-135M, ROME, template_tokens={s['template_tokens']})",
             "", f"    {command}", "", "Mean and bootstrap 95% CI (%, NKL in nats); cost per fact.", "",
             "| policy | n | S | ES | PS | NS | NS+ | NKL | gen. eff. | trial edits | s | clean fwd | layers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in s["policies"].items():
        layers = ", ".join(f"{k}×{v}" for k, v in list(s["layers"][name].items())[:4])
        lines.append(f"| {name} | {p['n']} | " + " | ".join(ci(p[m], 1 if m == "NKL" else 100) for m in METRICS)
                     + f" | {p['trial_edits']:.1f} | {p['cost_s']:.0f} | {p['cost_forwards']:.0f} | {layers} |")
    lines += ["", "Paired differences against `fixed` (pp; NKL in nats); wins/ties/losses in S; cost ratio:", "",
              "| policy | n | ΔS | ΔES | ΔPS | ΔNS | ΔNS+ | ΔNKL | Δgen | S w/t/l | cost × |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in s["paired_vs_fixed"].items():
        wtl = f"{p['S']['wins']}/{p['S']['ties']}/{p['S']['losses']}"
        cr = "—" if p["cost_ratio"] is None else f"{p['cost_ratio']:.1f}"
        lines.append(f"| {name} | {p['S']['n']} | " + " | ".join(ci(p[m], 1 if m == "NKL" else 100, True)
                                                              for m in METRICS) + f" | {wtl} | {cr} |")
    c = s.get("ceiling")
    if c and c["n"]:
        lines += ["", f"Ceiling (per fact, the best S of every site edited for it, chosen on the evaluation): "
                  f"{c['n']} facts ({c['fixed_perfect']} where the fixed site already scored S = 1, {c['dense']} of "
                  f"the {c['fixed_imperfect_total']} others with the dense layers edited): S {100 * c['S_ceiling']:.1f} "
                  f"against {100 * c['S_fixed']:.1f} for the fixed site, ΔS {ci(c['delta_S'], 100, True)} pp."]
        if c.get("imperfect_gain_mean") is not None:
            lines[-1] += (f" On the {c['dense']} swept facts where the fixed site scored S < 1 the best site gains "
                          f"{100 * c['imperfect_gain_mean']:+.1f} pp of S; over all {s['policies']['fixed']['n']} facts "
                          f"that is about {100 * c['estimated_gain_all']:+.1f} pp (0 where the fixed site scored 1), "
                          f"the most any per-fact choice of these sites could gain.")
    if "goal" in s:
        g = s["goal"]
        verdict = "met" if g["met"] else "not met"
        lines += ["", f"Goal (selection − fixed ΔS ≥ 3 pp, CI excluding 0, cost ≤ 4×): **{verdict}** "
                  f"(ΔS {g['delta_S_pp']:+.1f} pp, CI excludes 0: {g['ci_excludes_zero']}, "
                  f"cost × {g['cost_ratio']:.1f})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=40)
    ap.add_argument("--oracle-facts", type=int, default=0)
    ap.add_argument("--oracle-imperfect", action="store_true",
                    help="the oracle only (and on all --facts) where the fixed site scored S < 1: elsewhere no site "
                         "can raise S (the fixed layer is one of the oracle's), so the S ceiling is 1 there")
    ap.add_argument("--random-every", type=int, default=1, help="the random policy on every K-th fact only")
    ap.add_argument("--template-tokens", default="text", choices=("text", "prompt"))
    ap.add_argument("--stop-at", default=None, help="HH:MM (UTC): start no new fact after it")
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--out", default=str(OUT), help=argparse.SUPPRESS)  # for trying the recipe elsewhere
    args = ap.parse_args(argv)
    from locedit.core.store import RunStore

    out = Path(args.out)

    out.mkdir(parents=True, exist_ok=True)
    store = RunStore(out / "rows.jsonl", key="key")
    rows = dict(store.latest())
    held, pool = all_facts()
    if not args.summary_only:
        import locedit
        from locedit.editing.hparams import read_hparams
        from locedit.editing.stats import key_statistics

        lm = locedit.load("smollm2-135m")
        stats = key_statistics(lm, kinds=("mlp",), tokens=read_hparams("rome", None).params.stats_tokens,
                               progress=False)
        for i, fact in enumerate(held[:args.facts]):
            if past(args.stop_at):
                print("stop time reached", file=sys.stderr)
                break
            oracle = i < args.oracle_facts
            if args.oracle_imperfect:
                fixed_s = fixed_score(rows, fact.meta["id"], args.template_tokens)
                if fixed_s is not None and fixed_s >= 1:
                    continue  # complete already (the plan and policy sites exist), nothing for the oracle to do
                oracle = fixed_s is not None  # (< 1 here); a fact not yet run gets its policies first
            run_fact(lm, fact, pool, stats, args.template_tokens, rows, store, oracle=oracle,
                     stop_at=args.stop_at, random=i % args.random_every == 0)
            s = summarize(rows, args.template_tokens)  # after every fact: an interrupted run still has a summary
            (out / "summary.json").write_text(json.dumps(s, indent=1, default=str) + "\n")
    s = summarize(rows, args.template_tokens)
    command = "python recipes/study_heldout.py " + " ".join(argv if argv is not None else sys.argv[1:])
    s["command"] = command
    s["n_heldout_total"] = len(held)
    (out / "summary.json").write_text(json.dumps(s, indent=1, default=str) + "\n")
    (out / "summary.md").write_text(markdown(s, command))
    print(markdown(s, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

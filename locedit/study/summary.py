"""The study's summary: per-policy means with bootstrap CIs, paired differences, regressions, and its Markdown."""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from locedit.core.statistics import bootstrap_mean, hase_regression
from locedit.study.correlation import paired_by_layer_band, paired_sorted, within_fact_correlation
from locedit.study.policies import FIXED_POLICIES, best_row, choose_fixed, layer_bands
from locedit.study.rows import latest_chains

METRICS = ("S", "ES", "PS", "NS", "EM", "gen_efficacy", "NKL", "GE_delta", "ppl_drift")
PAIRS = (("located", "fixed"), ("located", "fixed_carrier"), ("located", "random"), ("located", "oracle"),
         ("located_no_l0", "fixed"), ("located_no_l0", "located"), ("located", "located_subject_last"),
         ("fixed_carrier", "fixed"), ("head_located", "head_random_same_layers"),
         ("head_located", "head_random_any"), ("head_located", "located"))


def fmt_ci(mean: float | None, lo: float | None, hi: float | None, pct: bool = True) -> str:
    """A mean and its interval as text: in % (one decimal) by default, else to three decimals; "–" for none."""
    if mean is None:
        return "–"
    f = 100 if pct else 1
    if lo is None:
        return f"{f * mean:.1f}" if pct else f"{mean:.3f}"
    return (f"{f * mean:.1f} [{f * lo:.1f}, {f * hi:.1f}]" if pct else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]")


def summarize(rows: Mapping[str, dict], config: dict, tuning_ids: Iterable[str], held_ids: Iterable[str], *,
              num_layers: int, fixed_layer: int | None = None) -> dict:
    """The study's summary of its rows (`read_rows`): the tuned fixed layer and sweep table, per policy the mean
    and bootstrap CI of every metric on the held-out facts, the paired differences of `PAIRS` (a − b), by layer
    band and by relation, the facts located lost, the regressions and within-fact correlations on the sweep rows,
    the sequential chains and timings. `fixed_layer` overrides the tuned layer."""
    held_ids = set(held_ids)
    ok = [r for r in rows.values() if "error" not in r]
    fixed, sweep_table = choose_fixed(rows, set(tuning_ids))
    if fixed_layer is not None:
        fixed = fixed_layer
    per_policy: dict[str, dict] = {}
    for r in ok:
        if r["phase"] == "heldout" and r["fact"] in held_ids:
            if r["policy"] in FIXED_POLICIES and r.get("layer") != fixed:
                continue  # made at a fixed layer an earlier tuning run chose
            per_policy.setdefault(r["policy"], {})[r["fact"]] = r
    oracle_rows: dict[str, list] = {}
    for r in ok:
        if r["phase"] == "oracle":
            oracle_rows.setdefault(r["fact"], []).append(r)
    per_policy["oracle"] = {f: best_row(rs) for f, rs in oracle_rows.items()}
    summary: dict = {"config": config, "fixed_layer": fixed, "tuning_sweep": sweep_table, "policies": {},
                     "paired": {}, "errors": [{"key": r["key"], "error": r["error"]} for r in rows.values()
                                              if "error" in r]}
    for name, by_fact in per_policy.items():
        entry = {"n": len(by_fact)}
        for m in METRICS:
            mean, lo, hi = bootstrap_mean([r.get(m) for r in by_fact.values()])
            entry[m] = {"mean": mean, "low": lo, "high": hi}
        layers: dict = {}
        for r in by_fact.values():
            if r.get("layer") is not None:
                layers[str(r["layer"])] = layers.get(str(r["layer"]), 0) + 1
        entry["layers"] = dict(sorted(layers.items(), key=lambda kv: -kv[1]))
        summary["policies"][name] = entry
    for a, b in PAIRS:
        if a in per_policy and b in per_policy:
            for m in ("S", "ES", "PS", "NS", "gen_efficacy", "NKL"):
                da = {f: r.get(m) for f, r in per_policy[a].items()}
                db = {f: r.get(m) for f, r in per_policy[b].items()}
                d = paired_sorted(da, db)
                if d["n"]:
                    summary["paired"].setdefault(f"{a} - {b}", {})[m] = d
    # where a located layer other than 0 helps or hurts: located_no_l0 − fixed by the band of its layer
    summary["no_l0_minus_fixed_by_band"] = {
        band: d for band, d in paired_by_layer_band(per_policy.get("located_no_l0", {}), per_policy.get("fixed", {}),
                                                    layer_bands(num_layers)).items() if d["n"]}
    # by relation (located vs fixed, S)
    by_rel: dict = {}
    for name in ("located", "fixed", "fixed_carrier", "random", "located_no_l0"):
        for f, r in per_policy.get(name, {}).items():
            by_rel.setdefault(r["relation"], {}).setdefault(name, []).append(r["S"])
    summary["by_relation_S"] = {rel: {n: float(np.mean(v)) for n, v in d.items()} | {"n": max(map(len, d.values()))}
                                for rel, d in sorted(by_rel.items())}
    # located losses (where located lost to fixed on S)
    losses = []
    for f, r in per_policy.get("located", {}).items():
        fr = per_policy.get("fixed", {}).get(f)
        if fr and fr.get("S") is not None and r.get("S") is not None and r["S"] < fr["S"] - 1e-9:
            losses.append({"fact": f, "subject": r["subject"], "relation": r["relation"], "located_layer": r["layer"],
                           "located_S": r["S"], "fixed_S": fr["S"], "located_PS": r["PS"], "fixed_PS": fr["PS"],
                           "located_NS": r["NS"], "fixed_NS": fr["NS"]})
    summary["located_loses_to_fixed"] = losses
    both = [f for f in per_policy.get("located", {}) if f in per_policy.get("fixed", {})]
    summary["located_at_fixed_layer"] = {"n": len(both), "same_layer": sum(
        per_policy["located"][f].get("layer") == fixed for f in both)}
    sweep = [r for r in ok if r["phase"] in ("tuning", "oracle")]
    summary["regression"] = {y: hase_regression([{**r, "fact": r["fact"]} for r in sweep], outcome=y)
                             for y in ("S", "rewrite_score", "PS")}
    summary["within_fact"] = {y: within_fact_correlation(sweep, outcome=y) for y in ("S", "rewrite_score")}
    summary["regression_rank"] = hase_regression(
        [{**r, "neg_rank": -r["loc_rank"] if r.get("loc_rank") is not None else None} for r in sweep],
        outcome="S", score="neg_rank")
    oracle_layers = {f: r["layer"] for f, r in per_policy["oracle"].items()}
    summary["oracle_layers"] = oracle_layers
    summary["sequential"] = latest_chains([r for r in ok if r["phase"] == "sequential"])
    timing = {}
    for name in ("located", "fixed", "head_located"):
        ts = [r["edit_s"] for r in per_policy.get(name, {}).values() if r.get("edit_s") and not r.get("reused")]
        if ts:
            timing[name] = float(np.mean(ts))
    summary["timing_s"] = timing
    return summary


LABELS = {"located": "located (locate's top layer, carrier key)", "located_subject_last": "located layer, subject-last key",
          "located_no_l0": "located excluding layer 0 (carrier key)", "fixed": "fixed layer (tuned), subject-last key",
          "fixed_carrier": "fixed layer (tuned), carrier key", "random": "random layer, carrier key",
          "oracle": "oracle (best of a layer sweep, subject-last)", "head_located": "head edit: 3 located heads",
          "head_random_same_layers": "head edit: 3 random heads, same layers",
          "head_random_any": "head edit: 3 random heads, any layers"}


def markdown(s: dict) -> str:
    """The summary (`summarize`) as the Markdown report `summary.md`."""
    lines = ["# Does localization inform editing? (SmolLM2-135M, ROME r-ROME fix; held-out facts)", "",
             f"Fixed layer chosen on the tuning split: **{s['fixed_layer']}**; run: `{' '.join(s['config']['argv'])}`",
             "", "Mean and bootstrap 95% CI, in % (NKL in nats, ppl drift in %):", "",
             "| policy | n | S | ES | PS | NS | gen. efficacy | NKL | ppl drift | layers used |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = [p for p in LABELS if p in s["policies"]]
    for name in order:
        e = s["policies"][name]
        cell = lambda m, pct=True: fmt_ci(e[m]["mean"], e[m]["low"], e[m]["high"], pct)  # noqa: E731
        layers = ", ".join(f"{l}×{c}" for l, c in list(e["layers"].items())[:5])
        lines.append(f"| {LABELS[name]} | {e['n']} | {cell('S')} | {cell('ES')} | {cell('PS')} | {cell('NS')} | "
                     f"{cell('gen_efficacy')} | {cell('NKL', False)} | {cell('ppl_drift')} | {layers} |")
    lines += ["", "Paired differences (same facts), percentage points, bootstrap 95% CI:", "",
              "| difference | n | ΔS | ΔPS | ΔNS | Δgen. efficacy | wins/ties/losses (S) |", "|---|---|---|---|---|---|---|"]
    for name, d in s["paired"].items():
        c = lambda m: fmt_ci(d[m]["mean"], d[m]["low"], d[m]["high"]) + (" *" if d[m]["excludes_zero"] else "") \
            if m in d else "–"  # noqa: E731
        lines.append(f"| {name} | {d['S']['n']} | {c('S')} | {c('PS')} | {c('NS')} | {c('gen_efficacy')} | "
                     f"{d['S']['wins']}/{d['S']['ties']}/{d['S']['losses']} |")
    same = s.get("located_at_fixed_layer") or {}
    if same.get("n"):
        lines += ["", f"Located chose the fixed layer ({s['fixed_layer']}) for {same['same_layer']} of the {same['n']} "
                      "held-out facts both policies edited."]
    if s.get("no_l0_minus_fixed_by_band"):
        lines += ["", "located_no_l0 − fixed (S, pp) by the layer located_no_l0 chose: " + "; ".join(
            f"L{band}: {fmt_ci(d['mean'], d['low'], d['high'])} (n={d['n']}, {d['wins']}/{d['ties']}/{d['losses']})"
            for band, d in s["no_l0_minus_fixed_by_band"].items())]
    lines += ["", "(* = CI excludes zero)", "", "Tuning sweep (mean S, %, by layer, subject-last key): " +
              ", ".join(f"L{l}: {100 * v['S']:.0f} (n={v['n']})" for l, v in s["tuning_sweep"].items())]
    reg = s["regression"].get("S", {})
    if reg.get("n", 0) >= 4:
        lines += ["", f"Hase-style regression on {reg['n']} sweep edits ({reg['facts']} facts × layers {reg['layers']}):"]
        for y, r in s["regression"].items():
            if "r2_layer" in r:
                lines.append(regression_line(y, r, "locate score"))
    for y, w in (s.get("within_fact") or {}).items():
        if w.get("n"):
            d = w["score_minus_depth"]
            lines.append(f"- within each fact, Spearman ρ over its swept layers with {y} ({w['n']} facts; {w['flat']} "
                         f"with the same {y} at every layer left out): locate's layer score "
                         f"{fmt_ci(w['score']['mean'], w['score']['low'], w['score']['high'], False)}, earlier-is-better "
                         f"(−layer) {fmt_ci(w['depth']['mean'], w['depth']['low'], w['depth']['high'], False)}; "
                         f"score − depth {fmt_ci(d['mean'], d['low'], d['high'], False)}")
    if s.get("oracle_layers"):
        lines += ["", f"Oracle layers per fact: {s['oracle_layers']}"]
    if s.get("located_loses_to_fixed"):
        lines += ["", "Facts where located lost to fixed (S):"]
        for x in s["located_loses_to_fixed"]:
            lines.append(f"- {x['subject']} ({x['relation']}): located L{x['located_layer']} S {x['located_S']:.2f} "
                         f"(PS {x['located_PS']:.2f}, NS {x['located_NS']:.2f}) vs fixed S {x['fixed_S']:.2f} "
                         f"(PS {x['fixed_PS']:.2f}, NS {x['fixed_NS']:.2f})")
    if s.get("by_relation_S"):
        lines += ["", "Mean S by relation (held-out): " + "; ".join(
            f"{rel} (n={d['n']}): " + ", ".join(f"{k} {100 * v:.0f}" for k, v in d.items() if k != "n")
            for rel, d in s["by_relation_S"].items())]
    if s.get("sequential"):
        lines += ["", "## Sequential editing", "",
                  "Edits applied one after another, never reverted in between; at each checkpoint every edit so far "
                  "is measured (S, and S over the facts SmolLM2 knew at top-1), with retention of the unedited probe "
                  "facts and perplexity drift. Figure: `sequential.png`.", "",
                  "| method | chain | edits | S | S (known facts) | ES | PS | NS | probe retention | ppl drift | "
                  "s/edit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, pts in s["sequential"].items():
            for p in pts:
                lines.append(f"| {m} | {p.get('chain', '–')} | {p['n_edits']} | {pct(p['S'])} | "
                             f"{pct(p.get('S_known'))} | {pct(p['ES'])} | {pct(p['PS'])} | {pct(p['NS'])} | "
                             f"{pct(p['probe_retention'])} | {100 * p['ppl_drift']:+.1f}% | "
                             f"{p['edit_s_mean']:.1f} |" if p.get("edit_s_mean") is not None else
                             f"| {m} | – | {p['n_edits']} | {pct(p['S'])} | – | {pct(p['ES'])} | {pct(p['PS'])} | "
                             f"{pct(p['NS'])} | {pct(p['probe_retention'])} | {100 * p['ppl_drift']:+.1f}% | – |")
    if s.get("errors"):
        lines += ["", f"{len(s['errors'])} edits failed: " + "; ".join(f"{e['key']}: {e['error'][:80]}"
                                                                       for e in s["errors"][:5])]
    return "\n".join(lines) + "\n"


def regression_line(name: str, r: dict, score: str = "score") -> str:
    """One `hase_regression` result as a Markdown list item: in-sample and fact-grouped cross-validated R²."""
    nan = float("nan")
    return (f"- {name}: R² layer {r['r2_layer']:.3f}, {score} {r['r2_score']:.3f}, layer + score "
            f"{r['r2_layer+score']:.3f} (increment {r['r2_increment']:+.3f}); fact-grouped CV R²: layer "
            f"{r.get('cv_r2_layer', nan):.3f}, score {r.get('cv_r2_score', nan):.3f}, layer + score "
            f"{r.get('cv_r2_layer+score', nan):.3f}")


def pct(v: float | None) -> str:
    """A fraction as a whole percentage; "–" for none."""
    return "–" if v is None else f"{100 * v:.0f}"

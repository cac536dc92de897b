"""Validate `verify`'s checks on control edits whose route is known by construction (issue #17 §1).

On known facts of `data/facts/heldout/facts.jsonl` (SmolLM2), each fact gets seven control edits:

  (+) enrichment route:  rome_early   ROME at layer 1 (the model's measured edit layer), subject's last token
                         memit_early  MEMIT at layers 1-3, keyed at the subject's last token
  (-) shortcuts:         rome_last_mid   ROME at layer 12 keyed at the prompt's last token (key_position="last")
                         rome_last_late  ROME at layer 22 keyed at the prompt's last token
                         head_extraction a head-output edit of the fact's top 3 extraction heads (largest direct logit
                                         to the true target; keyed at the last token, C = I)
  (0) failed / weak:     rome_weak    ROME at layer 1, subject-keyed, 2 optimisation steps
                         noop         no edit at all

The unedited model's work is done once per fact and shared by its seven controls (behaviour before, the mechanistic
measurements before); each control then measures the edited model, the two cross-patches (necessity in the edited
model, sufficiency in the unedited one) and reverts (bit-exact). One row per (fact, control) is appended to
`results.jsonl` as soon as it is measured; a rerun skips the rows already there (resumable; a truncated last line is
dropped). Facts alternate between the `tuning` and the `heldout` split so a run stopped early has both.

    nice -n 10 python recipes/validate_verify.py [--n 100] [--out data/results/validate_verify] [--shard I/N]
    python recipes/validate_verify.py --analyse          # summary.json / summary.md from the rows so far

The analysis: per check's continuous score, AUROC of (+) against (-) with a bootstrap CI over facts; the threshold
maximising TPR(+) - FPR(-) (Youden) on the **tuning** facts; on the **held-out** facts, at that threshold and at the
threshold in the code: pass rate of (+), false-pass rate of (-) and of (0), each with a bootstrap CI. Checks whose
tuning AUROC is below 0.8 are marked for leaving the rule (the held-out AUROC is what is reported). The constants
in `locedit/verification/mechanism.py` and `verify.py` name this run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import locedit  # noqa: E402
from locedit.core.datasets import read_facts  # noqa: E402
from locedit.core.statistics import auroc, bootstrap_mean  # noqa: E402
from locedit.verification import mechanism as mech  # noqa: E402
ver = importlib.import_module("locedit.verification.verify")  # the module (the package exports the function)

FACTS = ROOT / "data" / "facts" / "heldout" / "facts.jsonl"
OUT = ROOT / "data" / "results" / "validate_verify"
EARLY, MID, LATE = 1, 12, 22
CONTROLS = {  # name: (class, edit options); None = no edit
    "rome_early": ("+", dict(method="rome", layers=[EARLY], key_position="subject_last")),
    "memit_early": ("+", dict(method="memit", layers=[1, 2, 3], key_position="subject_last")),
    "rome_last_mid": ("-", dict(method="rome", layers=[MID], key_position="last")),
    "rome_last_late": ("-", dict(method="rome", layers=[LATE], key_position="last")),
    "head_extraction": ("-", dict(method="head", key_position="subject_last",
                                  hparams={"mom2_adjustment": False})),
    "rome_weak": ("0", dict(method="rome", layers=[EARLY], key_position="subject_last",
                            hparams={"v_num_grad_steps": 2})),
    "noop": ("0", None),
}
# the behaviour measured as verify does, with 10-token generations and one perplexity passage (cheaper; fluency and
# perplexity are not validated here)
BEHAVIOUR = dict(generation_tokens=10, fluency_tokens=10, perplexity_text=ver.PERPLEXITY_TEXT[:1])
# per check: (score key in the check's dict, higher is better?) — the verdict's scores
SCORES = {
    "knockout": ("subject_logodds_drop_after", True),
    "extraction": ("new_minus_old_after", True),
    "sufficiency": ("logodds_gain", True),
    "necessity": ("logodds_drop", True),
    "ov_read": ("gain", True),
    "enrichment": ("new_best_rank_after", False),
    "locality": ("max_abs_relative_change", False),
}
BEHAVIOUR_SCORES = {"neighborhood_score_prefixed_drop": False, "neighborhood_kl": False,
                    "neighborhood_score_drop": False}
CODE_THRESHOLDS = {"knockout": mech.KNOCKOUT_MIN_LOGODDS, "extraction": 0.0,
                   "sufficiency": mech.SUFFICIENCY_MIN_LOGODDS, "necessity": mech.NECESSITY_MIN_LOGODDS,
                   "ov_read": mech.OV_MIN_GAIN, "enrichment": mech.ENRICHMENT_MAX_RANK,
                   "locality": mech.LOCALITY_MAX_REL_CHANGE, "neighborhood_score_drop": ver.NS_TOLERANCE,
                   "neighborhood_score_prefixed_drop": getattr(ver, "NS_PREFIXED_TOLERANCE", None),
                   "neighborhood_kl": getattr(ver, "NKL_MAX", None)}


def load_facts(n: int) -> list[tuple[locedit.Fact, str]]:
    """(fact, split) alternating tuning / heldout, in file order within each split."""
    splits = {json.loads(line)["case_id"]: json.loads(line)["split"] for line in FACTS.read_text().splitlines()}
    by_split: dict[str, list] = {"tuning": [], "heldout": []}
    for fact in read_facts(FACTS):
        by_split[splits[int(fact.meta["id"])]].append(fact)
    out = []
    for a, b in zip(by_split["tuning"], by_split["heldout"]):
        out += [(a, "tuning"), (b, "heldout")]
    return out[:n]


def done_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
            path.write_text("".join(l + "\n" for l in lines[:-1]))  # a truncated last line: drop it
    return rows


def all_rows(out: Path) -> list[dict]:
    """The rows of results.jsonl and of every shard's file."""
    return [r for p in sorted(out.glob("results*.jsonl")) for r in done_rows(p)]


def scores_of(behaviour: dict, mechanism: dict) -> dict:
    before = behaviour["before"]
    out = {"behaviour_passed": bool(behaviour["passed"]), "efficacy_score": behaviour["efficacy_score"],
           "paraphrase_score": behaviour["paraphrase_score"], "neighborhood_score": behaviour["neighborhood_score"],
           "generation_efficacy_prompt": behaviour["generation_efficacy_prompt"],
           "neighborhood_kl": behaviour["neighborhood_kl"], "perplexity_drift": behaviour["perplexity_drift"]}
    if behaviour["neighborhood_score"] is not None:
        out["neighborhood_score_drop"] = before["neighborhood_score"] - behaviour["neighborhood_score"]
    if behaviour.get("neighborhood_score_prefixed") is not None:
        out["neighborhood_score_prefixed_drop"] = ((before.get("neighborhood_score_prefixed") or 0.0)
                                                   - behaviour["neighborhood_score_prefixed"])
    checks = {}
    for name, (key, _) in SCORES.items():
        c = mechanism.get(name) or {}
        if c.get("applicable", True) is False:
            checks[name] = {"applicable": False}
            continue
        checks[name] = {"applicable": True, "score": mech.finite(float(c[key])), "passed": c.get("passed")}
        for extra in ("layer_shift", "curve_correlation", "share_of_edit", "p_new_patched", "new_minus_old_before",
                      "new_best_rank_before"):
            if extra in c:
                checks[name][extra] = mech.finite(float(c[extra]))
    out["mechanism_passed"] = bool(mechanism["passed"])
    out["checks"] = checks
    return out


def run_fact(lm, fact, split: str, todo: list[str], write) -> None:
    inputs = ver.inputs_for([fact], [fact.meta["target_new"]])
    x = inputs[0]
    t0 = time.perf_counter()
    state_before = ver.measure_behaviour(lm, inputs, **BEHAVIOUR)
    setup = mech.setup_for(lm, x.fact, x.new_target, {"layers": [EARLY]}, 0, x.neighborhood)
    before = mech.measure(lm, setup, after=False)
    heads = [tuple(h) for h in before["ov_heads"]]
    shared_s = time.perf_counter() - t0
    for name in todo:
        cls, options = CONTROLS[name]
        t = time.perf_counter()
        edit = None
        row = {"fact": str(fact.meta["id"]), "split": split, "control": name, "class": cls,
               "subject": fact.subject, "prompt": fact.prompt, "new_target": x.new_target}
        try:
            if options is not None:
                opts = dict(options)
                if opts["method"] == "head":
                    opts["heads"] = heads
                edit = locedit.edit(lm, locedit.EditRequest(x.fact, x.new_target), **opts)
            edit_s = time.perf_counter() - t
            layer = max(edit.sites["layers"]) if edit is not None else EARLY
            s = mech.MechanismSetup(setup.fact, setup.new_target, layer, setup.position, setup.heads,
                                    setup.neighbours)
            state_after = ver.measure_behaviour(lm, inputs, **BEHAVIOUR)
            after = mech.measure(lm, s, after=True, heads=heads, patch_state=mech.patch_state(s, before))
            if edit is not None:
                edit.revert()
                edit = None
            b = dict(before)
            b["patched"] = mech.cross_patch(lm, s, b, after)
            behaviour = ver.behaviour_metrics(inputs, state_before, state_after)
            mechanism = mech.compare(lm, s, b, after)
            row.update(scores_of(behaviour, mechanism))
            row.update({"edit_layer": layer, "edit_s": edit_s, "measure_s": time.perf_counter() - t - edit_s,
                        "shared_before_s": shared_s})
        except locedit.LoceditError as e:  # e.g. the model already gives the new target: recorded, not hidden
            row["error"] = f"{type(e).__name__}: {e}"
        finally:
            if edit is not None and edit.is_applied:
                edit.revert()
        write(row)


# --- analysis ---------------------------------------------------------------------------------------------------------
def _values(rows, name, cls, split):
    out = []
    for r in rows:
        if r["class"] != cls or r["split"] != split or "error" in r:
            continue
        v = _score(r, name)
        if v is not None:
            out.append((r["fact"], v))
    return out


def _score(r: dict, name: str):
    if name in SCORES:
        c = r["checks"].get(name, {})
        return c.get("score") if c.get("applicable") else None
    return r.get(name)


def _higher(name: str) -> bool:
    return SCORES[name][1] if name in SCORES else BEHAVIOUR_SCORES[name]


def _auroc_ci(pos, neg, higher: bool, resamples: int = 1000, seed: int = 0):
    """AUROC of pos against neg (oriented so that 1 = pos scores better) and a percentile bootstrap CI over facts."""
    sign = 1.0 if higher else -1.0
    if not pos or not neg:
        return None, None, None
    def value(p, q):
        return auroc([1] * len(p) + [0] * len(q), [sign * v for v in p] + [sign * v for v in q])
    point = value([v for _, v in pos], [v for _, v in neg])
    facts = sorted({f for f, _ in pos} | {f for f, _ in neg})
    by = {f: ([v for g, v in pos if g == f], [v for g, v in neg if g == f]) for f in facts}
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(resamples):
        pick = rng.choice(len(facts), len(facts))
        p = [v for i in pick for v in by[facts[i]][0]]
        q = [v for i in pick for v in by[facts[i]][1]]
        if p and q:
            stats.append(value(p, q))
    return point, float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def _youden(pos, neg, higher: bool):
    """The threshold maximising TPR - FPR (passes: score >= t, or <= t when lower is better), placed halfway between
    the best cut's score and the next observed score on the failing side (not on a sample point); and the J."""
    p, q = np.array([v for _, v in pos]), np.array([v for _, v in neg])
    values = np.unique(np.concatenate([p, q]))
    best, best_t = -2.0, None
    for t in values:
        tpr = np.mean(p >= t) if higher else np.mean(p <= t)
        fpr = np.mean(q >= t) if higher else np.mean(q <= t)
        if tpr - fpr > best:
            best, best_t = tpr - fpr, float(t)
    beyond = values[values < best_t] if higher else values[values > best_t]
    if beyond.size:
        best_t = (best_t + float(beyond.max() if higher else beyond.min())) / 2
    return best_t, float(best)


def _rate(values, t, higher: bool):
    passed = [float(v >= t) if higher else float(v <= t) for _, v in values]
    e = bootstrap_mean(passed)
    return {"rate": e.mean, "ci95": [e.low, e.high], "n": len(passed)}


def analyse(rows: list[dict]) -> dict:
    rows = [r for r in rows if "error" not in r]
    facts = {s: len({r["fact"] for r in rows if r["split"] == s}) for s in ("tuning", "heldout")}
    out = {"facts": facts, "rows": len(rows), "controls": {k: v[0] for k, v in CONTROLS.items()}, "checks": {}}
    for name in list(SCORES) + list(BEHAVIOUR_SCORES):
        higher = _higher(name)
        tune = {c: _values(rows, name, c, "tuning") for c in "+-0"}
        held = {c: _values(rows, name, c, "heldout") for c in "+-0"}
        a_t = _auroc_ci(tune["+"], tune["-"], higher)
        a_h = _auroc_ci(held["+"], held["-"], higher)
        entry = {"higher_is_better": higher, "auroc_tuning": a_t[0],
                 "auroc_heldout": {"value": a_h[0], "ci95": [a_h[1], a_h[2]]}}
        if tune["+"] and tune["-"]:
            t, j = _youden(tune["+"], tune["-"], higher)
            entry["threshold_tuning"] = t
            entry["youden_tuning"] = j
            entry["heldout_at_tuning_threshold"] = {c: _rate(held[c], t, higher) for c in "+-0" if held[c]}
        code = CODE_THRESHOLDS.get(name)
        if code is not None:
            entry["threshold_code"] = code
            entry["heldout_at_code_threshold"] = {c: _rate(held[c], code, higher) for c in "+-0" if held[c]}
        # kept in the rule when it separates (+) from (-) on the tuning facts; the held-out AUROC is the report
        entry["keep_in_rule"] = bool(a_t[0] is not None and a_t[0] >= 0.8)
        out["checks"][name] = entry
    # the verdict with the tuned rule: behaviour as coded plus the kept behaviour scores, and every kept mechanistic
    # check's score at its tuning threshold (scores only: locality's same-sites condition is not re-applied here)
    kept = {n: e for n, e in out["checks"].items() if e["keep_in_rule"] and "threshold_tuning" in e}
    def passes(r, n):
        v = _score(r, n)
        if v is None:
            return None
        t = kept[n]["threshold_tuning"]
        return v >= t if kept[n]["higher_is_better"] else v <= t
    out["tuned_rule"] = {"mechanism": sorted(n for n in kept if n in SCORES),
                         "behaviour_added": sorted(n for n in kept if n in BEHAVIOUR_SCORES
                                                   and n != "neighborhood_score_drop")}
    def tuned(r) -> tuple[bool, bool]:
        """(behaviour, mechanism) of one row under the tuned rule: behaviour as coded plus the added scores; every
        applicable kept mechanistic check (at least one)."""
        m = [x for x in (passes(r, n) for n in out["tuned_rule"]["mechanism"]) if x is not None]
        b = r["behaviour_passed"] and all(passes(r, n) is not False for n in out["tuned_rule"]["behaviour_added"])
        return bool(b), bool(m) and all(m)
    for split in ("tuning", "heldout"):
        per = {}
        for cls in "+-0":
            sub = [tuned(r) for r in rows if r["class"] == cls and r["split"] == split]
            if sub:
                em = bootstrap_mean([float(m) for _, m in sub])
                ea = bootstrap_mean([float(b and m) for b, m in sub])
                per[cls] = {"mechanism_pass": {"rate": em.mean, "ci95": [em.low, em.high]},
                            "verdict_pass": {"rate": ea.mean, "ci95": [ea.low, ea.high]}, "n": len(sub)}
        out["tuned_rule"][split] = per
    # the tuned rule per control, held-out: behaviour (as coded + the added scores), mechanism, verdict
    per_control = {}
    for control in CONTROLS:
        sub = [tuned(r) for r in rows if r["control"] == control and r["split"] == "heldout"]
        if sub:
            per_control[control] = {"behaviour": float(np.mean([b for b, _ in sub])),
                                    "mechanism": float(np.mean([m for _, m in sub])),
                                    "verdict": float(np.mean([b and m for b, m in sub])), "n": len(sub)}
    out["tuned_rule"]["per_control_heldout"] = per_control
    # the rules as coded (the pass flags), per class and control, held-out
    out["pass_rates_heldout"] = {}
    for control in CONTROLS:
        sub = [r for r in rows if r["control"] == control and r["split"] == "heldout"]
        if not sub:
            continue
        d = {"behaviour": bootstrap_mean([float(r["behaviour_passed"]) for r in sub]).mean,
             "mechanism": bootstrap_mean([float(r["mechanism_passed"]) for r in sub]).mean, "n": len(sub)}
        for name in SCORES:
            vals = [float(bool(r["checks"][name].get("passed"))) for r in sub if r["checks"][name].get("applicable")]
            d[name] = bootstrap_mean(vals).mean if vals else None
        out["pass_rates_heldout"][control] = d
    return out


def _f(v, spec=".2f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def summary_md(s: dict) -> str:
    lines = [f"# validate_verify: {s['facts']['tuning']} tuning + {s['facts']['heldout']} held-out facts, "
             f"{s['rows']} control edits", "",
             "Controls: " + ", ".join(f"{k} ({v})" for k, v in s["controls"].items()), "",
             "| check | AUROC (+ vs -) tuning | AUROC held-out [95% CI] | threshold (tuning, Youden) | held-out "
             "pass (+) | false-pass (-) | false-pass (0) | keep |", "|---|---|---|---|---|---|---|---|"]
    for name, e in s["checks"].items():
        h = e.get("heldout_at_tuning_threshold", {})
        def r(c):
            x = h.get(c)
            return "-" if x is None else f"{_f(x['rate'])} [{_f(x['ci95'][0])}, {_f(x['ci95'][1])}] (n={x['n']})"
        a = e["auroc_heldout"]
        lines.append(f"| {name} | {_f(e['auroc_tuning'])} | {_f(a['value'])} [{_f(a['ci95'][0])}, "
                     f"{_f(a['ci95'][1])}] | {'≥' if e['higher_is_better'] else '≤'} "
                     f"{_f(e.get('threshold_tuning'), '.3g')}"
                     f" | {r('+')} | {r('-')} | {r('0')} | {'yes' if e['keep_in_rule'] else 'no'} |")
    t = s.get("tuned_rule", {})
    lines += ["", f"The tuned rule: mechanism = {', '.join(t.get('mechanism', [])) or '-'}; behaviour adds "
              f"{', '.join(t.get('behaviour_added', [])) or 'nothing'}. Its pass rates per class:", "",
              "| split | class | mechanism passes | verdict (behaviour and mechanism) passes | n |",
              "|---|---|---|---|---|"]
    for split in ("tuning", "heldout"):
        for cls, d in t.get(split, {}).items():
            mp, vp = d["mechanism_pass"], d["verdict_pass"]
            lines.append(f"| {split} | {cls} | {_f(mp['rate'])} [{_f(mp['ci95'][0])}, {_f(mp['ci95'][1])}] | "
                         f"{_f(vp['rate'])} [{_f(vp['ci95'][0])}, {_f(vp['ci95'][1])}] | {d['n']} |")
    pc = t.get("per_control_heldout", {})
    if pc:
        lines += ["", "The tuned rule per control, held-out:", "", "| control | behaviour | mechanism | verdict | n |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c} | {_f(d['behaviour'])} | {_f(d['mechanism'])} | {_f(d['verdict'])} | {d['n']} |"
                  for c, d in pc.items()]
    lines += ["", "Held-out pass rates of the rules as coded when the run was made:", "",
              "| control | behaviour | mechanism | " + " | ".join(SCORES) + " | n |",
              "|---|---|---|" + "---|" * len(SCORES) + "---|"]
    for control, d in s["pass_rates_heldout"].items():
        lines.append(f"| {control} | {_f(d['behaviour'])} | {_f(d['mechanism'])} | "
                     + " | ".join(_f(d[n]) for n in SCORES) + f" | {d['n']} |")
    return "\n".join(lines) + "\n"


def shard_spec(text: str) -> tuple[int, int]:
    """`--shard I/N` with 0 <= I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N, e.g. 0/2") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= I < N")
    return i, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=100, help="facts (alternating tuning / heldout)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--controls", nargs="+", default=list(CONTROLS), choices=list(CONTROLS))
    parser.add_argument("--analyse", action="store_true", help="only write summary.json / summary.md")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard", type=shard_spec, default=(0, 1), help="I/N: this process runs facts I, I+N, ... and appends to "
                        "results.I-of-N.jsonl (N > 1), so N processes share the cores; the analysis reads every file")
    args = parser.parse_args()
    shard, shards = args.shard
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("results.jsonl" if shards == 1 else f"results.{shard}-of-{shards}.jsonl")
    if not args.analyse:
        lm = locedit.load(args.model)
        done = {(r["fact"], r["control"]) for r in all_rows(args.out)}
        with path.open("a") as f:
            def write(row):
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(f"{row['split']:8s} fact {row['fact']:>5s} {row['control']:16s} "
                      + (row.get("error") or f"behaviour {row['behaviour_passed']} mechanism "
                         f"{row['mechanism_passed']} ({row['edit_s']:.1f} + {row['measure_s']:.1f} s)"), flush=True)
            for fact, split in load_facts(args.n)[shard::shards]:
                todo = [c for c in args.controls if (str(fact.meta["id"]), c) not in done]
                if todo:
                    run_fact(lm, fact, split, todo, write)
    summary = analyse(all_rows(args.out))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "summary.md").write_text(summary_md(summary))
    print(summary_md(summary))


if __name__ == "__main__":
    main()

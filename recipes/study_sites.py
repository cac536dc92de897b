"""Study: does localization inform editing? Located edit sites vs fixed, random and oracle sites on SmolLM2.

    python recipes/study_sites.py [--jobs 2] [--tuning-facts 12] [--sweep-stride 3] [--facts 30]
        [--policies located,fixed,fixed_carrier,random,located_no_l0,located_subject_last]
        [--oracle-facts 6] [--oracle-stride 3] [--head-facts 15] [--sequential 20] [--seq-every 5]
        [--stop-at 10:10] [--summary-only]

Facts: the curated facts SmolLM2 knows (top-1) that have a `target_new`, split by a fixed relation-stratified hash
(per relation, facts sorted by sha256(id); the first 30% are **tuning**, the rest **held-out**). Every edit is
ROME (r-ROME fix, default hyper-parameters, the same cached key statistics) of one fact to its `target_new`,
measured on the edited model and reverted. Phases (each resumable: rows are appended to
`data/results/study/rows-<pid>.jsonl` and a row's `key` is never run twice; SiteMaps are cached in `sites/`):

1. tuning: `locate` each tuning fact (for the regression) and edit it at every `--sweep-stride`-th layer with
   ROME's subject-last key; the **fixed** layer is the layer with the best mean S on the tuning split.
2. held-out policies: located (locate's top-ranked MLP layer, `located_layers`, carrier key), located_subject_last, located_no_l0 (the
   best-ranked MLP layer other than 0, carrier key), fixed (the tuned layer, subject-last key: ROME/EasyEdit
   practice), fixed_carrier (tuned layer, carrier key), random (a uniform layer per fact, seeded by its id, carrier
   key).
3. oracle: on the first `--oracle-facts` held-out facts, every `--oracle-stride`-th layer (subject-last key); the
   oracle is the best layer of that sweep (by S, then PS, ES, NS, efficacy margin).
   heads: on `--head-facts` held-out facts, a head edit (`method="head"`) of locate's 3 extraction heads vs 3
   random heads in the same layers vs 3 random heads anywhere; the MLP comparison is the located ROME row.
4. sequential: `--sequential N` facts edited one after another (no revert) with MEMIT (5-layer window ending at the
   fixed layer, subject-last keys), MEMIT + null-space projection (AlphaEdit) and ROME (located sites); every
   `--seq-every` edits: ES/PS/NS/S over all edits so far, neighbourhood accuracy, retention of a probe set of
   unedited tuning facts (P(true) > P(new)) and perplexity drift.

Per-edit metrics (whole-string P as ROME scores CounterFact): ES (prompt), PS (paraphrases), NS (neighbourhood,
P(true) > P(new)), S = harmonic mean of ES, PS, NS; EM = P(new) - P(true) on the prompt; generation efficacy
(greedy 10 tokens from the prompt contain the new target; `--gen-prompts K` adds paraphrases); NKL (KL of
next-token distributions on "<prompt> <new>. <neighbour>" before vs after, nats); GE (n-gram entropy of 30-token
greedy generations from the generation prompts; only with `--fluency`, it doubles the measuring time on this CPU);
perplexity drift on the first two texts of locedit's neutral sample. The mechanistic checks of `verify` (≈ 11 s per
edit) are not run here.

Statistics: mean and bootstrap 95% CI (scipy.stats.bootstrap, percentile, 2000 resamples) per policy on held-out
facts; paired differences over the facts both policies edited; a Hase-style regression on the sweep rows: R² of
S (and of the rewrite score) on layer identity alone vs layer identity + locate's layer score.
Outputs: data/results/study/{rows-*.jsonl, sites/, summary.json, summary.md, *.png}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import pickle
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "results" / "study"
MODEL = "smollm2-135m"
HELD_OUT_POLICIES = ("located", "fixed", "fixed_carrier", "random", "located_no_l0", "located_subject_last")
METRICS = ("S", "ES", "PS", "NS", "EM", "gen_efficacy", "NKL", "GE_delta", "ppl_drift")
PAIRS = (("located", "fixed"), ("located", "fixed_carrier"), ("located", "random"), ("located", "oracle"),
         ("located_no_l0", "fixed"), ("located_no_l0", "located"), ("located", "located_subject_last"),
         ("fixed_carrier", "fixed"), ("head_located", "head_random_same_layers"),
         ("head_located", "head_random_any"), ("head_located", "located"))


# --- statistics helpers (no torch; tested in tests/test_study.py) -------------------------------------------------
def fact_hash(fact_id) -> str:
    return hashlib.sha256(str(fact_id).encode()).hexdigest()


def split_facts(items, *, tuning_fraction: float = 0.3, key=lambda x: x["id"], relation=lambda x: x["relation"]):
    """Relation-stratified deterministic split: per relation, items sorted by sha256(id); the first
    round(fraction × n) are tuning, the rest held-out. Returns (tuning, held_out), each sorted by hash."""
    by_relation: dict[str, list] = {}
    for item in items:
        by_relation.setdefault(relation(item) or "-", []).append(item)
    tuning, held_out = [], []
    for name in sorted(by_relation):
        group = sorted(by_relation[name], key=lambda x: fact_hash(key(x)))
        k = int(round(tuning_fraction * len(group)))
        tuning += group[:k]
        held_out += group[k:]
    order = lambda x: fact_hash(key(x))  # noqa: E731
    return sorted(tuning, key=order), sorted(held_out, key=order)


def stratified_subset(items, n: int, *, key=lambda x: x["id"], relation=lambda x: x["relation"]):
    """`n` items, round-robin over relations (each relation in hash order): the same subset on every run."""
    by_relation: dict[str, list] = {}
    for item in sorted(items, key=lambda x: fact_hash(key(x))):
        by_relation.setdefault(relation(item) or "-", []).append(item)
    lists = [list(by_relation[r]) for r in sorted(by_relation)]
    chosen = []
    while len(chosen) < n and any(lists):
        for group in lists:
            if group and len(chosen) < n:
                chosen.append(group.pop(0))
    return chosen


def bootstrap_ci(values, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0):
    """(mean, low, high) of the values; the percentile bootstrap CI (scipy.stats.bootstrap). A constant sample
    gets a zero-width interval; fewer than 2 values get (mean, None, None)."""
    from scipy.stats import bootstrap

    x = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], float)
    if x.size == 0:
        return None, None, None
    mean = float(x.mean())
    if x.size < 2:
        return mean, None, None
    if np.allclose(x, x[0]):
        return mean, mean, mean
    res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=resamples, method="percentile",
                    random_state=np.random.default_rng(seed))
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_difference(a: dict, b: dict, **kw) -> dict:
    """Paired difference a − b over the keys both have (non-None): n, mean, bootstrap CI, wins/ties/losses."""
    keys = sorted(k for k in a if k in b and a[k] is not None and b[k] is not None)
    diffs = [float(a[k]) - float(b[k]) for k in keys]
    mean, lo, hi = bootstrap_ci(diffs, **kw)
    return {"n": len(keys), "mean": mean, "low": lo, "high": hi,
            "wins": sum(d > 1e-9 for d in diffs), "ties": sum(abs(d) <= 1e-9 for d in diffs),
            "losses": sum(d < -1e-9 for d in diffs),
            "excludes_zero": bool(lo is not None and (lo > 0 or hi < 0))}


def paired_by_layer_band(a: dict, b: dict, bands, metric: str = "S", **kw) -> dict:
    """Paired difference a − b of `metric` per band of a's edit layer. `a`, `b`: {fact: row with "layer" and
    metric}; `bands`: [(first, last), …] inclusive. Returns {"first–last": paired_difference}."""
    out = {}
    for first, last in bands:
        in_band = {f: r for f, r in a.items() if r.get("layer") is not None and first <= int(r["layer"]) <= last}
        out[f"{first}–{last}" if last != first else str(first)] = paired_difference(
            {f: r.get(metric) for f, r in in_band.items()}, {f: r.get(metric) for f, r in b.items()}, **kw)
    return out


def hase_regression(rows, *, outcome: str = "S", score: str = "loc_score", folds: int = 5) -> dict:
    """Hase et al.'s question on sweep rows {fact, layer, outcome, score}: how much variance of the outcome does
    locate's score explain beyond layer identity? In-sample R² of OLS on layer one-hots, on the score alone, on
    both, and the increment; plus the same by fact-grouped cross-validation."""
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import GroupKFold

    rows = [r for r in rows if r.get(outcome) is not None and r.get(score) is not None]
    if len(rows) < 4:
        return {"n": len(rows)}
    y = np.array([float(r[outcome]) for r in rows])
    layers = sorted({r["layer"] for r in rows})
    onehot = np.array([[float(r["layer"] == l) for l in layers] for r in rows])
    s = np.array([[float(r[score])] for r in rows])
    designs = {"layer": onehot, "score": s, "layer+score": np.hstack([onehot, s])}
    out: dict = {"n": len(rows), "facts": len({r["fact"] for r in rows}), "layers": layers, "outcome": outcome,
                 "score": score}
    for name, x in designs.items():
        model = LinearRegression().fit(x, y)
        out[f"r2_{name}"] = float(model.score(x, y)) if y.var() > 0 else 0.0
        if name == "score":
            out["score_coef"] = float(model.coef_[0])
    out["r2_increment"] = out["r2_layer+score"] - out["r2_layer"]
    groups = np.array([str(r["fact"]) for r in rows])
    k = min(folds, len(set(groups)))
    if k >= 2 and y.var() > 0:
        for name, x in designs.items():
            pred = np.zeros_like(y)
            for train, test in GroupKFold(n_splits=k).split(x, y, groups):
                pred[test] = LinearRegression().fit(x[train], y[train]).predict(x[test])
            out[f"cv_r2_{name}"] = float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    if len(set(s[:, 0])) > 1 and y.var() > 0:
        out["pearson_score_outcome"] = float(np.corrcoef(s[:, 0], y)[0, 1])
    return out


def within_fact_correlation(rows, *, outcome: str = "S", score: str = "loc_score") -> dict:
    """Per fact, Spearman's ρ over its swept layers between locate's layer score and the edit outcome, and the same
    for "earlier is better" (−layer); the mean of each over facts (bootstrap CI) and their paired difference. Facts
    whose outcome (or score) is the same at every layer have no ranking to predict and are counted apart."""
    from scipy.stats import spearmanr

    by_fact: dict[str, list] = {}
    for r in rows:
        if r.get(outcome) is not None and r.get(score) is not None:
            by_fact.setdefault(str(r["fact"]), []).append(r)
    rho_score, rho_depth, flat = {}, {}, 0
    for fact, rs in by_fact.items():
        y = [float(r[outcome]) for r in rs]
        x = [float(r[score]) for r in rs]
        if len(rs) < 3 or len(set(y)) < 2 or len(set(x)) < 2:
            flat += 1
            continue
        rho_score[fact] = float(spearmanr(x, y).statistic)
        rho_depth[fact] = float(spearmanr([-r["layer"] for r in rs], y).statistic)
    out = {"facts": len(by_fact), "flat": flat, "n": len(rho_score), "per_fact_score": rho_score,
           "per_fact_depth": rho_depth}
    for name, d in (("score", rho_score), ("depth", rho_depth)):
        mean, lo, hi = bootstrap_ci(list(d.values()))
        out[name] = {"mean": mean, "low": lo, "high": hi}
    out["score_minus_depth"] = paired_difference(rho_score, rho_depth)
    return out


def best_row(rows):
    """The oracle's pick among sweep rows of one fact: highest (S, PS, ES, NS, EM)."""
    def k(r):
        return tuple(-1e9 if r.get(m) is None else r[m] for m in ("S", "PS", "ES", "NS", "EM"))
    return max(rows, key=k) if rows else None


def random_layer(fact_id, num_layers: int) -> int:
    return int(fact_hash(f"layer:{fact_id}")[:8], 16) % num_layers


def random_heads(fact_id, located, num_layers: int, num_heads: int, same_layers: bool):
    """As many random heads as `located`: in the located heads' layers (one per located head), or anywhere;
    never a located head, no duplicates; seeded by the fact id."""
    rng = np.random.default_rng(int(fact_hash(f"heads:{fact_id}:{same_layers}")[:8], 16))
    taken = {tuple(h) for h in located}
    out = []
    for layer, _ in located:
        while True:
            cand = (int(layer) if same_layers else int(rng.integers(num_layers)), int(rng.integers(num_heads)))
            if cand not in taken:
                taken.add(cand)
                out.append(list(cand))
                break
    return out


# --- worker side -------------------------------------------------------------------------------------------------
_W: dict = {}


def _init(threads: int, out: str, stop_at: float | None, fluency: bool = False, gen_prompts: int = 1) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    import locedit
    from locedit.core.datasets import curated_facts
    from locedit.editing.stats import key_statistics

    torch.set_num_threads(threads)
    lm = locedit.load(MODEL)
    _W.update(lm=lm, out=Path(out), stop_at=stop_at, before={}, fluency=fluency, gen_prompts=gen_prompts,
              stats=key_statistics(lm, layers=range(lm.num_layers), kinds=("mlp", "attn_out"), progress=False),
              facts={str(f.meta.get("id")): f for f in curated_facts()},
              shard=Path(out) / f"rows-{os.getpid()}.jsonl")


def _late() -> bool:
    return _W["stop_at"] is not None and time.time() > _W["stop_at"]


def _write(row: dict) -> None:
    with open(_W["shard"], "a") as f:
        f.write(json.dumps(row) + "\n")


def _sitemap(fact_id: str):
    path = _W["out"] / "sites" / f"{fact_id}.pkl"
    if path.is_file():
        try:
            return pickle.loads(path.read_bytes())
        except Exception:  # noqa: BLE001 - a torn cache file is recomputed
            pass
    from locedit.localization.sites import locate

    t = time.perf_counter()
    sm = locate(_W["lm"], _W["facts"][fact_id])
    sm.evidence["locate_s"] = time.perf_counter() - t
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(pickle.dumps(sm))
    tmp.replace(path)
    return sm


def _probe_inputs(fact):
    new = " " + fact.meta["target_new"].strip()
    true = fact.target_text()
    prompts = [fact.prompt] + list(fact.meta.get("paraphrases") or [])
    neighbours = list(fact.meta.get("neighborhood") or [])
    prefixed = [f"{fact.prompt}{new}. {n}" for n in neighbours]
    return new, true, prompts, neighbours, prefixed


def _snapshot(fact) -> dict:
    """Everything measured on the model as it is now (edited or not) for one fact."""
    from locedit.verification import metrics as M

    lm = _W["lm"]
    new, true, prompts, neighbours, prefixed = _probe_inputs(fact)
    pairs = [(p, t) for p in prompts + neighbours for t in (new, true)]
    probs = M.target_probs(lm, pairs)
    gens = M.greedy_generate(lm, prompts[: _W.get("gen_prompts", 1)], 10)
    gen_prompts = list(fact.meta.get("generation_prompts") or []) if _W.get("fluency") else []
    fl = M.greedy_generate(lm, gen_prompts, 30) if gen_prompts else []
    return {"probs": probs, "gens": gens,
            "nt": M.next_token_logprobs(lm, prefixed) if prefixed else None,
            "GE": M.fluency([p + g for p, g in zip(gen_prompts, fl)]) if fl else None,
            "ppl": M.perplexity(lm, M.PERPLEXITY_TEXT[:2]), "k": len(prompts)}


def _metrics(fact, before: dict, after: dict) -> dict:
    from locedit.verification import metrics as M

    new = " " + fact.meta["target_new"].strip()
    p, k = after["probs"], after["k"]
    pn, pt = p[0::2], p[1::2]
    es, em = M.success_and_magnitude(pn[:1], pt[:1])
    ps, pm = M.success_and_magnitude(pn[1:k], pt[1:k])
    ns, nm = M.success_and_magnitude(pt[k:], pn[k:])
    b = before["probs"]
    ns_before, _ = M.success_and_magnitude(b[1::2][k:], b[0::2][k:])
    p_new_before = float(b[0])
    rewrite = (float(pn[0]) - p_new_before) / max(1e-9, 1 - p_new_before)
    nkl = None
    if before["nt"] is not None:
        nkl = float(np.mean(M.kl_divergence(before["nt"], after["nt"])))
    return {"ES": es, "EM": em, "PS": ps, "PM": pm, "NS": ns, "NM": nm, "NS_before": ns_before,
            "S": M.harmonic_mean([es, ps, ns]), "rewrite_score": rewrite,
            "gen_efficacy": float(np.mean([M.contains_target(g, new) for g in after["gens"]])),
            "generation": after["gens"][0], "NKL": nkl, "GE": after["GE"], "GE_before": before["GE"],
            "GE_delta": None if after["GE"] is None or before["GE"] is None else after["GE"] - before["GE"],
            "ppl_drift": after["ppl"] / before["ppl"] - 1}


def _before(fact_id: str) -> dict:
    if fact_id not in _W["before"]:
        _W["before"][fact_id] = _snapshot(_W["facts"][fact_id])
    return _W["before"][fact_id]


def _edit_row(fact_id: str, phase: str, policy: str, *, method: str = "rome", layers=None, heads=None,
              key_position: str = "subject_last", sites=None, extra: dict | None = None) -> dict:
    import locedit

    lm, fact = _W["lm"], _W["facts"][fact_id]
    row = {"key": f"{phase}|{fact_id}|{policy}", "phase": phase, "policy": policy, "fact": fact_id,
           "relation": fact.relation, "subject": fact.subject, "method": method, "layer": None,
           "key_position": key_position, **(extra or {})}
    try:
        before = _before(fact_id)
        t = time.perf_counter()
        e = locedit.edit(lm, locedit.EditRequest(fact, fact.meta["target_new"]),
                         method=method, layers=layers, heads=heads,
                         key_position=None if method == "head" else key_position, sites=sites, stats=_W["stats"])
        row["edit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            after = _snapshot(fact)
        finally:
            e.revert()
        row["measure_s"] = time.perf_counter() - t
        row.update(_metrics(fact, before, after))
        row["layers"] = list(e.layers)
        row["layer"] = e.layers[0] if method != "head" else None
        row["heads"] = e.sites.get("heads")
        row["loss_final"] = float(e.losses[0][-1]) if getattr(e, "losses", None) else None
    except Exception as exc:  # noqa: BLE001 - a failed edit is recorded, never fatal to the study
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return row


def _loc_features(sm, layer: int) -> dict:
    by_layer = {m["layer"]: m for m in sm.mlp_layers}
    m = by_layer.get(layer, {})
    rank = [x["layer"] for x in sm.mlp_layers].index(layer) if layer in by_layer else None
    return {"loc_score": m.get("score"), "loc_rank": rank, "loc_trace": m.get("trace_effect"),
            "loc_knockout": m.get("knockout_change"), "loc_layer_knockout": m.get("layer_knockout_change")}


def run_task(task: dict) -> list[str]:
    """One unit of work; writes rows as they finish, returns their keys."""
    done: list[str] = []
    kind, fid = task["kind"], task.get("fact")
    lm = _W["lm"]
    if _late():
        return done

    def emit(row):
        _write(row)
        done.append(row["key"])
        err = f" ERROR {row['error']}" if row.get("error") else ""
        print(f"[{os.getpid()}] {row['key']} S={row.get('S')} ES={row.get('ES')} PS={row.get('PS')} "
              f"NS={row.get('NS')} layer={row.get('layer')} ({row.get('edit_s', 0):.0f} s){err}", flush=True)

    if kind == "locate":
        t = time.perf_counter()
        sm = _sitemap(fid)
        emit({"key": f"locate|{fid}", "phase": "locate", "fact": fid, "policy": "locate",
              "rec_layer": located_layer(sm), "carrier": sm.carrier.get("token"),
              "edit_s": time.perf_counter() - t})
    elif kind == "sweep":  # one (fact, layer) cell of a layer sweep, subject-last key
        sm = _sitemap(fid) if task.get("with_sites") else None
        extra = {"sweep_layer": task["layer"], **(_loc_features(sm, task["layer"]) if sm else {})}
        row = _edit_row(fid, task["phase"], f"L{task['layer']}", layers=[task["layer"]], extra=extra)
        emit(row)
    elif kind == "policies":
        sm = _sitemap(fid)
        rec = located_layer(sm)
        no_l0 = next(m["layer"] for m in sm.mlp_layers if m["layer"] != 0)
        fixed = task["fixed_layer"]
        plan = {"located": (rec, "carrier"), "located_subject_last": (rec, "subject_last"),
                "located_no_l0": (no_l0, "carrier"), "fixed": (fixed, "subject_last"),
                "fixed_carrier": (fixed, "carrier"), "random": (random_layer(fid, lm.num_layers), "carrier")}
        cache: dict = {}
        for policy in task["policies"]:
            if _late():
                break
            layer, kp = plan[policy]
            key = policy_key(fid, policy, layer)
            if key in task.get("done", ()):
                continue
            extra = {"rec_layer": rec, **_loc_features(sm, layer)}
            if (layer, kp) in cache:  # the same site as a policy already run: the same (deterministic) edit
                row = {**cache[(layer, kp)], "key": key, "policy": policy, "reused": True, **extra}
            else:
                row = _edit_row(fid, "heldout", policy, layers=[layer], key_position=kp, sites=sm, extra=extra)
                cache[(layer, kp)] = row
            emit(row)
    elif kind == "heads":
        sm = _sitemap(fid)
        located = [list(h) for h in sm.recommendation["head_edit"]["heads"]]
        plan = {"head_located": located,
                "head_random_same_layers": random_heads(fid, located, lm.num_layers, lm.num_heads, True),
                "head_random_any": random_heads(fid, located, lm.num_layers, lm.num_heads, False)}
        for policy, heads in plan.items():
            if _late():
                break
            if f"heldout|{fid}|{policy}" in task.get("done", ()):
                continue
            emit(_edit_row(fid, "heldout", policy, method="head", heads=heads,
                           extra={"head_scores": _head_scores(sm, heads)}))
    elif kind == "sequential":
        done += _sequential(task)
    return done


def located_layer(sm) -> int:
    """locate's top-ranked MLP layer (its `located_layers`: the recommendation itself may be a model's measured
    layer, `locedit.editing.measured`; SiteMaps cached before that field existed recommend the located layer)."""
    rank_one = sm.recommendation["rank_one"]
    return rank_one.get("located_layers", rank_one["layers"])[0]


def _head_scores(sm, heads) -> list:
    scores = {(h["layer"], h["head"]): h["score"] for h in sm.heads}
    return [scores.get((int(l), int(h))) for l, h in heads]


def sequential_key(chain: str, method: str, n: int) -> str:
    """A sequential checkpoint's key: the chain (its length and edit layer) is part of it, so a longer chain or a
    re-tuned layer never reuses a shorter chain's checkpoints."""
    return f"sequential|{chain}|{method}|{n}"


def _sequential(task: dict) -> list[str]:
    import locedit
    from locedit.verification import metrics as M

    lm, method = _W["lm"], task["method"]
    ids, probe_ids, known = task["facts"], task["probes"], set(task["known"])
    fixed, chain = task["fixed_layer"], task["chain"]
    window = list(range(max(0, fixed - 4), fixed + 1))
    base_ppl = M.perplexity(lm)
    edits, edited, keys = [], [], []
    edit_seconds = 0.0

    def measure(n: int) -> dict:
        es, ps, ns, known_s = [], [], [], []
        for fid in edited:
            new, true, prompts, neighbours, _ = _probe_inputs(_W["facts"][fid])
            p = M.target_probs(lm, [(q, t) for q in prompts + neighbours for t in (new, true)])
            k = len(prompts)
            fact_rates = ([float(p[0] > p[1])], [float(a > b) for a, b in zip(p[2:2 * k:2], p[3:2 * k:2])],
                          [float(b > a) for a, b in zip(p[2 * k::2], p[2 * k + 1::2])])
            es += fact_rates[0]
            ps += fact_rates[1]
            ns += fact_rates[2]
            if fid in known:
                known_s.append(fact_rates)
        probe = []
        for fid in probe_ids:
            f = _W["facts"][fid]
            p = M.target_probs(lm, [(f.prompt, f.target_text()), (f.prompt, " " + f.meta["target_new"].strip())])
            probe.append(float(p[0] > p[1]))
        rates = [float(np.mean(x)) if x else None for x in (es, ps, ns)]
        known_rates = [float(np.mean(sum((r[i] for r in known_s), []))) if known_s else None for i in range(3)]
        return {"key": sequential_key(chain, method, n), "phase": "sequential", "chain": chain, "policy": method,
                "n_edits": n, "attempted": task["attempted"], "ES": rates[0], "PS": rates[1], "NS": rates[2],
                "S": M.harmonic_mean(rates), "n_known": len(known_s), "S_known": M.harmonic_mean(known_rates),
                "NS_known": known_rates[2], "probe_retention": float(np.mean(probe)) if probe else None,
                "ppl_drift": M.perplexity(lm) / base_ppl - 1, "layers": window if method != "rome" else [fixed],
                "edit_s_mean": edit_seconds / max(1, n), "t": time.time()}

    task["attempted"] = 0
    try:
        for fid in ids:
            if _late():
                break
            fact = _W["facts"][fid]
            task["attempted"] += 1
            t0 = time.perf_counter()
            try:
                if method == "rome":  # the default ROME site on SmolLM2: the measured layer, subject-last key
                    e = locedit.edit(lm, locedit.EditRequest(fact, fact.meta["target_new"]),
                                     layers=[fixed], key_position="subject_last",
                                     stats=_W["stats"])
                else:
                    hp = {"nullspace": True} if method == "memit_nullspace" else None
                    e = locedit.edit(lm, [locedit.EditRequest(fact, fact.meta["target_new"])],
                                     method="memit", layers=window,
                                          key_position="subject_last", hparams=hp, stats=_W["stats"])
                edits.append(e)
                edited.append(fid)
            except Exception as exc:  # noqa: BLE001
                print(f"[{os.getpid()}] sequential {method} {fid}: {type(exc).__name__}: {exc}", flush=True)
                continue
            finally:
                edit_seconds += time.perf_counter() - t0
            n = len(edited)
            if n == 1 or n % task["every"] == 0:
                row = measure(n)
                _write(row)
                keys.append(row["key"])
                print(f"[{os.getpid()}] sequential {method} n={n}: S={row['S']:.3f} NS={row['NS']:.3f} "
                      f"probe={row['probe_retention']} ppl {row['ppl_drift']:+.3f} "
                      f"({row['edit_s_mean']:.1f} s/edit)", flush=True)
        if edited and len(edited) % task["every"] != 0 and len(edited) != 1:
            row = measure(len(edited))
            _write(row)
            keys.append(row["key"])
    finally:
        for e in reversed(edits):
            e.revert()
    return keys


def chain_complete(rows, chain: str, method: str, n_facts: int) -> bool:
    """Whether a sequential chain ran to its end: one of its checkpoints attempted every fact (edits the model
    already made, which are skipped, make the last checkpoint's `n_edits` smaller than the chain)."""
    return any(r.get("phase") == "sequential" and r.get("chain") == chain and r.get("policy") == method
               and r.get("attempted", 0) >= n_facts for r in rows)


def sequential_chain(split: dict, extra: list[dict], n: int, probes: list[str]) -> list[str]:
    """The facts of a sequential chain, in order: the held-out facts, then the tuning facts outside the retention
    probes (all known at top-1), then, when `n` needs more, curated facts SmolLM2 does not know at top-1 (`extra`:
    id and relation), each group in relation-stratified hash order."""
    rel = split["relation"]
    as_items = lambda ids: [{"id": i, "relation": rel[i]} for i in ids]  # noqa: E731
    chain = [x["id"] for x in stratified_subset(as_items(split["held_out"]), len(split["held_out"]))]
    chain += [x["id"] for x in stratified_subset(as_items(split["tuning"]), len(split["tuning"]))
              if x["id"] not in probes]
    chain += [x["id"] for x in stratified_subset(extra, len(extra)) if x["id"] not in chain and x["id"] not in probes]
    return chain[:n]


# --- driver ------------------------------------------------------------------------------------------------------
def read_rows(out: Path) -> dict:
    rows = {}
    for shard in sorted(out.glob("rows-*.jsonl")):
        for line in shard.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("phase") == "heldout" and row.get("policy") in FIXED_POLICIES and row.get("layer") is not None:
                row["key"] = policy_key(row["fact"], row["policy"], row["layer"])  # rows written before keys had it
            if row.get("t", 0) >= rows.get(row["key"], {}).get("t", 0):  # a re-run's row replaces an older one
                rows[row["key"]] = row
    return rows


FIXED_POLICIES = ("fixed", "fixed_carrier")
LAYER_BANDS = ((1, 1), (2, 4), (5, 29))  # the tuned layer, the early band that edits well on tuning, the rest


def policy_key(fact_id: str, policy: str, layer: int | None) -> str:
    """A held-out row's key. The fixed policies' keys name their layer, so re-tuning the fixed layer re-runs them
    instead of reusing rows made at the old layer."""
    return f"heldout|{fact_id}|{policy}" + (f"|L{layer}" if policy in FIXED_POLICIES else "")


def choose_fixed(rows: dict, tuning_ids) -> tuple[int | None, dict]:
    sweep = [r for r in rows.values() if r["phase"] == "tuning" and r["fact"] in tuning_ids and "error" not in r]
    # only facts swept at every layer any fact was swept at: an interrupted sweep must not compare layers on
    # different facts
    layers = {r["layer"] for r in sweep}
    per_fact: dict[str, set] = {}
    for r in sweep:
        per_fact.setdefault(r["fact"], set()).add(r["layer"])
    complete = {f for f, ls in per_fact.items() if ls == layers}
    by_layer: dict[int, list] = {}
    for r in sweep:
        if r["fact"] in complete:
            by_layer.setdefault(r["layer"], []).append(r)
    table = {l: {m: float(np.mean([r[m] for r in rs if r.get(m) is not None] or [np.nan]))
                 for m in ("S", "ES", "PS", "NS", "EM", "PM", "NM")} | {"n": len(rs)}
             for l, rs in sorted(by_layer.items())}
    if not table:
        return None, table
    # best mean S; ties (rounded, so float summation order never decides) go to PS, ES, then the summed
    # margins EM + PM + NM (P(new) - P(true) on prompt and paraphrases, P(true) - P(new) on neighbours)
    margin = lambda t: sum(0.0 if math.isnan(t[m]) else t[m] for m in ("EM", "PM", "NM"))  # noqa: E731
    best = max(table, key=lambda l: (round(table[l]["S"], 9), round(table[l]["PS"], 9), round(table[l]["ES"], 9),
                                     margin(table[l]), -l))
    return best, table


def run_phase(pool, tasks, label: str) -> None:
    if not tasks:
        return
    print(f"== {label}: {len(tasks)} tasks", flush=True)
    t = time.time()
    for keys in pool.imap_unordered(run_task, tasks, chunksize=1):
        pass
    print(f"== {label} done in {time.time() - t:.0f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tuning-facts", type=int, default=12, help="tuning facts in the layer sweep (0: all)")
    p.add_argument("--sweep-stride", type=int, default=3)
    p.add_argument("--sweep-layers", default=None, help="explicit tuning sweep layers, e.g. 0,5,10,15")
    p.add_argument("--facts", type=int, default=30, help="held-out facts for the policies (0: all)")
    p.add_argument("--policies", default=",".join(HELD_OUT_POLICIES))
    p.add_argument("--fixed-layer", type=int, default=None, help="skip tuning's choice (for re-runs only)")
    p.add_argument("--oracle-facts", type=int, default=6)
    p.add_argument("--oracle-stride", type=int, default=3)
    p.add_argument("--head-facts", type=int, default=15)
    p.add_argument("--sequential", type=int, default=20, help="edits per sequential chain (0: skip)")
    p.add_argument("--seq-every", type=int, default=5)
    p.add_argument("--seq-methods", default="memit,memit_nullspace,rome")
    p.add_argument("--fluency", action="store_true", help="also GE (30-token generations; ~2x the measuring time)")
    p.add_argument("--gen-prompts", type=int, default=1,
                   help="generation efficacy from the prompt and the first K-1 paraphrases (default: prompt only)")
    p.add_argument("--stop-at", default=None, help="HH:MM (local clock): start no edit after it")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    stop_at = None
    if args.stop_at:
        hh, mm = map(int, args.stop_at.split(":"))
        stop_at = datetime.now().replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()

    split_path = out / "split.json"
    if split_path.is_file():
        split = json.loads(split_path.read_text())
    else:
        import torch

        import locedit
        from locedit.core.datasets import curated_facts, known_facts

        torch.set_num_threads(args.threads)
        lm = locedit.load(MODEL)
        known = [f for f in known_facts(lm, curated_facts(), progress=False) if f.meta.get("target_new")]
        items = [{"id": str(f.meta["id"]), "relation": f.relation or "-"} for f in known]
        tuning, held = split_facts(items)
        split = {"rule": "per relation, sha256(id) order; first round(0.3 n) tuning", "known": len(items),
                 "tuning": [x["id"] for x in tuning], "held_out": [x["id"] for x in held],
                 "relation": {x["id"]: x["relation"] for x in items}}
        split_path.write_text(json.dumps(split, indent=1))
        del lm
    rel = split["relation"]
    as_items = lambda ids: [{"id": i, "relation": rel[i]} for i in ids]  # noqa: E731
    tuning_ids = [x["id"] for x in (stratified_subset(as_items(split["tuning"]), args.tuning_facts)
                                     if args.tuning_facts else as_items(split["tuning"]))]
    held_ids = [x["id"] for x in (stratified_subset(as_items(split["held_out"]), args.facts)
                                   if args.facts else as_items(split["held_out"]))]
    print(f"{split['known']} known facts: {len(split['tuning'])} tuning / {len(split['held_out'])} held-out; "
          f"running {len(tuning_ids)} tuning, {len(held_ids)} held-out", flush=True)
    num_layers = 30
    config = {"argv": sys.argv[1:], "tuning_ids": tuning_ids, "held_ids": held_ids}

    if not args.summary_only:
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.jobs, initializer=_init, initargs=(args.threads, str(out), stop_at, args.fluency, args.gen_prompts)) as pool:
            rows = read_rows(out)
            sweep_layers = ([int(x) for x in args.sweep_layers.split(",")] if args.sweep_layers
                            else list(range(0, num_layers, args.sweep_stride)))
            tasks = [{"kind": "locate", "fact": f} for f in tuning_ids if f"locate|{f}" not in rows]
            tasks += [{"kind": "sweep", "phase": "tuning", "fact": f, "layer": l, "with_sites": True}
                      for f in tuning_ids for l in sweep_layers if f"tuning|{f}|L{l}" not in rows]
            # locate tasks first so the sweep rows of a fact find its SiteMap (a worker computes it otherwise)
            run_phase(pool, tasks, "tuning sweep")
            rows = read_rows(out)
            fixed, _ = choose_fixed(rows, set(tuning_ids))
            if args.fixed_layer is not None:
                fixed = args.fixed_layer
            print(f"fixed layer (best mean S on tuning): {fixed}", flush=True)
            policies = [x for x in args.policies.split(",") if x]
            tasks = [{"kind": "policies", "fact": f, "fixed_layer": fixed, "policies": policies,
                      "done": [k for k in rows if k.startswith(f"heldout|{f}|")]}
                     for f in held_ids if any(policy_key(f, pol, fixed) not in rows for pol in policies
                                              if pol in FIXED_POLICIES) or
                     any(f"heldout|{f}|{pol}" not in rows for pol in policies if pol not in FIXED_POLICIES)]
            run_phase(pool, tasks, "held-out policies")
            rows = read_rows(out)
            tasks = [{"kind": "heads", "fact": f, "done": [k for k in rows if k.startswith(f"heldout|{f}|head")]}
                     for f in held_ids[: args.head_facts]
                     if any(f"heldout|{f}|{p}" not in rows for p in ("head_located", "head_random_same_layers",
                                                                     "head_random_any"))]
            if args.sequential:
                probes = tuning_ids[:10]
                known_ids = set(split["tuning"]) | set(split["held_out"])
                from locedit.core.datasets import curated_facts

                extra = [{"id": str(f.meta["id"]), "relation": f.relation or "-"} for f in curated_facts()
                         if f.meta.get("target_new") and str(f.meta["id"]) not in known_ids]
                seq_ids = sequential_chain(split, extra, args.sequential, probes)
                chain = f"{len(seq_ids)}@L{fixed}"
                print(f"sequential chain {chain}: {sum(i in known_ids for i in seq_ids)} known facts, "
                      f"{sum(i not in known_ids for i in seq_ids)} not known at top-1", flush=True)
                for method in [m for m in args.seq_methods.split(",") if m]:
                    if not chain_complete(rows.values(), chain, method, len(seq_ids)):
                        tasks.append({"kind": "sequential", "method": method, "facts": seq_ids, "probes": probes,
                                      "known": sorted(known_ids & set(seq_ids)), "fixed_layer": fixed,
                                      "chain": chain, "every": args.seq_every})
            oracle_ids = held_ids[: args.oracle_facts]
            tasks += [{"kind": "sweep", "phase": "oracle", "fact": f, "layer": l, "with_sites": True}
                      for f in oracle_ids for l in range(0, num_layers, args.oracle_stride)
                      if f"oracle|{f}|L{l}" not in rows]
            run_phase(pool, tasks, "heads, sequential, oracle")
    summarize(out, config, tuning_ids, held_ids, args)


def latest_chains(rows: list[dict]) -> dict:
    """Per method, the checkpoints of its longest sequential chain (rows before chains were named count as one
    chain), in edit order."""
    chains: dict = {}
    for r in rows:
        chains.setdefault(r["policy"], {}).setdefault(r.get("chain", "unnamed"), []).append(r)
    out = {}
    for method, by_chain in chains.items():
        longest = max(by_chain.values(), key=lambda pts: max(p["n_edits"] for p in pts))
        out[method] = sorted(longest, key=lambda r: r["n_edits"])
    return out


# --- summary -----------------------------------------------------------------------------------------------------
def _fmt(mean, lo, hi, pct=True) -> str:
    if mean is None:
        return "–"
    f = 100 if pct else 1
    if lo is None:
        return f"{f * mean:.1f}" if pct else f"{mean:.3f}"
    return (f"{f * mean:.1f} [{f * lo:.1f}, {f * hi:.1f}]" if pct else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]")


def summarize(out: Path, config: dict, tuning_ids, held_ids, args) -> dict:
    rows = read_rows(out)
    ok = [r for r in rows.values() if "error" not in r]
    fixed, sweep_table = choose_fixed(rows, set(tuning_ids))
    if args.fixed_layer is not None:
        fixed = args.fixed_layer
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
            mean, lo, hi = bootstrap_ci([r.get(m) for r in by_fact.values()])
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
                d = paired_difference(da, db)
                if d["n"]:
                    summary["paired"].setdefault(f"{a} - {b}", {})[m] = d
    # where a located layer other than 0 helps or hurts: located_no_l0 − fixed by the band of its layer
    summary["no_l0_minus_fixed_by_band"] = {
        band: d for band, d in paired_by_layer_band(per_policy.get("located_no_l0", {}), per_policy.get("fixed", {}),
                                                    LAYER_BANDS).items() if d["n"]}
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
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    (out / "summary.md").write_text(markdown(summary))
    try:
        figures(summary, out)
    except Exception as exc:  # noqa: BLE001
        print(f"figures failed: {exc}")
    print(markdown(summary))
    return summary


LABELS = {"located": "located (locate's top layer, carrier key)", "located_subject_last": "located layer, subject-last key",
          "located_no_l0": "located excluding layer 0 (carrier key)", "fixed": "fixed layer (tuned), subject-last key",
          "fixed_carrier": "fixed layer (tuned), carrier key", "random": "random layer, carrier key",
          "oracle": "oracle (best of a layer sweep, subject-last)", "head_located": "head edit: 3 located heads",
          "head_random_same_layers": "head edit: 3 random heads, same layers",
          "head_random_any": "head edit: 3 random heads, any layers"}


def markdown(s: dict) -> str:
    lines = ["# Does localization inform editing? (SmolLM2-135M, ROME r-ROME fix; held-out facts)", "",
             f"Fixed layer chosen on the tuning split: **{s['fixed_layer']}**; run: `{' '.join(s['config']['argv'])}`",
             "", "Mean and bootstrap 95% CI, in % (NKL in nats, ppl drift in %):", "",
             "| policy | n | S | ES | PS | NS | gen. efficacy | NKL | ppl drift | layers used |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = [p for p in LABELS if p in s["policies"]]
    for name in order:
        e = s["policies"][name]
        cell = lambda m, pct=True: _fmt(e[m]["mean"], e[m]["low"], e[m]["high"], pct)  # noqa: E731
        layers = ", ".join(f"{l}×{c}" for l, c in list(e["layers"].items())[:5])
        lines.append(f"| {LABELS[name]} | {e['n']} | {cell('S')} | {cell('ES')} | {cell('PS')} | {cell('NS')} | "
                     f"{cell('gen_efficacy')} | {cell('NKL', False)} | {cell('ppl_drift')} | {layers} |")
    lines += ["", "Paired differences (same facts), percentage points, bootstrap 95% CI:", "",
              "| difference | n | ΔS | ΔPS | ΔNS | Δgen. efficacy | wins/ties/losses (S) |", "|---|---|---|---|---|---|---|"]
    for name, d in s["paired"].items():
        c = lambda m: _fmt(d[m]["mean"], d[m]["low"], d[m]["high"]) + (" *" if d[m]["excludes_zero"] else "") \
            if m in d else "–"  # noqa: E731
        lines.append(f"| {name} | {d['S']['n']} | {c('S')} | {c('PS')} | {c('NS')} | {c('gen_efficacy')} | "
                     f"{d['S']['wins']}/{d['S']['ties']}/{d['S']['losses']} |")
    same = s.get("located_at_fixed_layer") or {}
    if same.get("n"):
        lines += ["", f"Located chose the fixed layer ({s['fixed_layer']}) for {same['same_layer']} of the {same['n']} "
                      "held-out facts both policies edited."]
    if s.get("no_l0_minus_fixed_by_band"):
        lines += ["", "located_no_l0 − fixed (S, pp) by the layer located_no_l0 chose: " + "; ".join(
            f"L{band}: {_fmt(d['mean'], d['low'], d['high'])} (n={d['n']}, {d['wins']}/{d['ties']}/{d['losses']})"
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
                         f"{_fmt(w['score']['mean'], w['score']['low'], w['score']['high'], False)}, earlier-is-better "
                         f"(−layer) {_fmt(w['depth']['mean'], w['depth']['low'], w['depth']['high'], False)}; "
                         f"score − depth {_fmt(d['mean'], d['low'], d['high'], False)}")
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
                lines.append(f"| {m} | {p.get('chain', '–')} | {p['n_edits']} | {_pct(p['S'])} | "
                             f"{_pct(p.get('S_known'))} | {_pct(p['ES'])} | {_pct(p['PS'])} | {_pct(p['NS'])} | "
                             f"{_pct(p['probe_retention'])} | {100 * p['ppl_drift']:+.1f}% | "
                             f"{p['edit_s_mean']:.1f} |" if p.get("edit_s_mean") is not None else
                             f"| {m} | – | {p['n_edits']} | {_pct(p['S'])} | – | {_pct(p['ES'])} | {_pct(p['PS'])} | "
                             f"{_pct(p['NS'])} | {_pct(p['probe_retention'])} | {100 * p['ppl_drift']:+.1f}% | – |")
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


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}"


def figures(s: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [p for p in LABELS if p in s["policies"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for i, name in enumerate(order):
        e = s["policies"][name]["S"]
        if e["mean"] is None:
            continue
        err = [[e["mean"] - (e["low"] if e["low"] is not None else e["mean"])],
               [(e["high"] if e["high"] is not None else e["mean"]) - e["mean"]]]
        ax.bar(i, e["mean"], yerr=err, capsize=3,
               color="C0" if name.startswith("located") else "C2" if name.startswith("head") else "C1")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("S (held-out), 95% CI")
    ax.set_title("policies")
    ax = axes[1]
    sweep = s["tuning_sweep"]
    if sweep:
        ls = sorted(int(l) for l in sweep)
        for m in ("S", "ES", "PS", "NS"):
            ax.plot(ls, [sweep[l if l in sweep else str(l)][m] for l in ls], marker="o", label=m)
        ax.axvline(s["fixed_layer"], color="k", ls=":")
        ax.set_xlabel("layer (tuning split, subject-last key)")
        ax.legend(fontsize=8)
        ax.set_title("tuning sweep")
    ax = axes[2]
    names = [n for n in s["paired"] if "S" in s["paired"][n] and s["paired"][n]["S"]["low"] is not None]
    for i, name in enumerate(names):
        d = s["paired"][name]["S"]
        ax.errorbar(d["mean"], i, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o", capsize=3,
                    color="C3" if d["excludes_zero"] else "k")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("paired difference in S (held-out), 95% CI")
    ax.set_title("paired differences")
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=120)
    plt.close(fig)
    if s.get("sequential"):
        sequential_figure(s["sequential"], out / "sequential.png")


def sequential_figure(chains: dict, path: Path) -> None:
    """S and NS over the edits so far, retention of the unedited probe facts, and perplexity drift, against the
    number of edits applied, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("S", "S over the edits so far"), ("NS", "neighbourhood accuracy (NS)"),
              ("probe_retention", "unedited probe facts retained"), ("ppl_drift", "perplexity drift"))
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 4.2))
    for ax, (metric, title) in zip(axes, panels):
        for method, pts in chains.items():
            ax.plot([p["n_edits"] for p in pts], [p[metric] for p in pts], marker="o", ms=3, label=method)
        ax.set_xlabel("edits applied, one after another")
        ax.set_title(title)
        if metric != "ppl_drift":
            ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

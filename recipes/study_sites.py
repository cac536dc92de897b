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
The split, policies, row store, statistics and report live in `locedit.study`; this script runs the edits.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from locedit.study import (FIXED_POLICIES, HELD_OUT_POLICIES, chain_complete, choose_fixed, located_layer,
                           markdown, policy_key, read_rows, rows_store, sequential_chain, sequential_key,
                           split_facts, stratified_subset, summarize)
from locedit.study.measure import edit_metrics, probe_inputs, snapshot
from locedit.study.policies import HEAD_POLICIES, head_scores, head_sites, loc_features, policy_sites

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "results" / "study"
MODEL = "smollm2-135m"


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
              shard=rows_store(out).shard(os.getpid()))


def _late() -> bool:
    return _W["stop_at"] is not None and time.time() > _W["stop_at"]


def _write(row: dict) -> None:
    _W["shard"].append(row)


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


def _snapshot(fact) -> dict:
    return snapshot(_W["lm"], fact, gen_prompts=_W.get("gen_prompts", 1), fluency=_W.get("fluency", False))


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
        row.update(edit_metrics(fact, before, after))
        row["layers"] = list(e.layers)
        row["layer"] = e.layers[0] if method != "head" else None
        row["heads"] = e.sites.get("heads")
        row["loss_final"] = float(e.losses[0][-1]) if getattr(e, "losses", None) else None
    except Exception as exc:  # noqa: BLE001 - a failed edit is recorded, never fatal to the study
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return row



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
        extra = {"sweep_layer": task["layer"], **(loc_features(sm, task["layer"]) if sm else {})}
        row = _edit_row(fid, task["phase"], f"L{task['layer']}", layers=[task["layer"]], extra=extra)
        emit(row)
    elif kind == "policies":
        sm = _sitemap(fid)
        rec = located_layer(sm)
        plan = policy_sites(sm, fid, task["fixed_layer"], lm.num_layers)
        cache: dict = {}
        for policy in task["policies"]:
            if _late():
                break
            layer, kp = plan[policy]
            key = policy_key(fid, policy, layer)
            if key in task.get("done", ()):
                continue
            extra = {"rec_layer": rec, **loc_features(sm, layer)}
            if (layer, kp) in cache:  # the same site as a policy already run: the same (deterministic) edit
                row = {**cache[(layer, kp)], "key": key, "policy": policy, "reused": True, **extra}
            else:
                row = _edit_row(fid, "heldout", policy, layers=[layer], key_position=kp, sites=sm, extra=extra)
                cache[(layer, kp)] = row
            emit(row)
    elif kind == "heads":
        sm = _sitemap(fid)
        for policy, heads in head_sites(sm, fid, lm.num_layers, lm.num_heads).items():
            if _late():
                break
            if f"heldout|{fid}|{policy}" in task.get("done", ()):
                continue
            emit(_edit_row(fid, "heldout", policy, method="head", heads=heads,
                           extra={"head_scores": head_scores(sm, heads)}))
    elif kind == "sequential":
        done += _sequential(task)
    return done




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
            new, true, prompts, neighbours, _ = probe_inputs(_W["facts"][fid])
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



# --- driver ------------------------------------------------------------------------------------------------------
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

    def as_items(ids):
        return [{"id": i, "relation": rel[i]} for i in ids]

    tuning_ids = [x["id"] for x in (stratified_subset(as_items(split["tuning"]), args.tuning_facts)
                                     if args.tuning_facts else as_items(split["tuning"]))]
    held_ids = [x["id"] for x in (stratified_subset(as_items(split["held_out"]), args.facts)
                                   if args.facts else as_items(split["held_out"]))]
    print(f"{split['known']} known facts: {len(split['tuning'])} tuning / {len(split['held_out'])} held-out; "
          f"running {len(tuning_ids)} tuning, {len(held_ids)} held-out", flush=True)
    num_layers = model_num_layers(MODEL)
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
                     if any(f"heldout|{f}|{p}" not in rows for p in HEAD_POLICIES)]
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
    write_summary(out, summarize(read_rows(out), config, tuning_ids, held_ids, num_layers=num_layers,
                                 fixed_layer=args.fixed_layer))


def model_num_layers(spec: str) -> int:
    """The model's layer count from its config (only the config file is read when locedit has the model cached)."""
    from transformers import AutoConfig

    from locedit.core.loading import ALIASES, cache_dir

    local = cache_dir() / spec if spec in ALIASES else Path(spec)
    if (local / "config.json").is_file() or spec not in ALIASES:
        config = AutoConfig.from_pretrained(local if local.is_dir() else spec)
        return int(getattr(config, "num_hidden_layers", None) or config.get_text_config().num_hidden_layers)
    import locedit

    return locedit.load(spec).num_layers


def write_summary(out: Path, summary: dict) -> None:
    """summary.json, summary.md and the figures of a summary, and the Markdown on stdout."""
    from locedit.core.results import write_atomic
    from locedit.study.figures import figures

    write_atomic(out / "summary.json", json.dumps(summary, indent=1, default=float))
    write_atomic(out / "summary.md", markdown(summary))
    try:
        figures(summary, out)
    except Exception as exc:  # noqa: BLE001 - a figure never loses the summary
        print(f"figures failed: {exc}")
    print(markdown(summary))



if __name__ == "__main__":
    main()

"""Editing benchmark on SmolLM2 (CPU): speed of each method as a ratio to a clean forward measured in the same run,
and the quality of ROME at the located site on facts the model knows (ES / PS / NS, whole-string probabilities).

    python recipes/bench_edit.py speed [--facts 3] [--memit-facts 100] [--record]
    python recipes/bench_edit.py quality [--n 40] [--jobs 2] [--method rome|head] [--record]   # resumable:
                                                                        # data/results/edit_quality/[method/]

Speed: key statistics are computed (and cached) first and reported apart; ROME, head and MEMIT times exclude
`locate` (its time is reported on its own line). Key statistics, one pass vs one pass per layer, have their own
recipe: recipes/bench_stats.py.
Quality: each fact is edited alone (apply, measure, revert) to its CounterFact `target_new`, at the site `locate`
recommends (layer and carrier key position), with ROME's default hyper-parameters. ES = 1[P(new) > P(true)] on the
prompt, PS the same over its paraphrases, NS = 1[P(true) > P(new)] over the neighbourhood prompts (other subjects,
same true attribute), P = exp(-mean token NLL) of the whole target string, all measured on the model as edited;
NS before the edit is reported too (it is not always 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "results"


def clean_forward_ms(lm, repeats: int = 10) -> float:
    ids = torch.tensor([lm.encode(locedit_fact()).input_ids])
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            lm.model(input_ids=ids)
            best = min(best, time.perf_counter() - t)
    return best * 1000


def locedit_fact():
    from locedit import Fact

    return Fact("The Eiffel Tower", "The Eiffel Tower is located in the city of", " Paris")


def known_curated(lm, progress: bool = False):
    from locedit.core.datasets import curated_facts, known_facts

    return [f for f in known_facts(lm, curated_facts(), progress=progress) if f.meta.get("target_new")]


def stratified(facts, n: int):
    """`n` facts, round-robin over relations in a fixed hash order (the same subset on every run)."""
    by_relation: dict[str, list] = {}
    for f in sorted(facts, key=lambda f: hashlib.sha256(str(f.meta.get("id")).encode()).hexdigest()):
        by_relation.setdefault(f.relation or "-", []).append(f)
    chosen, lists = [], [by_relation[r] for r in sorted(by_relation)]
    while len(chosen) < n and any(lists):
        for items in lists:
            if items and len(chosen) < n:
                chosen.append(items.pop(0))
    return chosen


# --- speed -------------------------------------------------------------------------------------------------------
def speed(args) -> list[str]:
    import locedit
    from locedit.editing.stats import key_statistics
    from locedit.localization.sites import locate

    torch.set_num_threads(args.threads)
    lm = locedit.load("smollm2-135m")
    unit = clean_forward_ms(lm)
    lines = [f"model smollm2-135m, CPU, {args.threads} torch thread(s); one clean forward of the 10-token prompt: "
             f"{unit:.1f} ms (best of 10)"]
    facts = stratified(known_curated(lm), max(args.facts, args.memit_facts))
    t = time.perf_counter()
    stats = key_statistics(lm, layers=range(lm.num_layers), kinds=("mlp", "attn_out"), progress=False)
    lines.append(f"key statistics, all {lm.num_layers} layers (mlp + attn_out), {stats.tokens} tokens of the default "
                 f"corpus: {time.perf_counter() - t:.1f} s (0 when cached; first run samples the corpus)")
    rome_s, head_s, locate_s = [], [], []
    for fact in facts[: args.facts]:
        t = time.perf_counter()
        sites = locate(lm, fact)
        locate_s.append(time.perf_counter() - t)
        for method, store in (("rome", rome_s), ("head", head_s)):
            t = time.perf_counter()
            edit = locedit.edit(lm, locedit.EditRequest(fact, fact.meta["target_new"]),
                                method=method, sites=sites, stats=stats)
            store.append(time.perf_counter() - t)
            edit.revert()
    for name, values in (("locate", locate_s), ("ROME edit (located site, stats cached)", rome_s),
                         ("head edit (3 located heads, out mode)", head_s)):
        mean = statistics.mean(values)
        lines.append(f"{name}: {mean:.1f} s per fact = {1000 * mean / unit:.0f} clean forwards "
                     f"(mean of {len(values)}: {', '.join(f'{v:.1f}' for v in values)})")
    if args.memit_facts:
        batch = facts[: args.memit_facts]
        t = time.perf_counter()
        edit = locedit.edit(lm, [locedit.EditRequest(f, f.meta["target_new"]) for f in batch], method="memit",
                                 layers=[0, 1, 2, 3, 4], key_position="subject_last", stats=stats)
        total = time.perf_counter() - t
        edit.revert()
        lines.append(f"MEMIT, {len(batch)} facts in one update (layers 0-4): {total:.1f} s total, "
                     f"{total / len(batch):.2f} s per fact = {1000 * total / len(batch) / unit:.0f} clean forwards "
                     f"per fact (z optimisation {edit.timings['values_s']:.1f} s)")
    return lines


# --- quality -----------------------------------------------------------------------------------------------------
def measure_one(lm, fact, method: str = "rome") -> dict:
    import locedit
    from locedit.verification.metrics import target_probs

    true, new = fact.target_text(), " " + fact.meta["target_new"].strip()
    prompts = [fact.prompt] + list(fact.meta.get("paraphrases") or [])
    neighbours = list(fact.meta.get("neighborhood") or [])
    pairs = [(p, t) for p in prompts + neighbours for t in (new, true)]

    def score() -> list[float]:
        return [float(x) for x in target_probs(lm, pairs)]

    before = score()
    t = time.perf_counter()
    edit = locedit.edit(lm, locedit.EditRequest(fact, new), method=method)
    seconds = time.perf_counter() - t
    after = score()
    edit.revert()
    k = len(prompts)

    def rates(p, first_new: bool, lo: int, hi: int) -> float | None:
        rows = [(p[2 * i], p[2 * i + 1]) for i in range(lo, hi)]
        if not rows:
            return None
        return sum((a > b) if first_new else (b > a) for a, b in rows) / len(rows)

    return {"id": fact.meta.get("id"), "relation": fact.relation, "subject": fact.subject,
            "true": true, "new": new, "method": method, "layer": edit.layers[0], "heads": edit.sites.get("heads"),
            "key_position": edit.sites["key_position"],
            "ES": rates(after, True, 0, 1), "PS": rates(after, True, 1, k), "NS": rates(after, False, k, len(pairs) // 2),
            "NS_before": rates(before, False, k, len(pairs) // 2), "edit_s": seconds,
            "loss_final": edit.losses[0][-1]}


def _quality_worker(rank: int, jobs: int, ids: list, path: str, threads: int, method: str) -> None:
    import locedit

    torch.set_num_threads(threads)
    lm = locedit.load("smollm2-135m")
    wanted = {i for j, i in enumerate(ids) if j % jobs == rank}
    facts = [f for f in known_curated(lm) if f.meta.get("id") in wanted]
    with open(path, "a") as out:
        for fact in facts:
            row = measure_one(lm, fact, method)
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"[{rank}] {row['id']} {row['relation']}: ES {row['ES']} PS {row['PS']:.2f} NS {row['NS']:.2f} "
                  f"layer {row['layer']} ({row['edit_s']:.0f} s)", flush=True)


def quality(args) -> list[str]:
    import locedit

    directory = OUT / "edit_quality" / ("" if args.method == "rome" else args.method)
    directory.mkdir(parents=True, exist_ok=True)
    lm = locedit.load("smollm2-135m")
    chosen = [f.meta["id"] for f in stratified(known_curated(lm), args.n)]
    del lm
    done = set()
    for shard in directory.glob("rows-*.jsonl"):
        for line in shard.read_text().splitlines():
            try:
                done.add(json.loads(line)["id"])
            except (ValueError, KeyError):
                continue
    todo = [i for i in chosen if i not in done]
    print(f"{len(chosen)} facts chosen, {len(done & set(chosen))} already done, {len(todo)} to run", flush=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_quality_worker, args=(r, args.jobs, todo, str(directory / f"rows-{r}.jsonl"),
                                                        args.threads, args.method)) for r in range(args.jobs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    rows = {}
    for shard in sorted(directory.glob("rows-*.jsonl")):
        for line in shard.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row["id"] in chosen:
                rows[row["id"]] = row
    return summarize(list(rows.values()), args.method)


def summarize(rows: list[dict], method: str = "rome") -> list[str]:
    def mean(key, subset):
        values = [r[key] for r in subset if r[key] is not None]
        return 100 * statistics.mean(values) if values else float("nan")

    what = {"rome": "ROME (r-ROME fix) at the located layer", "head": "head edits of the 3 located heads (out mode)",
            "memit": "MEMIT at the located window", "ft": "FT-L at the located layer"}[method]
    lines = [f"{what}, SmolLM2, {len(rows)} known facts edited one at a time to target_new; whole-string P; "
             "scores in %",
             f"{'relation':<22} {'n':>3} {'ES':>6} {'PS':>6} {'NS':>6} {'NS before':>10} {'edit s':>7}"]
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r["relation"], []).append(r)
    for name, subset in sorted(groups.items()) + [("ALL", rows)]:
        lines.append(f"{name:<22} {len(subset):>3} {mean('ES', subset):>6.1f} {mean('PS', subset):>6.1f} "
                     f"{mean('NS', subset):>6.1f} {mean('NS_before', subset):>10.1f} "
                     f"{statistics.mean(r['edit_s'] for r in subset):>7.1f}")
    layers: dict[int, int] = {}
    for r in rows:
        layers[r["layer"]] = layers.get(r["layer"], 0) + 1
    lines.append(f"located layers used: {dict(sorted(layers.items()))}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=["speed", "quality"])
    parser.add_argument("--facts", type=int, default=3, help="speed: facts for ROME/head timing")
    parser.add_argument("--memit-facts", type=int, default=100, help="speed: facts in the MEMIT batch (0: skip)")
    parser.add_argument("--n", type=int, default=40, help="quality: facts (stratified by relation)")
    parser.add_argument("--jobs", type=int, default=2, help="quality: worker processes")
    parser.add_argument("--method", choices=["rome", "head", "memit", "ft"], default="rome", help="quality: method")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", action="store_true", help="write the result under data/results/")
    args = parser.parse_args()
    lines = speed(args) if args.section == "speed" else quality(args)
    text = f"# python recipes/bench_edit.py {' '.join(sys.argv[1:])}\n" + "\n".join(lines) + "\n"
    print(text)
    if args.record:
        suffix = "" if args.section == "speed" or args.method == "rome" else f"_{args.method}"
        (OUT / f"bench_edit_{args.section}{suffix}.txt").write_text(text)


if __name__ == "__main__":
    main()

"""ROME's value optimisation, the fast schedule vs ROME's own (issue 19), on SmolLM2 (CPU), TUNING facts of
data/facts/heldout/facts.jsonl only.

    python recipes/bench_rome_speed.py choose [--facts 5] [--record]    # loss trajectories that chose the fast schedule
    python recipes/bench_rome_speed.py compare [--n 24] [--jobs 2] [--record]   # resumable:
                                                                    # data/results/rome_speed_19/compare-*.jsonl
    python recipes/bench_rome_speed.py steps [--n 18] [--jobs 1] [--record]   # resumable:
                                                                    # data/results/rome_speed_19/steps/
    python recipes/bench_rome_speed.py speed [--facts 2] [--record]    # CPU time per edit, old vs new

choose: for every 20th tuning fact (up to --facts), the loss after each Adam step of ROME's δ optimisation at
layer 1 (subject_last) under four settings: ROME's (20 templates, lr 0.5), 10 templates, lr 1.0, both; the
seconds and the norm of δ against its clamp. `compare`: --n tuning facts (round-robin over relations in sha256
order), each edited alone at SmolLM2's calibrated ROME site with ROME's settings ("old": lr 0.5, 20 steps, 20
templates, still the default) and with `FAST_ROME_SCHEDULE` ("new"), measured on the same unedited state: ES, PS, NS (CounterFact's
success rates), NKL (mean KL of the next-token distribution after the prefixed neighbour prompts) and S (harmonic
mean of ES, PS, NS), with the paired difference new − old and its bootstrap 95% CI (`locedit.core.statistics`);
speed as clean forwards per edit (a clean forward of the fact's prompt, best of 5, timed right before each edit).
`steps`: the same measurements with ROME's own settings cut after k = 10 and 14 Adam steps, each against k = 20
(ROME's): how much of the optimisation's second half the metrics need. `speed`: the same edits timed in CPU time of this process (`time.process_time`), against the CPU time of a clean
forward of the same prompt (mean of 10) — on a CPU shared with other jobs wall time inflates the short clean
forward more than the long edit, so the wall-time ratios of `compare` read low; CPU time does not wait for a core.
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

from locedit.editing.hparams import FAST_ROME_SCHEDULE

ROOT = Path(__file__).resolve().parent.parent
FACTS = ROOT / "data" / "facts" / "heldout" / "facts.jsonl"
OUT = ROOT / "data" / "results" / "rome_speed_19"
OLD = {"v_lr": 0.5, "v_num_grad_steps": 20, "context_template_length_params": [[5, 10], [10, 10]]}  # ROME's files
VARIANTS = {"old": OLD, "new": FAST_ROME_SCHEDULE}  # old = the default since the comparison (NKL)
METRICS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "neighborhood_kl", "score")
SHORT = {"efficacy_score": "ES", "paraphrase_score": "PS", "neighborhood_score": "NS", "neighborhood_kl": "NKL",
         "score": "S", "clean_forwards": "clean forwards"}


def tuning_facts() -> list:
    """The TUNING split's facts (the file's `split` field), in file order."""
    from locedit.core.datasets import read_facts

    split = {str(json.loads(line)["case_id"]): json.loads(line)["split"] for line in FACTS.read_text().splitlines()
             if line.strip()}
    return [f for f in read_facts(FACTS) if split[str(f.meta["id"])] == "tuning"]


def stratified(facts, n: int):
    """`n` facts, round-robin over relations in sha256(id) order (the same subset on every run)."""
    by_relation: dict[str, list] = {}
    for f in sorted(facts, key=lambda f: hashlib.sha256(str(f.meta["id"]).encode()).hexdigest()):
        by_relation.setdefault(f.relation or "-", []).append(f)
    chosen, lists = [], [by_relation[r] for r in sorted(by_relation)]
    while len(chosen) < n and any(lists):
        for items in lists:
            if items and len(chosen) < n:
                chosen.append(items.pop(0))
    return chosen


def clean_forward_s(lm, fact, repeats: int = 5) -> float:
    ids = torch.tensor([lm.encode(fact).input_ids], device=lm.device)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            lm.model(input_ids=ids)
            best = min(best, time.perf_counter() - t)
    return best


# --- choose ------------------------------------------------------------------------------------------------------
def choose(args) -> list[str]:
    import locedit
    from locedit.editing.hparams import ROMEHyperParams
    from locedit.editing.templates import context_templates
    from locedit.editing.values import Site, build_batch, optimize_values

    torch.set_num_threads(args.threads)
    lm = locedit.load("smollm2-135m")
    settings = {"ROME (20 templates, lr 0.5)": OLD,
                "10 templates, lr 0.5": {**OLD, "context_template_length_params": [[5, 5], [10, 5]]},
                "20 templates, lr 1.0": {**OLD, "v_lr": 1.0},
                "10 templates, lr 1.0": {**OLD, "v_lr": 1.0, "context_template_length_params": [[5, 5], [10, 5]]}}
    lines = ["loss after each of 20 Adam steps (NLL + KL + weight decay), ROME's δ at layer 1, subject_last; "
             "SmolLM2, TUNING facts; seconds on a shared CPU (compare within a fact)"]
    for fact in tuning_facts()[::20][: args.facts]:
        for name, kw in settings.items():
            hp = ROMEHyperParams(**kw)
            templates = context_templates(lm, hp.context_template_length_params, hp.seed)
            batch = build_batch(lm, fact, " " + fact.meta["target_new"].strip(), templates, "subject_last", None,
                                hp.kl_prompt)
            unit = clean_forward_s(lm, fact)
            t = time.perf_counter()
            r = optimize_values(lm, batch, [Site("mlp_down", 1)], hp)
            dt = time.perf_counter() - t
            line = (f"fact {fact.meta['id']} {name:<28} rows {batch.rows:>2} {dt:6.1f} s = {dt / unit:5.0f} clean "
                    f"forwards; |δ| {float(r.deltas[0].norm()):.1f} (clamp {4 * float(r.inits[0].norm()):.1f}); "
                    f"loss " + " ".join(f"{x:.3f}" for x in r.losses))
            print(line, flush=True)
            lines.append(line)
    return lines


# --- speed -------------------------------------------------------------------------------------------------------
def speed(args) -> list[str]:
    import locedit
    from locedit.editing.stats import key_statistics

    torch.set_num_threads(args.threads)
    lm = locedit.load("smollm2-135m")
    layers, key_position = _site(lm)
    stats = key_statistics(lm, layers=layers, kinds=("mlp",), progress=False)
    lines = [f"ROME on SmolLM2 at layers {layers} ({key_position}), stats cached, {args.threads} thread(s); CPU "
             "time of the edit / CPU time of a clean forward of the fact's prompt (mean of 10)"]
    ratios: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for fact in stratified(tuning_facts(), args.facts):
        ids = torch.tensor([lm.encode(fact).input_ids], device=lm.device)
        for name, hp in VARIANTS.items():
            with torch.no_grad():
                t = time.process_time()
                for _ in range(10):
                    lm.model(input_ids=ids)
                unit = (time.process_time() - t) / 10
            t = time.process_time()
            edit = locedit.edit(lm, locedit.EditRequest(fact, " " + fact.meta["target_new"].strip()), method="rome",
                                layers=layers, key_position=key_position, hparams=dict(hp), stats=stats)
            cpu = time.process_time() - t
            edit.revert()
            ratios[name].append(cpu / unit)
            line = (f"fact {fact.meta['id']} {name}: {cpu:.1f} s CPU = {cpu / unit:.0f} clean forwards "
                    f"({unit * 1000:.0f} ms CPU each), {len(edit.losses[0])} steps")
            print(line, flush=True)
            lines.append(line)
    for name, values in ratios.items():
        lines.append(f"{name}: {statistics.mean(values):.0f} clean forwards per edit (mean of {len(values)})")
    lines.append("new / old: " + f"{statistics.mean(n / o for n, o in zip(ratios['new'], ratios['old'])):.2f}")
    return lines


# --- compare -----------------------------------------------------------------------------------------------------
def _site(lm) -> tuple[list[int], str]:
    from locedit.editing.calibration import calibrated_site

    site, _ = calibrated_site(lm, "rome", warn=False)
    if site is None:
        raise SystemExit("no calibrated ROME site for this model (recipes/smollm2_calibration.py)")
    return list(site["layers"]), site["key_position"]


def measure_fact(lm, fact, stats, layers, key_position, variants: dict | None = None) -> dict:
    import locedit
    from locedit.verification.verify import behaviour_metrics, inputs_for, measure_behaviour

    new = " " + fact.meta["target_new"].strip()
    inputs = inputs_for([fact], [new])
    measure = lambda: measure_behaviour(lm, inputs, generation_tokens=0, fluency_tokens=0)  # noqa: E731
    before = measure()
    row = {"id": fact.meta["id"], "relation": fact.relation, "layers": layers, "key_position": key_position}
    for name, hp in (variants or VARIANTS).items():
        unit = clean_forward_s(lm, fact)
        t = time.perf_counter()
        edit = locedit.edit(lm, locedit.EditRequest(fact, new), method="rome", layers=layers,
                            key_position=key_position, hparams=dict(hp), stats=stats)
        seconds = time.perf_counter() - t
        metrics = behaviour_metrics(inputs, before, measure())
        edit.revert()
        row[name] = {**{k: metrics[k] for k in METRICS}, "edit_s": seconds, "clean_forward_s": unit,
                     "clean_forwards": seconds / unit, "steps": len(edit.losses[0]),
                     "loss_final": edit.losses[0][-1]}
    return row


def _worker(rank: int, jobs: int, ids: list, path: str, threads: int, variants: dict | None = None) -> None:
    import locedit
    from locedit.editing.stats import key_statistics

    torch.set_num_threads(threads)
    lm = locedit.load("smollm2-135m")
    layers, key_position = _site(lm)
    stats = key_statistics(lm, layers=layers, kinds=("mlp",), progress=False)
    wanted = [i for j, i in enumerate(ids) if j % jobs == rank]
    by_id = {f.meta["id"]: f for f in tuning_facts()}
    with open(path, "a") as out:
        for ident in wanted:
            row = measure_fact(lm, by_id[ident], stats, layers, key_position, variants)
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"[{rank}] {ident}: " + "  ".join(
                f"{v}: S {row[v]['score']:.2f} {row[v]['clean_forwards']:.0f} cf" for v in (variants or VARIANTS)),
                flush=True)


def read_rows(directory: Path) -> dict[str, dict]:
    """The recorded rows of `directory`'s compare-*.jsonl shards, by fact id."""
    rows = {}
    for shard in sorted(directory.glob("compare-*.jsonl")):
        for line in shard.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by an interrupted run
            rows[row["id"]] = row
    return rows


def recorded(directory: Path, n: int) -> list[dict]:
    """The rows recorded under `directory` for the `n` chosen tuning facts."""
    chosen = {f.meta["id"] for f in stratified(tuning_facts(), n)}
    return [r for i, r in read_rows(directory).items() if i in chosen]


def run_rows(args, out: Path, variants: dict | None = None) -> list[dict]:
    """Measure the chosen tuning facts not yet recorded under `out` (resumable), with `args.jobs` workers."""
    out.mkdir(parents=True, exist_ok=True)
    chosen = [f.meta["id"] for f in stratified(tuning_facts(), args.n)]
    done = read_rows(out)
    todo = [i for i in chosen if i not in done]
    print(f"{len(chosen)} tuning facts chosen, {len(chosen) - len(todo)} already done, {len(todo)} to run", flush=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, args.jobs, todo, str(out / f"compare-{r}.jsonl"), args.threads,
                                               variants))
             for r in range(args.jobs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return recorded(out, args.n)


def compare(args) -> list[str]:
    return summarize(run_rows(args, OUT))


# --- steps: ROME's schedule stopped after fewer Adam steps -----------------------------------------------------------
STEPS = (10, 14, 20)
STEPS_OUT = OUT / "steps"


def step_variants() -> dict[str, dict]:
    """ROME's settings (20 templates, lr 0.5) with the optimisation cut at each of `STEPS` steps."""
    return {f"k{k}": {**OLD, "v_num_grad_steps": k} for k in STEPS}


def steps(args) -> list[str]:
    rows = run_rows(args, STEPS_OUT, step_variants())
    return summarize_steps(rows)


def summarize_steps(rows: list[dict]) -> list[str]:
    """Each cut schedule against ROME's 20 steps: paired differences of the metrics and the cost."""
    if not rows:
        return ["no rows"]
    base = f"k{max(STEPS)}"
    lines = [f"ROME's value optimisation (20 templates, lr 0.5) stopped after k Adam steps, against k = {max(STEPS)}"
             f" (ROME's), on {len(rows)} TUNING facts of data/facts/heldout/facts.jsonl at SmolLM2's calibrated "
             f"site (layers {rows[0]['layers']}, {rows[0]['key_position']}), each edited "
             "alone"]
    for k in STEPS[:-1]:
        lines += [""] + summarize(rows, new=f"k{k}", old=base)[1:]
    return lines


def summarize(rows: list[dict], new: str = "new", old: str = "old") -> list[str]:
    """The paired comparison of variant `new` against `old` over the recorded rows."""
    from locedit.core.statistics import bootstrap_mean, paired_difference

    if not rows:
        return ["no rows"]
    r0 = rows[0]
    lines = [f"ROME on SmolLM2 at its calibrated site (layers {r0['layers']}, {r0['key_position']}), {len(rows)} "
             "TUNING facts of data/facts/heldout/facts.jsonl, each edited alone; old = ROME's settings "
             f"{json.dumps(OLD)}, new = FAST_ROME_SCHEDULE {json.dumps(FAST_ROME_SCHEDULE)}",
             f"{'metric':<15} {old:>8} {new:>8} {new + ' - ' + old + ' [95% CI]':>28} {new + '>' + old + '/=/<':>18}"]
    for key in METRICS + ("clean_forwards",):
        a = {r["id"]: r[new][key] for r in rows}
        b = {r["id"]: r[old][key] for r in rows}
        d = paired_difference(a, b)
        ci = "n/a" if d["low"] is None else f"[{d['low']:+.3f}, {d['high']:+.3f}]"
        lines.append(f"{SHORT[key]:<15} {d['b']:>8.3f} {d['a']:>8.3f} {d['mean']:>+12.3f} {ci:>15} "
                     f"{d['wins']:>5}/{d['ties']}/{d['losses']}")
    for name in (old, new):
        cf = bootstrap_mean([r[name]["clean_forwards"] for r in rows])
        steps = statistics.mean(r[name]["steps"] for r in rows)
        lines.append(f"{name}: {cf.mean:.0f} clean forwards per edit [{cf.low:.0f}, {cf.high:.0f}], "
                     f"{statistics.mean(r[name]['edit_s'] for r in rows):.1f} s, {steps:.1f} Adam steps, "
                     f"final loss {statistics.mean(r[name]['loss_final'] for r in rows):.3f}")
    ratio = statistics.mean(r[new]["clean_forwards"] / r[old]["clean_forwards"] for r in rows)
    lines.append(f"speed: {new} / {old} clean forwards per edit, mean of per-fact ratios: {ratio:.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=["choose", "compare", "steps", "speed", "summary", "steps-summary"])
    parser.add_argument("--facts", type=int, default=5, help="choose, speed: tuning facts")
    parser.add_argument("--n", type=int, default=24, help="compare: tuning facts")
    parser.add_argument("--jobs", type=int, default=2, help="compare: worker processes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", action="store_true", help="write the result under data/results/rome_speed_19/")
    args = parser.parse_args()
    if args.section == "choose":
        lines = choose(args)
    elif args.section == "speed":
        lines = speed(args)
    elif args.section == "compare":
        lines = compare(args)
    elif args.section == "steps":
        lines = steps(args)
    elif args.section == "steps-summary":
        lines = summarize_steps(recorded(STEPS_OUT, args.n))
    else:  # summary of the rows recorded so far
        lines = summarize(recorded(OUT, args.n))
    text = f"# python recipes/bench_rome_speed.py {' '.join(sys.argv[1:])}\n" + "\n".join(lines) + "\n"
    print(text)
    if args.record:
        OUT.mkdir(parents=True, exist_ok=True)
        name = {"summary": "compare", "steps-summary": "steps"}.get(args.section, args.section)
        (OUT / f"{name}.txt").write_text(text)


if __name__ == "__main__":
    main()

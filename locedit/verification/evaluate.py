"""`evaluate`: edit every fact of a fact set alone (apply, verify, revert) into a resumable JSON Lines file, then
aggregate: mean and bootstrap 95% CI of every metric and of each mechanistic check's pass rate, overall and per
relation. `sequential=True` instead keeps the edits applied and measures, every `every` edits, all edits so far
and a fixed probe set: the collapse curve.

Protocol: facts without a `target_new` are skipped, and so are facts the model does not know (the true target's
first token is not its top-1; the paper's convention, `locedit.core.datasets.known_facts`); both are counted.

Files in `out_dir`: `results.jsonl` (one line per fact: `{"id", "fact", "new_target", "options", "result"}` or
`"error"`), `aggregate.json`, `table.md`; sequential runs: `sequential.jsonl`, `collapse.png/.svg`.
Lines are written whole and fsync'd; an interrupted run resumes where it stopped (a truncated last line is
repaired, finished facts are never redone or duplicated). With `jobs > 1`, worker processes (each loading the model
itself) write `results.w<k>.jsonl` shards over disjoint facts, merged into `results.jsonl` when they finish (and at
the start of the next run, if a run was interrupted).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from locedit.core.datasets import edit_request
from locedit.core.facts import EditRequest, Fact
from locedit.core.results import Result, jsonable, write_atomic
from locedit.core.statistics import bootstrap_mean, paired_difference
from locedit.core.store import RunStore
from locedit.errors import DatasetError, LoceditError
from locedit.localization.runner import fact_id, fact_record, normalize_options
from locedit.verification.ripple import EVALUATE_METRICS as EVALUATE_RIPPLE

logger = logging.getLogger("locedit")

RESULTS = "results.jsonl"


def results_store(out_dir: str | Path) -> RunStore:
    """The `RunStore` of an evaluation's `results.jsonl` (rows keyed by "id"; worker shards `results.w<k>.jsonl`)."""
    return RunStore(Path(out_dir) / RESULTS, key="id", shard_name="{stem}.w{shard}{suffix}")


def evaluation_lines(out_dir: str | Path) -> list[dict]:
    """The lines of an evaluation's `results.jsonl` (a truncated last line is repaired), in file order."""
    return results_store(out_dir).read()[0]


# (name, path in a result dict): the per-fact numbers aggregated
METRICS: list[tuple[str, tuple[str, ...]]] = [
    ("efficacy_score", ("behaviour", "efficacy_score")),
    ("efficacy_magnitude", ("behaviour", "efficacy_magnitude")),
    ("paraphrase_score", ("behaviour", "paraphrase_score")),
    ("paraphrase_magnitude", ("behaviour", "paraphrase_magnitude")),
    ("neighborhood_score", ("behaviour", "neighborhood_score")),
    ("neighborhood_magnitude", ("behaviour", "neighborhood_magnitude")),
    ("score", ("behaviour", "score")),
    ("generation_efficacy", ("behaviour", "generation_efficacy")),
    ("generation_efficacy_prompt", ("behaviour", "generation_efficacy_prompt")),
    ("neighborhood_score_prefixed", ("behaviour", "neighborhood_score_prefixed")),
    ("neighborhood_kl", ("behaviour", "neighborhood_kl")),
    ("fluency", ("behaviour", "fluency")),
    ("fluency_before", ("behaviour", "before", "fluency")),
    ("perplexity_drift", ("behaviour", "perplexity_drift")),
    ("efficacy_score_before", ("behaviour", "before", "efficacy_score")),
    ("neighborhood_score_before", ("behaviour", "before", "neighborhood_score")),
    ("behaviour_passed", ("behaviour", "passed")),
    ("mechanism_knockout_passed", ("mechanism", "knockout", "passed")),
    ("mechanism_extraction_passed", ("mechanism", "extraction", "passed")),
    ("mechanism_enrichment_passed", ("mechanism", "enrichment", "passed")),
    ("mechanism_sufficiency_passed", ("mechanism", "sufficiency", "passed")),
    ("mechanism_necessity_passed", ("mechanism", "necessity", "passed")),
    ("mechanism_ov_read_passed", ("mechanism", "ov_read", "passed")),
    ("mechanism_locality_passed", ("mechanism", "locality", "passed")),
    ("mechanism_passed", ("mechanism", "passed")),
    ("passed", ("passed",)),
] + EVALUATE_RIPPLE  # ripple rates (reported, not in the pass rule)
TABLE_COLUMNS = ["efficacy_score", "paraphrase_score", "neighborhood_score", "score", "generation_efficacy",
                 "neighborhood_kl", "fluency", "mechanism_passed"]


def _at(d: Any, path: Sequence[str]):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def summarize(results: Sequence[dict]) -> dict:
    """{metric: {"mean", "ci95": [low, high], "n"}} over per-fact result dicts (None values left out)."""
    out = {}
    for name, path in METRICS:
        values = [float(v) for v in (_at(r, path) for r in results) if v is not None]
        if not values:
            continue
        est = bootstrap_mean(values)
        out[name] = {"mean": float(np.mean(values)), "ci95": [est.low, est.high], "n": len(values)}
    means = [out.get(k, {}).get("mean") for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")]
    from locedit.verification.metrics import harmonic_mean

    out["score_of_means"] = {"mean": harmonic_mean(means), "ci95": [None, None], "n": len(results)}
    return out


def aggregate(lines: Sequence[dict], counts: dict | None = None) -> dict:
    """Overall and per-relation summaries of result lines (`{"fact": {...}, "result": verification dict}`)."""
    ok = [l for l in lines if "result" in l]
    by_relation: dict[str, list] = {}
    for line in ok:
        by_relation.setdefault(line["fact"].get("relation") or "unknown", []).append(line["result"])
    return {"n": len(ok), "errors": len(lines) - len(ok), "counts": counts or {},
            "overall": summarize([l["result"] for l in ok]),
            "by_relation": {k: {"n": len(v), **summarize(v)} for k, v in sorted(by_relation.items())}}


def paired_comparison(lines_a: Sequence[dict], lines_b: Sequence[dict]) -> dict:
    """Per metric, **b − a** over the facts (by id) both evaluations edited, in a's order: {"n", "a", "b",
    "difference", "ci95" (bootstrap, of the per-fact differences), "b_better", "a_better"}
    (`core.statistics.paired_difference(b, a)`). Two runs of `evaluate` with different options on the same facts
    give a paired comparison of, say, two edit-site policies."""
    a = {l["id"]: l["result"] for l in lines_a if "result" in l}
    b = {l["id"]: l["result"] for l in lines_b if "result" in l}
    shared = [i for i in a if i in b]
    out: dict = {"n_shared": len(shared), "metrics": {}}
    for name, path in METRICS:
        va = {i: _at(a[i], path) for i in shared}
        vb = {i: _at(b[i], path) for i in shared}
        d = paired_difference(vb, va, keys=shared, tie=0.0)
        if not d["n"]:
            continue
        out["metrics"][name] = {"n": d["n"], "a": d["b"], "b": d["a"], "difference": d["mean"],
                                "ci95": [d["low"], d["high"]], "b_better": d["wins"], "a_better": d["losses"]}
    return out


def table(agg: dict) -> str:
    """A Markdown table of the aggregate: every metric overall, then the main ones per relation."""
    lines = ["| metric | mean | 95% CI (bootstrap) | n |", "|---|---|---|---|"]
    for name, s in agg["overall"].items():
        low, high = s["ci95"]
        ci = f"[{low:.3f}, {high:.3f}]" if low is not None else "-"
        lines.append(f"| {name} | {_num(s['mean'])} | {ci} | {s['n']} |")
    lines += ["", "| relation | n | " + " | ".join(TABLE_COLUMNS) + " |",
              "|---|---|" + "---|" * len(TABLE_COLUMNS)]
    for relation, s in agg["by_relation"].items():
        lines.append(f"| {relation} | {s['n']} | " + " | ".join(_num(s.get(c, {}).get("mean")) for c in TABLE_COLUMNS)
                     + " |")
    counts = agg.get("counts") or {}
    if counts:
        lines += ["", ", ".join(f"{k}: {v}" for k, v in counts.items())]
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


# --- the per-fact run ------------------------------------------------------------------------------------------------
def _default_edit(lm, request: EditRequest, **options):
    from locedit.editing import edit

    return edit(lm, request, **options)


def evaluate_one(lm, request: EditRequest, *, edit_options: dict, verify_options: dict,
                 edit_fn: Callable | None = None) -> dict:
    """Edit one fact, verify, revert. A `LoceditError` (e.g. the model already predicts the new target) becomes
    `{"error": ...}`."""
    from locedit.verification.verify import verify

    edit_fn = edit_fn or _default_edit
    start = time.perf_counter()
    try:
        edit = edit_fn(lm, request, **edit_options)
    except LoceditError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    try:
        ver = verify(lm, edit, **verify_options)
    except LoceditError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if edit.is_applied:
            edit.revert()
    result = ver.to_dict()
    result["edit"] = {"sites": jsonable(dict(edit.sites)), "timings": jsonable(dict(getattr(edit, "timings", {})))}
    result["seconds_total"] = time.perf_counter() - start
    return {"result": result}


def _run_facts(lm, todo: Sequence[tuple[str, EditRequest]], store: RunStore, options: dict, edit_options: dict,
               verify_options: dict, edit_fn, progress: bool, label: str = "evaluate") -> int:
    from tqdm.auto import tqdm

    done = 0
    bar = tqdm(total=len(todo), desc=label, unit="fact", disable=None if progress else True, file=sys.stderr)
    with store.writer() as f, bar:
        for ident, request in todo:
            outcome = evaluate_one(lm, request, edit_options=edit_options, verify_options=verify_options,
                                   edit_fn=edit_fn)
            f.add({"id": ident, "fact": fact_record(request.fact), "new_target": request.new_target,
                   "options": options, **outcome})
            done += 1
            bar.update(1)
    return done


def _worker(spec: str, rank: int, todo: list, path: str, options: dict, edit_options: dict, verify_options: dict,
            threads: int, dtype, device) -> None:  # pragma: no cover - runs in a subprocess
    import torch

    from locedit.core.loading import load

    torch.set_num_threads(max(1, threads))
    lm = load(spec, dtype=dtype, device=device)
    todo = [(ident, EditRequest(_fact_from(record), new)) for ident, record, new in todo]
    _run_facts(lm, todo, RunStore(path, key="id"), options, edit_options, verify_options, None, progress=rank == 0,
               label=f"evaluate (worker {rank})")


def _fact_from(record: dict) -> Fact:
    return Fact(record["subject"], record["prompt"], record.get("target"), record.get("relation"),
                dict(record.get("meta") or {}))


@dataclass
class Evaluation(Result):
    """`lines`: result lines of the facts asked for; `aggregate` (see `aggregate`); `counts` (facts given, without
    target_new, unknown to the model, evaluated, already done, errors); `sequential`: collapse-curve points."""

    out_dir: Path
    lines: list = field(default_factory=list)
    aggregate: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    sequential: list | None = None

    def table(self) -> str:
        """The Markdown table of the aggregate (see `table`); empty for a sequential run."""
        return table(self.aggregate) if self.aggregate and not self.sequential else ""

    def to_dict(self) -> dict:
        """The output directory, counts and aggregate (what `aggregate.json` holds), and the collapse curve."""
        return {"analysis": "evaluation", "out_dir": str(self.out_dir), "counts": jsonable(self.counts),
                "aggregate": jsonable(self.aggregate), "sequential": jsonable(self.sequential)}

    def summary(self) -> str:
        """The headline numbers: facts evaluated and mean S, ES, PS, NS with their 95% CIs (or the collapse curve's
        last point for a sequential run)."""
        if self.sequential:
            last = self.sequential[-1]
            return (f"sequential edits into {self.out_dir}: after {last['edits']} edits, edit efficacy "
                    f"{_num(last.get('edit_efficacy'))}, probe accuracy {_num(last.get('probe_accuracy'))}, "
                    f"perplexity {_num(last.get('perplexity'))}")
        overall = self.aggregate.get("overall", {})
        parts = []
        for name in ("score", "efficacy_score", "paraphrase_score", "neighborhood_score"):
            if name in overall:
                low, high = overall[name]["ci95"]
                ci = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
                parts.append(f"{name} {overall[name]['mean']:.3f}{ci}")
        return (f"evaluation into {self.out_dir}: {self.counts.get('evaluated', 0)} facts edited, "
                f"{self.counts.get('errors', 0)} errors" + ("; " + ", ".join(parts) if parts else ""))

    def plot(self, ax=None):
        """The collapse curve of a sequential run; else the mean of the main metrics with their 95% CIs."""
        if self.sequential:
            from locedit.verification.plots import collapse_figure

            return collapse_figure(self.sequential)
        import matplotlib.pyplot as plt

        overall = self.aggregate.get("overall", {})
        names = [c for c in TABLE_COLUMNS if c in overall and c not in ("neighborhood_kl", "fluency")]
        if not names:
            raise LoceditError("this evaluation has no aggregated metrics to plot")
        fig, ax = (plt.subplots(figsize=(7, 3.5)) if ax is None else (ax.figure, ax))
        means = [overall[n]["mean"] for n in names]
        low = [m - (overall[n]["ci95"][0] if overall[n]["ci95"][0] is not None else m) for n, m in zip(names, means)]
        high = [(overall[n]["ci95"][1] if overall[n]["ci95"][1] is not None else m) - m for n, m in zip(names, means)]
        ax.bar(range(len(names)), means, yerr=[low, high], capsize=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("mean over facts, 95% CI")
        fig.tight_layout()
        return fig


def prepare_facts(lm, facts, *, n: int | None, only_known: bool, progress: bool) -> tuple[list[EditRequest], dict]:
    """The edit requests to evaluate (facts with a `target_new`), and the counts of what was skipped."""
    from locedit.core.datasets import known_facts

    facts = list(getattr(facts, "facts", facts))
    counts = {"given": len(facts)}
    with_new = [f for f in facts if edit_request(f) is not None]
    counts["no_target_new"] = len(facts) - len(with_new)
    if only_known:
        resolved = [f for f in with_new if f.target is not None]
        known = known_facts(lm, resolved, progress=progress) if resolved else []
        keep = {id(f) for f in known} | {id(f) for f in with_new if f.target is None}
        kept = [f for f in with_new if id(f) in keep]
        counts["unknown"] = len(with_new) - len(kept)
    else:
        kept = with_new
        counts["unknown"] = 0
    if n is not None:
        counts["beyond_n"] = max(0, len(kept) - n)
        kept = spread(kept, n)
    return [edit_request(f) for f in kept], counts


def spread(facts: Sequence[Fact], n: int) -> list[Fact]:
    """At most n facts, taken round-robin over relations (in order of first appearance, each relation's facts in
    file order), so a small n covers every relation instead of the first one; kept in file order."""
    by_relation: dict[str, list[int]] = {}
    for i, f in enumerate(facts):
        by_relation.setdefault(f.relation or "", []).append(i)
    chosen: list[int] = []
    queues = [list(v) for v in by_relation.values()]
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return [facts[i] for i in sorted(chosen)]


def evaluate(model, facts, out_dir: str | Path, *, method: str = "rome", layers: Sequence[int] | None = None,
             n: int | None = None, sequential: bool = False, every: int = 10, probes: int = 20, jobs: int = 1,
             mechanism: bool = True, only_known: bool = True, edit_options: dict | None = None,
             verify_options: dict | None = None, edit_fn: Callable | None = None, progress: bool = True,
             threads: int = 1, dtype=None, device=None, model_spec: str | None = None) -> Evaluation:
    """Evaluate `method` on `facts` (a FactFile or list of Facts with `meta["target_new"]`).

    `model`: an LM or a spec for `locedit.load`; `jobs > 1` needs a spec each worker loads (`model` itself or
    `model_spec`). `n`: at most n (spread round-robin over relations)
    (known) facts. `edit_options`: more keyword arguments for `locedit.edit` (hparams, key_position, ...);
    `verify_options`: for `verify` (generation_tokens, fluency_tokens, ...). `edit_fn(lm, request, **options) ->
    Edit` replaces `locedit.edit` (tests; not with jobs > 1)."""
    from locedit.core.loading import load

    lm = model if hasattr(model, "model") and hasattr(model, "tokenizer") else load(model, dtype=dtype, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    edit_options = {"method": method, "layers": list(layers) if layers is not None else None, **(edit_options or {})}
    verify_options = {"mechanism": mechanism, **(verify_options or {})}
    todo_all, counts = prepare_facts(lm, facts, n=n, only_known=only_known, progress=progress)
    if sequential:
        return _sequential(lm, todo_all, facts, out, every=every, probes=probes, edit_options=edit_options,
                           edit_fn=edit_fn, counts=counts, progress=progress)
    options = normalize_options({"edit": edit_options, "verify": verify_options})
    ids = [fact_id(r.fact) for r in todo_all]
    if len(set(ids)) != len(ids):
        raise DatasetError("two facts share an id; ids must be unique to resume an evaluation")
    store = results_store(out)
    store.merge()
    path = store.path
    lines, repaired = store.read()
    for line in lines:
        if line.get("options", options) != options:
            raise DatasetError(f"{str(path)!r} holds results of other options ({line.get('options')}); use "
                               "another output directory")
    done = {l["id"] for l in lines}
    todo = [(i, r) for i, r in zip(ids, todo_all) if i not in done]
    counts.update({"already_done": len(todo_all) - len(todo), "repaired_last_line": repaired})
    if jobs > 1 and len(todo) > 1:
        spec = model_spec or (model if isinstance(model, (str, os.PathLike)) else None)
        if spec is None:
            raise LoceditError("jobs > 1 needs the model as a spec (name or path) that each worker can load")
        if edit_fn is not None:
            raise LoceditError("edit_fn cannot be used with jobs > 1")
        _parallel(str(spec), todo, out, jobs, options, edit_options, verify_options, threads, dtype, device)
    else:
        _run_facts(lm, todo, store, options, edit_options, verify_options, edit_fn, progress)
    lines = {l["id"]: l for l in store.read()[0]}
    mine = [lines[i] for i in ids if i in lines]
    counts["evaluated"] = sum("result" in l for l in mine)
    counts["errors"] = sum("error" in l for l in mine)
    agg = aggregate(mine, counts)
    write_atomic(out / "aggregate.json", json.dumps(jsonable(agg), indent=1))
    write_atomic(out / "table.md", table(agg))
    return Evaluation(out, mine, agg, counts)


def _parallel(spec: str, todo: list, out: Path, jobs: int, options, edit_options, verify_options, threads, dtype,
              device) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(jobs):
        shard = [(i, fact_record(r.fact), r.new_target) for i, r in todo[rank::jobs]]
        if not shard:
            continue
        p = ctx.Process(target=_worker, args=(spec, rank, shard, str(results_store(out).shard(rank).path), options,
                                              edit_options, verify_options, threads, dtype, device))
        p.start()
        procs.append(p)
    try:
        for p in procs:
            p.join()
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    results_store(out).merge()
    if failed:
        raise LoceditError(f"{len(failed)} evaluation worker(s) failed (exit codes {failed}); finished facts are "
                           "kept; run again to resume")


# --- sequential editing ----------------------------------------------------------------------------------------------
def _probe_set(lm, all_facts, edited: list[EditRequest], probes: int) -> list[EditRequest]:
    """Known facts with a target_new that are not edited (the last `probes` of the fact file)."""
    edited_ids = {fact_id(r.fact) for r in edited}
    pool = [f for f in getattr(all_facts, "facts", all_facts)
            if fact_id(f) not in edited_ids and f.target is not None and edit_request(f) is not None]
    from locedit.core.datasets import known_facts

    pool = known_facts(lm, pool[-4 * probes:], progress=False)[-probes:] if pool else []
    return [edit_request(f) for f in pool]


def _sequential_point(lm, edited: list[EditRequest], probe: list[EditRequest], count: int) -> dict:
    import torch

    from locedit.verification.metrics import continuation, perplexity, target_probs

    point: dict[str, Any] = {"edits": count}
    if edited:
        pairs = [(r.fact.prompt, continuation(r.fact.prompt, r.new_target)) for r in edited] + \
                [(r.fact.prompt, r.fact.target_text()) for r in edited]
        p = target_probs(lm, pairs)
        k = len(edited)
        point["edit_efficacy"] = float(np.mean(p[:k] > p[k:]))
    else:
        point["edit_efficacy"] = None
    if probe:
        pairs = [(r.fact.prompt, r.fact.target_text()) for r in probe] + \
                [(r.fact.prompt, continuation(r.fact.prompt, r.new_target)) for r in probe]
        p = target_probs(lm, pairs)
        k = len(probe)
        point["probe_accuracy"] = float(np.mean(p[:k] > p[k:]))
        with torch.no_grad():
            hits = [lm.predict(r.fact)[0].token_id == lm.encode(r.fact).target_id for r in probe]
        point["probe_top1"] = float(np.mean(hits))
    else:
        point["probe_accuracy"] = point["probe_top1"] = None
    point["perplexity"] = perplexity(lm)
    return point


def _sequential(lm, todo: list, all_facts, out: Path, *, every: int, probes: int, edit_options: dict, edit_fn,
                counts: dict, progress: bool) -> Evaluation:
    """Keep every edit applied; measure after 0, every, 2*every, ... edits and after the last. Not resumable (the
    model state would have to be rebuilt): the file is rewritten from scratch."""
    from tqdm.auto import tqdm

    from locedit.verification.plots import collapse_figure

    if every < 1:
        raise LoceditError(f"every must be at least 1, not {every}")
    edit_fn = edit_fn or _default_edit
    probe = _probe_set(lm, all_facts, todo, probes)
    store = RunStore(out / "sequential.jsonl", key="id")
    store.path.unlink(missing_ok=True)
    applied, edited, errors, points = [], [], [], []
    bar = tqdm(total=len(todo), desc="sequential edits", unit="edit", disable=None if progress else True,
               file=sys.stderr)
    try:
        with store.writer() as f, bar:
            point = _sequential_point(lm, edited, probe, 0)
            points.append(point)
            f.add({"id": "0", **point})
            for i, request in enumerate(todo):
                try:
                    e = edit_fn(lm, request, **edit_options)
                    applied.append(e)
                    fact = e.facts[0] if getattr(e, "facts", None) else request.fact  # with the resolved target
                    edited.append(EditRequest(fact, request.new_target))
                except LoceditError as err:
                    errors.append({"id": fact_id(request.fact), "error": f"{type(err).__name__}: {err}"})
                bar.update(1)
                if edited and (len(edited) % every == 0 or i == len(todo) - 1) and \
                        points[-1]["edits"] != len(edited):
                    point = _sequential_point(lm, edited, probe, len(edited))
                    points.append(point)
                    f.add({"id": str(len(edited)), **point})
    finally:
        for e in reversed(applied):
            if e.is_applied:
                e.revert()
    fig = collapse_figure(points)
    from locedit.core.plots import save_figure

    save_figure(fig, out / "collapse")
    counts = {**counts, "edited": len(edited), "edit_errors": len(errors), "probes": len(probe)}
    agg = {"sequential": points, "counts": counts, "errors": errors}
    write_atomic(out / "aggregate.json", json.dumps(jsonable(agg), indent=1))
    return Evaluation(out, [], agg, counts, sequential=points)

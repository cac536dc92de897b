"""`calibrate`: measure where a model edits best. Trial edits over candidate layers x key positions (MEMIT: windows
ending at each candidate layer) on facts the model knows, each scored with verify's behaviour metrics (ES, PS, NS,
S = their harmonic mean, NKL; `locedit.verification.metrics`) on that fact's own paraphrases and neighbours.
Coarse-to-fine over layers: every `stride`-th layer, then the neighbours of the best at half the step, until the
step is one layer. The chosen site per method comes with a bootstrap CI of its mean S and the whole sweep table;
trials go to a resumable `RunStore` when `out` is given. No weight changes: every trial edit is reverted."""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from locedit.core.facts import EditRequest, Fact
from locedit.core.statistics import bootstrap_mean, paired_difference
from locedit.editing.calibration import Calibration, install_calibration
from locedit.editing.edit import applied_edits, geometry
from locedit.editing.fingerprint import weights_fingerprint
from locedit.editing.hparams import as_dict, read_hparams
from locedit.errors import CalibrationError, FactError

KEY_POSITIONS = ("subject_last", "carrier")
MEMIT_WINDOW = 5  # MEMIT's candidate windows: up to 5 layers ending at the candidate layer (api's located window)
COARSE_POINTS = 6  # layers tried in the coarse pass (default stride: ceil(num_layers / COARSE_POINTS))


def calibrate(lm, facts=None, *, methods: Sequence[str] = ("rome",), layers: Sequence[int] | None = None,
              key_positions: Sequence[str] = ("subject_last",), n: int = 8, budget: float | None = None,
              progress: bool | None = None, out: str | Path | None = None, hparams: dict | None = None,
              stride: int | None = None, install: bool = True) -> Calibration:
    """Calibrate `lm`: trial edits on `n` facts it knows (`facts`: Facts, a FactFile or a fact file; default the
    curated set), over `layers` (None: coarse-to-fine over every layer, every `stride`-th first) x `key_positions`,
    for each of `methods`. `budget`: minutes after which no new trial starts (the result says `complete: False`).
    `out`: a directory for the resumable trial table (`trials.jsonl`). `hparams`: per method, what `edit` takes.
    `install`: store the result as the calibration of these weights (the locedit cache)."""
    start = time.perf_counter()
    if applied_edits(lm):
        raise CalibrationError("the model has edits applied; calibrate the unedited weights (revert them first)")
    methods = _checked_methods(methods)
    key_positions = _checked_keys(key_positions)
    if n < 1:
        raise CalibrationError(f"n must be at least 1, not {n}")
    chosen_facts = calibration_facts(lm, facts, n)
    resolved = {m: read_hparams(m, (hparams or {}).get(m)).params for m in methods}
    store = _store(out)
    done = _rows_by_key(store)
    deadline = None if budget is None else start + 60.0 * float(budget)
    trial = _Trials(lm, chosen_facts, resolved, store, done, deadline, progress)
    sweep: list[dict] = []
    chosen: dict = {}
    try:
        for method in methods:
            rows = _search(lm, trial, method, layers, key_positions, stride)
            sweep += rows
            best = _best(rows)
            if best is not None:
                chosen[method] = _chosen(trial, method, best, rows)
    finally:
        trial.close()
    if not chosen:
        raise CalibrationError("no trial edit finished within the budget; give a larger --budget")
    fingerprint = weights_fingerprint(lm)
    calibration = Calibration(
        fingerprint=fingerprint, model={"name": lm.name, "geometry": geometry(lm)}, chosen=chosen, sweep=sweep,
        facts=[_fact_id(f) for f in chosen_facts], hparams={m: as_dict(h) for m, h in resolved.items()},
        evidence=f"locedit calibrate: trial edits on {len(chosen_facts)} known facts, best mean S",
        complete=not trial.out_of_budget, seconds=time.perf_counter() - start)
    if out is not None:
        calibration.save(Path(out) / "calibration.json")
    if install:
        install_calibration(calibration)
    return calibration


def calibration_facts(lm, facts, n: int) -> list[Fact]:
    """Up to `n` facts for calibration: those with a counterfactual target (`meta["target_new"]`) that `lm`
    knows at top-1 and does not already continue with the new target, in a fixed hashed order (relations mix)."""
    from locedit.core.datasets import curated_facts, known_facts, read_facts

    if facts is None:
        facts = curated_facts()
    elif isinstance(facts, (str, Path)):
        facts = read_facts(facts)
    pool = [f for f in getattr(facts, "facts", facts) if f.target is not None and (f.meta or {}).get("target_new")]
    if not pool:
        raise CalibrationError("no calibration facts: each needs a true target and meta['target_new'] (a "
                               "counterfactual target), with paraphrases and neighbourhood prompts")
    pool.sort(key=lambda f: hashlib.sha256(_fact_id(f).encode()).hexdigest())
    kept: list[Fact] = []
    chunk = max(16, 4 * n)  # check knowledge a chunk at a time: a large fact file is not run through whole
    for start in range(0, len(pool), chunk):
        for fact in known_facts(lm, pool[start:start + chunk], progress=False):
            if len(kept) < n and lm.predict(fact)[0].token.strip() != str(fact.meta["target_new"]).strip():
                kept.append(fact)
        if len(kept) == n:
            break
    if not kept:
        raise CalibrationError(f"the model knows none of the {len(pool)} calibration facts at top-1")
    return kept


def coarse_layers(num_layers: int, stride: int | None = None) -> list[int]:
    """The coarse pass: every `stride`-th layer from 0 (default stride ceil(num_layers / COARSE_POINTS))."""
    stride = stride or max(1, math.ceil(num_layers / COARSE_POINTS))
    return list(range(0, num_layers, stride))


def candidate_layers(method: str, layer: int) -> list[int]:
    """The layers one candidate edits: ROME/FT the layer itself, MEMIT the window ending there."""
    if method == "memit":
        return list(range(max(0, layer - MEMIT_WINDOW + 1), layer + 1))
    return [layer]


def _search(lm, trial: "_Trials", method: str, layers, key_positions, stride) -> list[dict]:
    """The sweep of one method: rows per (layer, key position) candidate, coarse-to-fine unless `layers` given."""
    rows: dict[tuple[int, str], dict] = {}

    def evaluate(stage: str, candidates: list[int]) -> None:
        for layer in candidates:
            for key in key_positions:
                if (layer, key) not in rows and not trial.out_of_budget:
                    row = trial.candidate(method, layer, key, stage)
                    if row is not None:
                        rows[(layer, key)] = row

    if layers is not None:
        evaluate("given", sorted({int(l) for l in layers}))
        return list(rows.values())
    step = stride or max(1, math.ceil(lm.num_layers / COARSE_POINTS))
    evaluate("coarse", coarse_layers(lm.num_layers, step))
    while step > 1 and rows:
        step = max(1, step // 2)
        best = _best(list(rows.values()))
        centre = best["layer"]
        evaluate(f"fine±{step}", [l for l in (centre - step, centre + step) if 0 <= l < lm.num_layers])
    return sorted(rows.values(), key=lambda r: (r["layer"], r["key_position"]))


def _best(rows: list[dict]) -> dict | None:
    """The best candidate: highest mean S, then lowest mean NKL, then the earliest layer."""
    rows = [r for r in rows if r["S"] is not None]
    if not rows:
        return None
    return min(rows, key=lambda r: (-r["S"], r["NKL"] if r["NKL"] is not None else math.inf, r["layer"]))


def _chosen(trial: "_Trials", method: str, best: dict, rows: list[dict]) -> dict:
    per_fact = trial.per_fact_s(method, best["layer"], best["key_position"])
    s = bootstrap_mean(per_fact.values())
    others = [r for r in rows if r is not best and r["S"] is not None]
    runner = _best(others) if others else None
    out = {"layers": list(best["layers"]), "key_position": best["key_position"], "n": len(per_fact),
           "S": {"mean": s.mean, "low": s.low, "high": s.high},
           "ES": best["ES"], "PS": best["PS"], "NS": best["NS"], "NKL": best["NKL"]}
    if runner is not None:
        diff = paired_difference(per_fact, trial.per_fact_s(method, runner["layer"], runner["key_position"]))
        out["vs_runner_up"] = {"layers": runner["layers"], "key_position": runner["key_position"], **diff}
    return out


def _checked_methods(methods: Sequence[str]) -> list[str]:
    if isinstance(methods, str):
        methods = [methods]
    out = list(dict.fromkeys(methods))
    for m in out:
        if m not in ("rome", "memit", "ft"):
            raise CalibrationError(f"calibrate measures layer edits: method {m!r} is not one of rome, memit, ft")
    if not out:
        raise CalibrationError("no methods to calibrate")
    return out


def _checked_keys(keys: Sequence[str]) -> list[str]:
    if isinstance(keys, str):
        keys = [keys]
    out = list(dict.fromkeys(keys))
    for k in out:
        if k not in KEY_POSITIONS:
            raise CalibrationError(f"key position {k!r} is not one of {', '.join(KEY_POSITIONS)}")
    if not out:
        raise CalibrationError("no key positions to calibrate")
    return out


def _fact_id(fact: Fact) -> str:
    meta = fact.meta or {}
    return str(meta.get("id") or meta.get("case_id") or f"{fact.prompt}|{fact.target}")


def _store(out):
    if out is None:
        return None
    from locedit.core.store import RunStore

    Path(out).mkdir(parents=True, exist_ok=True)
    return RunStore(Path(out) / "trials.jsonl", key="key")


def _rows_by_key(store) -> dict[str, dict]:
    return {} if store is None else dict(store.latest())


def trial_key(method: str, layer: int, key_position: str, fact_id: str) -> str:
    return f"{method}|L{layer}|{key_position}|{fact_id}"


class _Trials:
    """Trial edits and their scores, one fact at a time, reusing stored rows."""

    def __init__(self, lm, facts, hparams, store, done, deadline, progress) -> None:
        from tqdm.auto import tqdm

        self.lm, self.facts, self.hparams, self.store = lm, facts, hparams, store
        self.rows = done
        self.deadline = deadline
        self.out_of_budget = False
        self._before: dict[str, dict] = {}
        self._sites: dict[str, object] = {}
        self.bar = tqdm(desc="calibrate", unit="edit", disable=None if progress is None else not progress,
                        file=sys.stderr)

    def close(self) -> None:
        self.bar.close()

    def candidate(self, method: str, layer: int, key: str, stage: str) -> dict | None:
        """Mean scores of one candidate over the facts (None when the budget stopped it before any fact)."""
        scores = []
        for fact in self.facts:
            k = trial_key(method, layer, key, _fact_id(fact))
            if k not in self.rows:
                if self.deadline is not None and time.perf_counter() > self.deadline:
                    self.out_of_budget = True
                    break
                row = {"key": k, "method": method, "layer": layer, "layers": candidate_layers(method, layer),
                       "key_position": key, "fact": _fact_id(fact), **self._trial(fact, method, layer, key)}
                self.rows[k] = row
                if self.store is not None:
                    self.store.append(row)
                self.bar.update(1)
            scores.append(self.rows[k])
        if not scores:
            return None
        mean = {m: _mean([r[m] for r in scores]) for m in ("S", "ES", "PS", "NS", "NKL", "seconds")}
        return {"method": method, "layer": layer, "layers": candidate_layers(method, layer), "key_position": key,
                "stage": stage, "n": len(scores), **mean}

    def per_fact_s(self, method: str, layer: int, key: str) -> dict[str, float]:
        out = {}
        for fact in self.facts:
            row = self.rows.get(trial_key(method, layer, key, _fact_id(fact)))
            if row is not None and row["S"] is not None:
                out[_fact_id(fact)] = row["S"]
        return out

    def _trial(self, fact: Fact, method: str, layer: int, key: str) -> dict:
        from locedit.editing.api import edit

        fid = _fact_id(fact)
        if fid not in self._before:
            self._before[fid] = _snapshot(self.lm, fact)
        sites = None
        if key == "carrier":
            if fid not in self._sites:
                from locedit.localization.sites import locate

                self._sites[fid] = locate(self.lm, fact)
            sites = self._sites[fid]
        t0 = time.perf_counter()
        new = EditRequest(fact, " " + str(fact.meta["target_new"]).strip())
        try:
            e = edit(self.lm, new, method=method, layers=candidate_layers(method, layer), key_position=key,
                     hparams=self.hparams[method], sites=sites)
        except FactError as exc:
            return {"S": None, "ES": None, "PS": None, "NS": None, "NKL": None, "seconds": None, "error": str(exc)}
        try:
            after = _snapshot(self.lm, fact)
        finally:
            e.revert()
        return {**_metrics(self._before[fid], after), "seconds": time.perf_counter() - t0}


def _probes(fact: Fact) -> tuple[str, str, list[str], list[str], list[str]]:
    """New and true targets, the prompt and its paraphrases, the neighbour prompts, the prefixed neighbours."""
    from locedit.verification.metrics import continuation

    meta = fact.meta or {}
    new = " " + str(meta["target_new"]).strip()
    prompts = [fact.prompt] + [str(p) for p in meta.get("paraphrases") or []]
    neighbours = [str(p) for p in meta.get("neighborhood") or []]
    prefixed = [f"{fact.prompt}{new}. {p}" for p in neighbours]
    return new, continuation(fact.prompt, fact.target), prompts, neighbours, prefixed


def _snapshot(lm, fact: Fact) -> dict:
    """P(new), P(true) on every prompt and neighbour, and the next-token log-probabilities after the prefixed
    neighbours (what NKL compares), on the model as it is now."""
    from locedit.verification.metrics import continuation, next_token_logprobs, target_probs

    new, true, prompts, neighbours, prefixed = _probes(fact)
    pairs = [(p, continuation(p, t)) for p in prompts + neighbours for t in (new, true)]
    probs = target_probs(lm, pairs).reshape(-1, 2)
    return {"probs": probs, "k": len(prompts), "nt": next_token_logprobs(lm, prefixed) if prefixed else None}


def _metrics(before: dict, after: dict) -> dict:
    """ES (rewrite prompt), PS (paraphrases), NS (neighbours keep the true target), S, NKL (prefixed neighbours)."""
    from locedit.verification.metrics import harmonic_mean, kl_divergence, success_and_magnitude

    p, k = after["probs"], after["k"]
    es, _ = success_and_magnitude(p[:1, 0], p[:1, 1])
    ps, _ = success_and_magnitude(p[1:k, 0], p[1:k, 1])
    ns, _ = success_and_magnitude(p[k:, 1], p[k:, 0])
    nkl = None if before["nt"] is None else float(np.mean(kl_divergence(before["nt"], after["nt"])))
    return {"S": harmonic_mean([es, ps, ns]), "ES": es, "PS": ps, "NS": ns, "NKL": nkl}


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return float(np.mean(values)) if values else None

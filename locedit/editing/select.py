"""Per-fact site selection (`edit(..., sites="select")`): shortlist a few edit sites, make a trial edit at each,
score it on **selection probes** that are never the evaluation's prompts, and keep the best.

* Shortlist (`shortlist`), in this order, duplicates dropped, at most `max_trials`: the calibrated site of these
  weights (when they have one), the layer ROME's closed-form neighbour leak ranks first
  (`layer_predictor.rome_reach_scores`, on the selection probes), locate's top MLP layers (carrier key), and the
  calibrated layer with the other key position.
* Selection probes (`selection_probes`): paraphrases built for selection — the subject written in the prompts of
  other facts of the same relation (relation templates), then the prompt after model-written context prefixes
  (seed and length unlike ROME's templates) — and neighbours: other facts of the same relation that the model
  knows, with a different subject. The fact's own paraphrases and neighbourhood prompts are always left out.
  Neighbours come from `pool` (the user's facts, e.g. the rest of the fact file); without one, from locedit's
  curated facts; other relations' facts only when the relation has none (documented fallback).
* Score (`probe_score`): PS_sel (P(new) > P(true) on the paraphrases), NS_sel (each neighbour's P(true) >
  P(new)), S_sel = their harmonic mean, NKL_sel (next-token KL after "prompt new. neighbour"). The best trial
  has the highest S_sel, then the lowest NKL_sel, then comes first in the shortlist.

Model knowledge stays in the adapters: nothing here looks at the model family."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from locedit.core.facts import EditRequest, Fact
from locedit.errors import EditError

SELECTION_SEED = 7919  # context prefixes for selection: not ROME's seed (0)
PREFIX_TOKENS = 8  # and not ROME's lengths (5, 10) nor MEMIT's (10)


@dataclass
class Selection:
    """Options of `sites="select"`. `pool`: facts to draw neighbour probes and relation templates from (None: the
    curated set). `max_trials`: shortlist size (trial edits per fact)."""

    pool: Sequence[Fact] | None = None
    max_trials: int = 3  # with locate, probes and the predictor: under 4 edits of cost (the bound)
    n_paraphrases: int = 4
    n_neighbours: int = 5
    predictor: bool = True
    locate_layers: int = 2


@dataclass
class Probes:
    """Selection probes of one fact: paraphrases (new target should win), neighbour prompts with their true
    targets (those should win), and where each came from."""

    new: str
    true: str
    paraphrases: list[str]
    neighbours: list[tuple[str, str]]
    sources: dict = field(default_factory=dict)


def _order(items, salt: str):
    return sorted(items, key=lambda s: hashlib.sha256((salt + "\x1f" + str(s)).encode()).hexdigest())


def _template(fact: Fact) -> str:
    return fact.prompt.replace(fact.subject, "{}", 1)


def _overlaps(a: str, b: str) -> bool:
    return a in b or b in a


def selection_probes(lm, fact: Fact, new_target: str, pool: Sequence[Fact] | None = None, *,
                     n_paraphrases: int = 4, n_neighbours: int = 5) -> Probes:
    """The selection probes of `fact` edited to `new_target` (module docstring); never the fact's own prompt,
    paraphrases or neighbourhood prompts."""
    from locedit.core.datasets import curated_facts, known_facts
    from locedit.editing.templates import context_templates
    from locedit.verification.metrics import continuation

    meta = fact.meta or {}
    excluded = {fact.prompt, *[str(p) for p in meta.get("paraphrases") or []]}
    eval_neighbours = [str(p) for p in meta.get("neighborhood") or []]
    from_pool = pool is not None
    others = [f for f in (pool if from_pool else curated_facts().facts)
              if f.target is not None and not _overlaps(f.subject, fact.subject)
              and f.prompt not in eval_neighbours and not any(f.subject in p for p in eval_neighbours)]
    same = [f for f in others if fact.relation is not None and f.relation == fact.relation]
    salt = f"{fact.subject}|{fact.prompt}"
    # paraphrases: relation templates first (at most half), then model-written prefixes
    paraphrases: list[str] = []
    for t in _order(dict.fromkeys(_template(f) for f in same), salt):
        text = t.replace("{}", fact.subject, 1)
        if text not in excluded and text not in paraphrases and len(paraphrases) < (n_paraphrases + 1) // 2:
            paraphrases.append(text)
    n_relation = len(paraphrases)
    rome_templates = set(context_templates(lm, [[5, 10], [10, 10]], 0))
    prefixes = [t for t in context_templates(lm, [[PREFIX_TOKENS, n_paraphrases]], SELECTION_SEED)[1:]
                if t not in rome_templates]
    for t in prefixes:
        if len(paraphrases) < n_paraphrases:
            paraphrases.append(t.format(fact.prompt))
    # neighbours: known facts of the same relation (else of any relation), other subjects
    new_text = continuation(fact.prompt, new_target)
    source = "same relation" if same else "other relations"
    candidates = _order(same or others, salt)
    neighbours: list[tuple[str, str]] = []
    seen: set[str] = set()
    for start in range(0, len(candidates), 16):
        for f in known_facts(lm, candidates[start:start + 16], progress=False):
            true = f.target_text()
            if f.subject in seen or true.strip() == new_text.strip():
                continue
            seen.add(f.subject)
            neighbours.append((f.prompt, true))
            if len(neighbours) == n_neighbours:
                break
        if len(neighbours) == n_neighbours:
            break
    if not paraphrases or not neighbours:
        raise EditError(f"no selection probes for {fact.prompt!r} ({len(paraphrases)} paraphrases, "
                        f"{len(neighbours)} neighbours): give sites=Selection(pool=...) with other known facts")
    return Probes(new_text, continuation(fact.prompt, fact.target_text()), paraphrases, neighbours,
                  {"relation_templates": n_relation, "prefixes": len(paraphrases) - n_relation,
                   "neighbour_source": source, "pool": "given" if from_pool else "curated"})


def probe_snapshot(lm, fact: Fact, probes: Probes) -> dict:
    """P(new), P(true) on the paraphrases, P(true_n), P(new) on the neighbours, and next-token log-probabilities
    after "prompt new. neighbour", on the model as it is now."""
    from locedit.verification.metrics import continuation, next_token_logprobs, target_probs

    pairs = [(p, t) for p in probes.paraphrases for t in (probes.new, probes.true)]
    pairs += [(p, t) for p, true in probes.neighbours for t in (continuation(p, true), continuation(p, probes.new))]
    probs = np.asarray(target_probs(lm, pairs), dtype=float).reshape(-1, 2)
    prefixed = [f"{fact.prompt}{probes.new}. {p}" for p, _ in probes.neighbours]
    return {"probs": probs, "k": len(probes.paraphrases), "nt": next_token_logprobs(lm, prefixed)}


def probe_score(before: dict, after: dict) -> dict:
    """PS_sel, NS_sel, S_sel and NKL_sel of an edited model's `probe_snapshot` (`before`: the unedited one)."""
    from locedit.verification.metrics import harmonic_mean, kl_divergence, success_and_magnitude

    p, k = after["probs"], after["k"]
    ps, _ = success_and_magnitude(p[:k, 0], p[:k, 1])
    ns, _ = success_and_magnitude(p[k:, 0], p[k:, 1])
    return {"PS_sel": ps, "NS_sel": ns, "S_sel": harmonic_mean([ps, ns]),
            "NKL_sel": float(np.mean(kl_divergence(before["nt"], after["nt"])))}


def best_trial(trials: Sequence[dict]) -> int:
    """Index of the best scored trial: highest S_sel, then lowest NKL_sel, then the earliest in the shortlist."""
    scored = [i for i, t in enumerate(trials) if t.get("S_sel") is not None]
    if not scored:
        raise EditError("no trial edit of the shortlist succeeded")
    return min(scored, key=lambda i: (-trials[i]["S_sel"], trials[i]["NKL_sel"], i))


def shortlist(lm, request: EditRequest, probes: Probes, selection: Selection, site_map=None, stats=None,
              predicted: int | None = None) -> list[dict]:
    """The candidate sites `{"layer", "key_position", "source"}` (module docstring), at most `max_trials`.
    `predicted`: the predictor's layer when already computed."""
    from locedit.editing.calibration import calibrated_site

    out: list[dict] = []

    def add(layer: int, key: str, source: str) -> None:
        if not any(c["layer"] == layer and c["key_position"] == key for c in out):
            out.append({"layer": int(layer), "key_position": key, "source": source})

    site, _ = calibrated_site(lm, "rome", warn=False)
    if site is not None:
        add(site["layers"][-1], site["key_position"], "calibrated")
    if selection.predictor:
        if predicted is None:
            predicted = predicted_layer(lm, request, probes, stats)
        add(predicted, "subject_last", "predictor")
    if site_map is not None:
        for m in site_map.mlp_layers[:selection.locate_layers]:
            add(m["layer"], "carrier", "located")
    if site is not None:
        other = "carrier" if site["key_position"] == "subject_last" else "subject_last"
        if other == "subject_last" or site_map is not None:
            add(site["layers"][-1], other, "calibrated, other key")
    return out[:max(1, selection.max_trials)]


def predicted_layer(lm, request: EditRequest, probes: Probes, stats=None) -> int:
    """The layer ROME's closed-form neighbour leak ranks first, on the selection probes (never the evaluation's)."""
    from locedit.editing.layer_predictor import rome_reach_scores

    scores = rome_reach_scores(lm, request, stats, paraphrases=probes.paraphrases,
                               neighbours=[p for p, _ in probes.neighbours])
    return scores.best("neighbour")


def select_edit(lm, request: EditRequest, selection: Selection, trial: Callable, *, stats=None, corpus=None):
    """Trial-edit every shortlisted site, keep the best on the selection probes. `request.fact` has its true target;
    `trial(layer, key_position, site_map)` makes and returns one applied edit (`locedit.edit` at that site). The
    returned `Edit` is applied and records the trial table in `sites["selection"]` and the cost in `timings`."""
    from locedit.localization.sites import locate

    start = time.perf_counter()
    fact = request.fact
    if stats is None:
        from locedit.editing.hparams import read_hparams
        from locedit.editing.stats import key_statistics

        stats = key_statistics(lm, kinds=("mlp",), corpus=corpus,
                               tokens=read_hparams("rome", None).params.stats_tokens, progress=False)
    probes = selection_probes(lm, fact, request.new_target_text(), selection.pool,
                              n_paraphrases=selection.n_paraphrases, n_neighbours=selection.n_neighbours)
    t_locate = time.perf_counter()
    site_map = locate(lm, fact) if selection.locate_layers > 0 else None
    locate_s = time.perf_counter() - t_locate
    candidates = shortlist(lm, request, probes, selection, site_map, stats)
    shortlist_s = time.perf_counter() - start
    before = probe_snapshot(lm, fact, probes)
    trials, edits = [], []
    for cand in candidates:
        t0 = time.perf_counter()
        e = trial(cand["layer"], cand["key_position"], site_map if cand["key_position"] == "carrier" else None)
        try:
            score = probe_score(before, probe_snapshot(lm, fact, probes))
        finally:
            e.revert()
        trials.append({**cand, "layers": list(e.layers), **score, "seconds": time.perf_counter() - t0})
        edits.append(e)
    chosen = best_trial(trials)
    result = edits[chosen].apply(lm)
    result.sites["layer_source"] = "selected"
    result.sites["selection"] = {"trials": trials, "chosen": chosen, "probes": {
        "paraphrases": probes.paraphrases, "neighbours": [p for p, _ in probes.neighbours], **probes.sources}}
    result.timings.update({"selection_s": time.perf_counter() - start, "selection_shortlist_s": shortlist_s,
                           "selection_locate_s": locate_s, "trial_edits": len(trials),
                           "total_s": time.perf_counter() - start})
    return result

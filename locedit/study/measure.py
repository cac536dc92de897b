"""What the study measures around one edit: a snapshot of the model on a fact's prompts (before or after the edit)
and the per-edit metrics of two snapshots (ES, PS, NS, S, margins, rewrite score, generation efficacy, NKL, GE,
perplexity drift)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from locedit.core.facts import Fact


class ProbeInputs(NamedTuple):
    """The texts one fact is measured on: new and true targets (leading space), the prompt and its paraphrases,
    the neighbourhood prompts, and "<prompt> <new>. <neighbour>" for the next-token KL."""

    new: str
    true: str
    prompts: list[str]
    neighbours: list[str]
    prefixed: list[str]


def probe_inputs(fact: Fact) -> ProbeInputs:
    """The probe texts of a fact with `meta["target_new"]` (paraphrases and neighbourhood from its meta)."""
    new = " " + fact.meta["target_new"].strip()
    true = fact.target_text()
    prompts = [fact.prompt] + list(fact.meta.get("paraphrases") or [])
    neighbours = list(fact.meta.get("neighborhood") or [])
    prefixed = [f"{fact.prompt}{new}. {n}" for n in neighbours]
    return ProbeInputs(new, true, prompts, neighbours, prefixed)


def snapshot(lm, fact: Fact, *, gen_prompts: int = 1, fluency: bool = False) -> dict:
    """Everything measured on the model as it is now (edited or not) for one fact: whole-string P of the new and
    true targets on every prompt, greedy generations from the first `gen_prompts` prompts, next-token
    log-probabilities on the prefixed neighbours, GE of 30-token generations (with `fluency`) and perplexity."""
    from locedit.verification import metrics as M

    new, true, prompts, neighbours, prefixed = probe_inputs(fact)
    pairs = [(p, t) for p in prompts + neighbours for t in (new, true)]
    probs = M.target_probs(lm, pairs)
    gens = M.greedy_generate(lm, prompts[:gen_prompts], 10)
    fluency_prompts = list(fact.meta.get("generation_prompts") or []) if fluency else []
    fl = M.greedy_generate(lm, fluency_prompts, 30) if fluency_prompts else []
    return {"probs": probs, "gens": gens,
            "nt": M.next_token_logprobs(lm, prefixed) if prefixed else None,
            "GE": M.fluency([p + g for p, g in zip(fluency_prompts, fl)]) if fl else None,
            "ppl": M.perplexity(lm, M.PERPLEXITY_TEXT[:2]), "k": len(prompts)}


def edit_metrics(fact: Fact, before: dict, after: dict) -> dict:
    """The per-edit metrics of two snapshots (`snapshot` before and after the edit)."""
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

"""`verify(lm, edit)`: did the edit work, did nothing else break, and is the new attribute retrieved through the
same mechanism? Behaviour metrics (`metrics`) before and after, and the mechanistic checks (`mechanism`).

Every "before" number is measured on the unedited model: `verify` reverts the edit (`edit.reverted()`), measures,
and re-applies it (bit-exact), then measures again. An edit that is not applied is applied for the call and
reverted afterwards.

**Behaviour pass rule** (`BEHAVIOUR_RULE`): efficacy ES = 1 on the rewrite prompt, greedy generation from the
rewrite prompt contains the new target, paraphrase score PS >= 0.5 when there are paraphrases, and neighbourhood
score NS after >= NS before - 0.1 when there are neighbourhood prompts. `Verification.passed` = behaviour passed and
(when computed) every applicable mechanistic check passed. `Verification.verdict` gives the two verdicts
separately with each check's score (NS+ and NKL reported beside the rule, not in it), and `exit_status` (0/1).

`verify_models(base_lm, edited_lm, request)` verifies a model edited by another tool: the weight diff says where it
was edited, then the same measurements (`verify_states`) run with the base model as "before".
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from locedit.errors import LoceditError
from locedit.core.facts import Fact
from locedit.core.results import Result, jsonable
from locedit.verification import mechanism as mech
from locedit.verification import ripple as ripple_probes
from locedit.verification.verdict import behaviour_verdict, exit_status, verdict, verdict_lines
from locedit.verification.paired import UneditedRows
from locedit.verification.weight_diff import diff_lines, edited_mlp_layers, weight_diff
from locedit.verification.metrics import (PERPLEXITY_TEXT, contains_target, fluency, greedy_generate_ids, harmonic_mean,
                      kl_divergence, perplexity, success_and_magnitude, target_probs)

NS_TOLERANCE = 0.1
# NS+ (CounterFact+) and NKL in the behaviour rule: thresholds chosen on the tuning facts of the control-edit
# validation run data/results/validate_verify/ (`python recipes/validate_verify.py --n 100`, 50 tuning + 50 held-out
# facts, Youden cut of (+) subject-keyed edits against (-) shortcuts): tuning AUROC 0.81 and 0.92 (held-out 0.84,
# 0.94), so both are in the rule, beside the NS drop (0.96, held-out 0.97; threshold 0.1 as before). None = reported
# beside the rule, not in it.
NS_PREFIXED_TOLERANCE: float | None = 0.3  # NS+ before - NS+ after <= this
NKL_MAX: float | None = 0.646  # neighbourhood KL(before || after), nats, <= this


def behaviour_rule() -> str:
    """The behaviour pass rule in words, with the thresholds in force."""
    rule = ("ES = 1 on the rewrite prompt; greedy generation from the rewrite prompt contains the new target; "
            f"PS >= 0.5 (when paraphrases); NS after >= NS before - {NS_TOLERANCE:g} (when neighbours)")
    if NS_PREFIXED_TOLERANCE is not None:
        rule += f"; NS+ after >= NS+ before - {NS_PREFIXED_TOLERANCE:g} (when neighbours)"
    if NKL_MAX is not None:
        rule += f"; neighbourhood KL <= {NKL_MAX:g} nats (when neighbours)"
    return rule


BEHAVIOUR_RULE = behaviour_rule()
BEHAVIOUR_KEYS = ("efficacy_score", "efficacy_magnitude", "paraphrase_score", "paraphrase_magnitude",
                  "neighborhood_score", "neighborhood_magnitude", "score", "generation_efficacy",
                  "generation_efficacy_prompt", "neighborhood_score_prefixed", "fluency", "perplexity")


@dataclass
class FactInputs:
    """The prompts one edited fact is measured on."""

    fact: Fact                       # true target resolved
    new_target: str                  # as it continues the prompt
    paraphrases: list[str]
    neighborhood: list[tuple]        # (prompt or Fact, true target as it continues that prompt)
    generation_prompts: list[str]

    def prefixed(self) -> list[str]:
        """CounterFact+: "<edit prompt><target_new>. <neighbour prompt>"."""
        head = f"{self.fact.prompt}{self.new_target}."
        return [f"{head} {_prompt_text(p)}" for p, _ in self.neighborhood]


def _prompt_text(p) -> str:
    return p.prompt if isinstance(p, Fact) else p


def _per_fact(value, n: int, name: str) -> list:
    """`value` for each of n facts: None, a list for one fact, or a list of lists (one per fact)."""
    if value is None:
        return [None] * n
    value = list(value)
    if n == 1 and not (value and all(isinstance(v, (list, tuple)) and not _is_pair(v) for v in value)):
        return [value]
    if len(value) != n:
        raise LoceditError(f"{name}: give one list per edited fact ({n}), got {len(value)}")
    return [list(v) if v is not None else None for v in value]


def _is_pair(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[1], str) and isinstance(v[0], (str, Fact))


def _neighbours(items, fact: Fact) -> list[tuple]:
    """Neighbourhood prompts (true attribute = the edited fact's) or (prompt, true target) pairs or Facts."""
    out = []
    for item in items:
        if isinstance(item, Fact):
            target = item.target or fact.target
            out.append((item, _cont(item.prompt, target)))
        elif isinstance(item, str):
            out.append((item, _cont(item, fact.target)))
        elif _is_pair(item):
            out.append((item[0], _cont(_prompt_text(item[0]), item[1])))
        else:
            raise LoceditError(f"a neighbourhood item must be a prompt, a (prompt, true_target) pair or a Fact, "
                               f"not {item!r}")
    return out


def _cont(prompt: str, target: str) -> str:
    from locedit.verification.metrics import continuation

    return continuation(prompt, target)


def fact_inputs(edit, *, paraphrases=None, neighborhood=None, generation_prompts=None) -> list[FactInputs]:
    """Per edited fact: the given prompts, else those of the fact's dataset record (`fact.meta`)."""
    return inputs_for(list(edit.facts), list(edit.new_targets), paraphrases=paraphrases, neighborhood=neighborhood,
                      generation_prompts=generation_prompts)


def inputs_for(facts: Sequence[Fact], new_targets: Sequence[str], *, paraphrases=None, neighborhood=None,
               generation_prompts=None) -> list[FactInputs]:
    """Per fact (its true target resolved) and new target: the given prompts, else the fact's dataset record's."""
    facts = list(facts)
    n = len(facts)
    para = _per_fact(paraphrases, n, "paraphrases")
    neigh = _per_fact(neighborhood, n, "neighborhood")
    gen = _per_fact(generation_prompts, n, "generation_prompts")
    out = []
    for i, (fact, new) in enumerate(zip(facts, new_targets)):
        if fact.target is None:
            raise LoceditError(f"the edited fact {fact.prompt!r} has no true target")
        meta = fact.meta if isinstance(fact.meta, dict) else {}
        p = para[i] if para[i] is not None else list(meta.get("paraphrases") or [])
        if neigh[i] is not None:
            nb = neigh[i]
        else:
            prompts = list(meta.get("neighborhood") or [])
            targets = meta.get("neighborhood_targets")
            nb = list(zip(prompts, targets)) if targets and len(targets) == len(prompts) else prompts
        g = gen[i] if gen[i] is not None else list(meta.get("generation_prompts") or [])
        out.append(FactInputs(fact, _cont(fact.prompt, new), [str(x) for x in p], _neighbours(nb, fact),
                              [str(x) for x in g]))
    return out


# --- behaviour -------------------------------------------------------------------------------------------------------
def generation_plan(inputs: Sequence[FactInputs], generation_tokens: int = 10,
                    fluency_tokens: int = 30) -> tuple[list[str], list[tuple[int, str]], list[int]]:
    """verify's greedy generations: the prompts (per fact: efficacy = rewrite + paraphrases, then fluency
    prompts), each one's (fact, kind) and its number of new tokens."""
    gen_prompts, gen_index = [], []
    for i, x in enumerate(inputs):
        for p in [x.fact.prompt] + x.paraphrases:
            gen_prompts.append(p)
            gen_index.append((i, "efficacy"))
        for p in x.generation_prompts:
            gen_prompts.append(p)
            gen_index.append((i, "fluency"))
    # efficacy needs generation_tokens; fluency texts (and efficacy prompts that stand in for them) fluency_tokens
    longest = max(generation_tokens, fluency_tokens)
    lengths = [longest if kind == "fluency" or not inputs[i].generation_prompts else generation_tokens
               for i, kind in gen_index]
    return gen_prompts, gen_index, lengths


def paired_generations(lm, inputs: Sequence[FactInputs], paired, *, generation_tokens: int = 10,
                       fluency_tokens: int = 30) -> tuple[list[list[int]], list[list[int]]]:
    """The generations of both states in one decode loop (`paired`: an entered `UneditedRows` of the applied
    edit): (unedited, edited) token ids per `generation_plan` prompt."""
    prompts, _, lengths = generation_plan(inputs, generation_tokens, fluency_tokens)
    # each prompt twice, side by side (unedited, edited), so that a batch holds both states of its prompts
    ids = greedy_generate_ids(lm, [p for p in prompts for _ in (0, 1)], [n for n in lengths for _ in (0, 1)],
                              row_flags=[True, False] * len(prompts), set_rows=paired.set_rows)
    return ids[0::2], ids[1::2]


def measure_behaviour(lm, inputs: Sequence[FactInputs], *, generation_tokens: int = 10, fluency_tokens: int = 30,
                      perplexity_text: Sequence[str] = PERPLEXITY_TEXT,
                      generated: list[list[int]] | None = None) -> dict:
    """Raw measurements of the current model state (one batched scoring pass, one generation pass).
    `generated`: the token ids of this state's `generation_plan` generations, when already made."""
    pairs, index = [], []
    for i, x in enumerate(inputs):
        true = x.fact.target_text()
        for group, prompts in (("rewrite", [x.fact.prompt]), ("paraphrase", x.paraphrases)):
            for p in prompts:
                pairs += [(p, x.new_target), (p, true if p == x.fact.prompt else _cont(p, x.fact.target))]
                index.append((i, group))
        for (p, t), pre in zip(x.neighborhood, x.prefixed()):
            pairs += [(_prompt_text(p), _cont(_prompt_text(p), x.new_target)), (_prompt_text(p), t)]
            index.append((i, "neighborhood"))
            pairs += [(pre, _cont(pre, x.new_target)), (pre, t)]
            index.append((i, "prefixed"))
    # the next-token distributions after the prefixed neighbour prompts (NKL) come from the same forward
    first = {2 * k: None for k, (_, group) in enumerate(index) if group == "prefixed"}
    probs = target_probs(lm, pairs, first_logprobs=first).reshape(-1, 2) if pairs else np.zeros((0, 2))
    per_fact: list[dict] = [{"rewrite": [], "paraphrase": [], "neighborhood": [], "prefixed": []} for _ in inputs]
    for (i, group), (p_new, p_true) in zip(index, probs):
        per_fact[i][group].append([float(p_new), float(p_true)])
    logprobs = torch.stack([first[k] for k in sorted(first)]) if first else None
    gen_prompts, gen_index, lengths = generation_plan(inputs, generation_tokens, fluency_tokens)
    ids = generated if generated is not None else greedy_generate_ids(lm, gen_prompts, lengths)
    decode = lm.tokenizer.decode
    for d in per_fact:
        d["generations"], d["fluency_texts"] = [], []
    for (i, kind), prompt, toks in zip(gen_index, gen_prompts, ids):
        d = per_fact[i]
        if kind == "efficacy":
            d["generations"].append({"prompt": prompt, "text": decode(toks[:generation_tokens],
                                                                       skip_special_tokens=True)})
            if not inputs[i].generation_prompts:  # no generation prompts: fluency of the efficacy prompts
                d["fluency_texts"].append(prompt + decode(toks[:fluency_tokens], skip_special_tokens=True))
        else:
            d["fluency_texts"].append(prompt + decode(toks[:fluency_tokens], skip_special_tokens=True))
    return {"per_fact": per_fact, "logprobs": logprobs, "perplexity": perplexity(lm, perplexity_text)}


def _scores(inputs: Sequence[FactInputs], state: dict) -> dict:
    """Per-fact and averaged scores of one state."""
    facts = []
    for x, d in zip(inputs, state["per_fact"]):
        rw, pp, nb, pre = (np.array(d[k]).reshape(-1, 2) for k in ("rewrite", "paraphrase", "neighborhood",
                                                                     "prefixed"))
        es, em = success_and_magnitude(rw[:, 0], rw[:, 1])
        ps, pm = success_and_magnitude(pp[:, 0], pp[:, 1])
        ns, nm = success_and_magnitude(nb[:, 1], nb[:, 0])
        ns_pre, _ = success_and_magnitude(pre[:, 1], pre[:, 0])
        hits = [contains_target(g["text"], x.new_target) for g in d["generations"]]
        facts.append({"efficacy_score": es, "efficacy_magnitude": em, "paraphrase_score": ps,
                      "paraphrase_magnitude": pm, "neighborhood_score": ns, "neighborhood_magnitude": nm,
                      "score": harmonic_mean([es, ps, ns]),
                      "generation_efficacy": float(np.mean(hits)) if hits else None,
                      "generation_efficacy_prompt": bool(hits[0]) if hits else None,
                      "neighborhood_score_prefixed": ns_pre, "fluency": fluency(d["fluency_texts"])})
    out: dict[str, Any] = {}
    for key in facts[0]:
        values = [f[key] for f in facts if f[key] is not None]
        if key == "generation_efficacy_prompt":
            out[key] = all(values) if values else None
        else:
            out[key] = float(np.mean(values)) if values else None
    out["perplexity"] = state["perplexity"]
    return {"mean": out, "per_fact": facts}


def behaviour_metrics(inputs: Sequence[FactInputs], before: dict, after: dict) -> dict:
    b, a = _scores(inputs, before), _scores(inputs, after)
    out = dict(a["mean"])
    out["neighborhood_kl"] = None
    if before["logprobs"] is not None:
        out["neighborhood_kl"] = float(np.mean(kl_divergence(before["logprobs"], after["logprobs"])))
    out["perplexity_before"] = before["perplexity"]
    out["perplexity_drift"] = after["perplexity"] / before["perplexity"] - 1
    out["before"] = b["mean"]
    # the rule's criteria are the verdict's (one implementation): passed when every one of them passed
    out["passed"] = behaviour_verdict(out, NS_TOLERANCE, NS_PREFIXED_TOLERANCE, NKL_MAX)["passed"]
    out["rule"] = behaviour_rule()
    out["per_fact"] = []
    for x, fa, fb, da, db in zip(inputs, a["per_fact"], b["per_fact"], after["per_fact"], before["per_fact"]):
        out["per_fact"].append({
            "prompt": x.fact.prompt, "true_target": x.fact.target_text(), "new_target": x.new_target,
            "after": fa, "before": fb,
            "probs_after": {k: da[k] for k in ("rewrite", "paraphrase", "neighborhood", "prefixed")},
            "probs_before": {k: db[k] for k in ("rewrite", "paraphrase", "neighborhood", "prefixed")},
            "paraphrases": x.paraphrases, "neighborhood": [[_prompt_text(p), t] for p, t in x.neighborhood],
            "generations_after": da["generations"], "generations_before": db["generations"],
            "fluency_texts_after": da["fluency_texts"]})
    return out


# --- the result ------------------------------------------------------------------------------------------------------
@dataclass
class Verification(Result):
    """The outcome of `verify`: `.behaviour` (after-edit metrics, `before`, per fact), `.mechanism` (per check:
    numbers, `passed`, `rule`, `evidence`; for the first edited facts), `.passed`, and the `Result` interface:
    `.summary()`, `.plot()`, `.to_dict()`, `.save(path)`, `_repr_html_()`."""

    method: str
    model: str
    facts: list
    sites: dict
    behaviour: dict
    mechanism: dict | None
    seconds: float
    timings: dict = field(default_factory=dict)
    weight_diff: list | None = None  # verify_models: the tensors that differ, their rank and where they are
    ripple: dict | None = None  # ripple probes' rates and numbers (reported, not in the pass rule)

    @property
    def passed(self) -> bool:
        ok = bool(self.behaviour.get("passed"))
        if self.mechanism is not None:
            ok = ok and bool(self.mechanism.get("passed"))
        return ok

    @property
    def verdict(self) -> dict:
        """Behaviour and mechanism verdicts separately, each check's score beside its pass, and `exit_status`
        (0 passed, 1 failed: what `locedit verify` returns)."""
        return verdict(self.behaviour, self.mechanism, NS_TOLERANCE, NS_PREFIXED_TOLERANCE, NKL_MAX)

    @property
    def exit_status(self) -> int:
        """0 when the verification passed, 1 when it failed."""
        return exit_status(self.passed)

    def to_dict(self) -> dict:
        d = {"analysis": "verify", "method": self.method, "model": self.model, "facts": self.facts,
             "sites": self.sites, "passed": self.passed, "verdict": self.verdict, "behaviour": self.behaviour,
             "mechanism": self.mechanism, "seconds": self.seconds, "timings": self.timings}
        if self.weight_diff is not None:
            d["weight_diff"] = self.weight_diff
        if self.ripple is not None:
            d["ripple"] = self.ripple
        return jsonable(d)

    def summary(self) -> str:
        """The edit, its behaviour before -> after, each mechanistic check and the verdict."""
        return summary_text(self.to_dict())

    def plot(self, ax=None):
        """The verification figure (several panels: `ax` is not used)."""
        from locedit.verification.plots import verification_figure

        return verification_figure(self.to_dict())


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(float(v), spec)


def summary_text(d: dict) -> str:
    """A few lines for the terminal from a Verification's dict."""
    b = d["behaviour"]
    before = b["before"]
    lines = []
    for f in d["facts"][:3]:
        lines.append(f"edit ({d['method']}, layers {d['sites'].get('layers')}): {f['prompt']!r}: "
                     f"{f['true_target']!r} -> {f['new_target']!r}")
    if d.get("weight_diff") is not None:
        lines += diff_lines(d["weight_diff"])
    lines.append("behaviour (before -> after): "
                 f"ES {_fmt(before['efficacy_score'])} -> {_fmt(b['efficacy_score'])} "
                 f"(EM {_fmt(b['efficacy_magnitude'], '+.2f')}), "
                 f"PS {_fmt(before['paraphrase_score'])} -> {_fmt(b['paraphrase_score'])}, "
                 f"NS {_fmt(before['neighborhood_score'])} -> {_fmt(b['neighborhood_score'])}, "
                 f"S {_fmt(b['score'])}")
    gen = b["per_fact"][0]["generations_after"][0]["text"] if b["per_fact"] and b["per_fact"][0][
        "generations_after"] else ""
    lines.append(f"  generation efficacy {_fmt(b['generation_efficacy'])} (prompt: {gen!r}); "
                 f"neighbourhood KL {_fmt(b['neighborhood_kl'], '.4f')} nats; NS+ (prefixed) "
                 f"{_fmt(b['neighborhood_score_prefixed'])}; fluency {_fmt(before['fluency'])} -> "
                 f"{_fmt(b['fluency'])} bits; perplexity {_fmt(b['perplexity_before'])} -> {_fmt(b['perplexity'])} "
                 f"({_fmt(100 * b['perplexity_drift'], '+.1f')}%)")
    lines.append(f"  behaviour {'PASSED' if b['passed'] else 'FAILED'} ({b['rule']})")
    m = d.get("mechanism")
    if m is not None:
        k, e, n, loc = m["knockout"], m["extraction"], m["enrichment"], m["locality"]
        parts = [f"knockout {_verdict(k)} (critical layer {k['critical_layer_before']} -> "
                 f"{k['critical_layer_after']}, centre shift {k['layer_shift']:+.1f}, "
                 f"r = {k['curve_correlation']:.2f}, "
                 f"subject block -{k['subject_drop_after']:.0f}% / log-odds -{k['subject_logodds_drop_after']:.1f})",
                 f"extraction {_verdict(e)} (heads {', '.join(f'L{l}H{h}' for l, h in e['heads'])}: new-old "
                 f"{e['new_minus_old_before']:+.2f} -> {e['new_minus_old_after']:+.2f})"]
        if n.get("applicable"):
            tag = "" if n.get("in_rule", True) else " (evidence)"
            parts.append(f"logit lens {_verdict(n)}{tag} (L{n['layer']} at {n['token']!r}: best rank of new "
                         f"{n['new_best_rank_before']} -> {n['new_best_rank_after']}, old median "
                         f"{n['old_median_rank_before']:.0f} -> {n['old_median_rank_after']:.0f})")
        else:
            parts.append(f"logit lens n/a ({n.get('reason')})")
        for name, key in (("sufficiency", "logodds_gain"), ("necessity", "logodds_drop"), ("ov_read", "gain")):
            c = m.get(name)
            if c is None:
                continue
            if not c.get("applicable"):
                parts.append(f"{name} n/a ({c.get('reason')})")
            elif name == "ov_read":
                parts.append(f"OV read {_verdict(c)} (new-old {c['new_minus_old_before']:+.2f} -> "
                             f"{c['new_minus_old_after']:+.2f})")
            else:
                start = c["p_new_before"] if name == "sufficiency" else c["p_new_after"]
                sign = "+" if name == "sufficiency" else "-"
                parts.append(f"{name} {_verdict(c)} (p(new) {start:.3f} -> {c['p_new_patched']:.3f} patched, "
                             f"log-odds {sign}{c[key]:.2f})")
        if loc.get("applicable"):
            parts.append(f"locality {_verdict(loc)} ({loc['same_sites']}/{loc['neighbours']} neighbours keep "
                         f"their sites, max |dp| {100 * loc['max_abs_relative_change']:.0f}%)")
        else:
            parts.append(f"locality n/a ({loc.get('reason')})")
        lines.append("mechanism: " + "; ".join(parts))
        lines.append(f"  mechanism {'PASSED' if m['passed'] else 'FAILED'}")
    lines += ripple_probes.ripple_lines(d.get("ripple"))
    if d.get("verdict") is not None:
        lines += verdict_lines(d["verdict"])
    lines.append(f"verdict: {'PASSED' if d['passed'] else 'FAILED'} ({d['seconds']:.1f} s)")
    return "\n".join(lines)


def _verdict(check: dict) -> str:
    return "pass" if check.get("passed") else "FAIL"


# --- verify ----------------------------------------------------------------------------------------------------------
def verify(lm, edit, *, paraphrases=None, neighborhood=None, generation_prompts=None, mechanism: bool = True,
           sites=None, generation_tokens: int = 10, fluency_tokens: int = 30, mechanism_facts: int = 1,
           perplexity_text: Sequence[str] = PERPLEXITY_TEXT, ripple=None) -> Verification:
    """Verify an edit (applied or not; it is left as it was).

    `paraphrases`, `generation_prompts`: prompts (for an edit of several facts, one list per fact);
    `neighborhood`: prompts whose true attribute is the edited fact's (CounterFact), `(prompt, true_target)` pairs
    (EasyEdit locality rows) or Facts. Defaults come from the fact's dataset record (`fact.meta`). `sites`: the
    fact's SiteMap (or its dict), whose top heads the extraction check reads (default: the heads with the largest
    direct logit to the old target before the edit). `mechanism_facts`: how many of the edited facts get the
    mechanistic checks. Greedy generations: `generation_tokens` for generation efficacy, `fluency_tokens` for GE.
    `ripple`: ripple probes (`verification.ripple`; reported, not in the pass rule): None = the knowledge table's for
    the edited facts, False = none, or `[(prompt, expected[, old])]`."""
    start = time.perf_counter()
    inputs = fact_inputs(edit, paraphrases=paraphrases, neighborhood=neighborhood,
                         generation_prompts=generation_prompts)
    probes, probe_info = ripple_probes.verify_probes([x.fact for x in inputs], [x.new_target for x in inputs], ripple)
    setups = mechanism_setups(lm, inputs, edit.sites, sites, mechanism_facts) if mechanism else []
    options = dict(generation_tokens=generation_tokens, fluency_tokens=fluency_tokens,
                   perplexity_text=perplexity_text)
    context = contextlib.nullcontext() if edit.is_applied else edit.applied(lm)
    with context:
        paired = UneditedRows(lm, edit) if UneditedRows.supports(lm, edit) else None
        behaviour, mechanism_result, timings = verify_states(lm, lm, inputs, setups, before=edit.reverted,
                                                             paired=paired, **options)
        t = time.perf_counter()
        ripple_result = (ripple_probes.measure(lm, lm, probes, before=edit.reverted, info=probe_info)
                         if probes else None)
        timings["ripple"] = time.perf_counter() - t
    return Verification(edit.method, getattr(lm, "name", "?"), fact_rows(inputs), jsonable(dict(edit.sites)),
                        behaviour, mechanism_result, time.perf_counter() - start, timings, ripple=ripple_result)


def mechanism_setups(lm, inputs: Sequence[FactInputs], edit_sites: dict, sitemap, mechanism_facts: int) -> list:
    """The mechanistic checks' inputs for the first `mechanism_facts` facts (`sitemap`'s heads for the first)."""
    return [mech.setup_for(lm, x.fact, x.new_target, edit_sites, i, x.neighborhood,
                           sitemap=sitemap if i == 0 else None)
            for i, x in enumerate(inputs[:mechanism_facts])]


def verify_states(lm_before, lm_after, inputs: Sequence[FactInputs], setups: Sequence, *,
                  before=contextlib.nullcontext, generation_tokens: int = 10, fluency_tokens: int = 30,
                  perplexity_text: Sequence[str] = PERPLEXITY_TEXT,
                  paired=None) -> tuple[dict, dict | None, dict]:
    """The one implementation behind `verify` and `verify_models`: behaviour and mechanism measured on
    `lm_before` (inside the `before()` context: the edit reverted) and on `lm_after`, then compared.
    `paired` (an `UneditedRows` of the applied edit, `lm_before is lm_after`): both states' greedy generations
    come from one decode loop. Returns (behaviour, mechanism or None, timings)."""
    timings: dict[str, float] = {}
    options = dict(generation_tokens=generation_tokens, fluency_tokens=fluency_tokens,
                   perplexity_text=perplexity_text)
    generated: tuple = (None, None)
    if paired is not None:
        t = time.perf_counter()
        with paired:
            generated = paired_generations(lm_after, inputs, paired, generation_tokens=generation_tokens,
                                           fluency_tokens=fluency_tokens)
        timings["generation_both"] = time.perf_counter() - t
    with before():
        t = time.perf_counter()
        state_before = measure_behaviour(lm_before, inputs, **options, generated=generated[0])
        timings["behaviour_before"] = time.perf_counter() - t
        t = time.perf_counter()
        mech_before = [mech.measure(lm_before, s, after=False) for s in setups]
        timings["mechanism_before"] = time.perf_counter() - t
    t = time.perf_counter()
    state_after = measure_behaviour(lm_after, inputs, **options, generated=generated[1])
    timings["behaviour_after"] = time.perf_counter() - t
    t = time.perf_counter()
    # necessity (the unedited state patched into the edited model) comes from the OV reads' forward
    mech_after = [mech.measure(lm_after, s, after=True, heads=b["ov_heads"], patch_state=mech.patch_state(s, b))
                  for s, b in zip(setups, mech_before)]
    timings["mechanism_after"] = time.perf_counter() - t
    if setups:  # sufficiency: the edited state in the unedited model
        t = time.perf_counter()
        with before():
            for s, b, a in zip(setups, mech_before, mech_after):
                b["patched"] = mech.cross_patch(lm_before, s, b, a)
        timings["mechanism_before"] += time.perf_counter() - t
    behaviour = behaviour_metrics(inputs, state_before, state_after)
    mechanism_result = None
    if setups:
        per_fact = [mech.compare(lm_after, s, b, a) for s, b, a in zip(setups, mech_before, mech_after)]
        mechanism_result = dict(per_fact[0])
        if len(per_fact) > 1:
            mechanism_result["per_fact"] = per_fact
            mechanism_result["passed"] = all(p["passed"] for p in per_fact)
    return behaviour, mechanism_result, timings


def fact_rows(inputs: Sequence[FactInputs]) -> list[dict]:
    """The verified facts, as the result lists them."""
    return [{"subject": x.fact.subject, "prompt": x.fact.prompt, "true_target": x.fact.target_text(),
             "new_target": x.new_target, "relation": x.fact.relation,
             "id": x.fact.meta.get("id") if isinstance(x.fact.meta, dict) else None} for x in inputs]


# --- verify_models: an edit made by another tool ----------------------------------------------------------------------
def verify_models(base_lm, edited_lm, request, *, paraphrases=None, neighborhood=None, generation_prompts=None,
                  mechanism: bool = True, sites=None, generation_tokens: int = 10, fluency_tokens: int = 30,
                  perplexity_text: Sequence[str] = PERPLEXITY_TEXT, ripple=None) -> Verification:
    """Verify an edited model against its base without an `Edit` (a model edited by EasyEdit, a fine-tuned copy,
    a `save_model` directory): the two are checked compatible (architecture, geometry, parameters, tokenizer
    vocabulary; ModelMismatchError otherwise), the tensors that differ are listed with the rank of each change and
    where it is (`Verification.weight_diff`), then behaviour (the base model = before) and the mechanistic checks
    as `verify` runs them, at the MLP layers the diff finds (enrichment n/a when no MLP output projection changed).

    `request`: an EditRequest (or a list of them); a fact without a target gets the base model's top-1. The other
    options are `verify`'s. Neither model's weights change."""
    from locedit.core.facts import EditRequest

    start = time.perf_counter()
    requests = [request] if isinstance(request, EditRequest) else list(request)
    if not requests or not all(isinstance(r, EditRequest) for r in requests):
        raise LoceditError("verify_models needs an EditRequest (or a list of them)")
    t = time.perf_counter()
    diff = weight_diff(base_lm, edited_lm)
    diff_seconds = time.perf_counter() - t
    facts = [request_for_models(base_lm, r).fact for r in requests]  # FactError: top-1 is the new target
    inputs = inputs_for(facts, [r.new_target for r in requests], paraphrases=paraphrases,
                        neighborhood=neighborhood, generation_prompts=generation_prompts)
    edit_sites = {"layers": edited_mlp_layers(diff), "heads": [], "key_position": "subject_last",
                  "source": "weight_diff"}
    setups = mechanism_setups(base_lm, inputs, edit_sites, sites, 1) if mechanism else []
    behaviour, mechanism_result, timings = verify_states(
        base_lm, edited_lm, inputs, setups, generation_tokens=generation_tokens, fluency_tokens=fluency_tokens,
        perplexity_text=perplexity_text)
    timings["weight_diff"] = diff_seconds
    probes, probe_info = ripple_probes.verify_probes(facts, [x.new_target for x in inputs], ripple)
    ripple_result = ripple_probes.measure(base_lm, edited_lm, probes, info=probe_info) if probes else None
    name = f"{getattr(base_lm, 'name', '?')} -> {getattr(edited_lm, 'name', '?')}"
    return Verification("external", name, fact_rows(inputs), jsonable(edit_sites), behaviour, mechanism_result,
                        time.perf_counter() - start, timings, weight_diff=diff, ripple=ripple_result)


def _with_true_target(lm, fact: Fact) -> Fact:
    if fact.target is not None:
        return fact
    return Fact(fact.subject, fact.prompt, lm.predict(fact)[0].token, fact.relation, fact.meta)


def request_for_models(base_lm, request):
    """`request` with its fact's true target resolved on the base model (its top-1 when none was given)."""
    from locedit.core.facts import EditRequest

    return EditRequest(_with_true_target(base_lm, request.fact), request.new_target)

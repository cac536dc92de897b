"""The verdict of a verification, for a script: behaviour and mechanism separately, each check with its continuous
score beside its pass, and the exit status the CLI returns (0 passed, 1 failed; 2 is a user error).

The behaviour rule is `verify.behaviour_rule()`. NS+ (the neighbourhood score with the edit prompt prefixed,
CounterFact+) and NKL (the neighbourhood KL) are in it when `verify.NS_PREFIXED_TOLERANCE` / `verify.NKL_MAX` are set
(thresholds from the control-edit validation run, `recipes/validate_verify.py`), else reported with `in_rule: False`.
Mechanistic checks carry `in_rule` too: those that failed validation are evidence, not part of the verdict.
"""

from __future__ import annotations

from typing import Any, Mapping

EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_USER_ERROR = 2


def criterion(name: str, score: float | bool | None, passed: bool | None, rule: str, *,
              in_rule: bool = True) -> dict:
    """One line of a verdict: what was measured, its value, whether it passed and the rule it is held to."""
    value = None if score is None else (bool(score) if isinstance(score, bool) else float(score))
    return {"name": name, "score": value, "passed": None if passed is None else bool(passed), "rule": rule,
            "in_rule": in_rule}


def behaviour_verdict(behaviour: Mapping[str, Any], ns_tolerance: float, ns_prefixed_tolerance: float | None = None,
                      nkl_max: float | None = None) -> dict:
    """The behaviour rule's criteria with their scores; NS+ and NKL are in the rule when their validated
    thresholds are given (`verify.NS_PREFIXED_TOLERANCE`, `verify.NKL_MAX`), else reported beside it."""
    before = behaviour["before"]
    es = behaviour["efficacy_score"]
    checks = [criterion("efficacy_score", es, es == 1.0, "ES = 1"),
              criterion("generation_efficacy_prompt", bool(behaviour["generation_efficacy_prompt"]),
                        bool(behaviour["generation_efficacy_prompt"]),
                        "greedy generation from the rewrite prompt contains the new target")]
    ps = behaviour["paraphrase_score"]
    if ps is not None:
        checks.append(criterion("paraphrase_score", ps, ps >= 0.5, "PS >= 0.5"))
    ns, ns_before = behaviour["neighborhood_score"], before["neighborhood_score"]
    if ns is not None:
        checks.append(criterion("neighborhood_score_drop", ns_before - ns, ns >= ns_before - ns_tolerance,
                                f"NS before - NS after <= {ns_tolerance:g}"))
    reported = []
    pre, pre_before = behaviour.get("neighborhood_score_prefixed"), before.get("neighborhood_score_prefixed")
    if pre is not None:
        drop = (pre_before or 0.0) - pre
        if ns_prefixed_tolerance is None:
            reported.append(criterion("neighborhood_score_prefixed_drop", drop, None,
                                      f"NS+ before ({_fmt(pre_before)}) - NS+ after ({_fmt(pre)}); no validated "
                                      "threshold", in_rule=False))
        else:
            checks.append(criterion("neighborhood_score_prefixed_drop", drop,
                                    pre >= (pre_before or 0.0) - ns_prefixed_tolerance,
                                    f"NS+ before - NS+ after <= {ns_prefixed_tolerance:g} (CounterFact+)"))
    nkl = behaviour.get("neighborhood_kl")
    if nkl is not None:
        if nkl_max is None:
            reported.append(criterion("neighborhood_kl", nkl, None, "KL(before || after) on the prefixed "
                                      "neighbours, nats; no validated threshold", in_rule=False))
        else:
            checks.append(criterion("neighborhood_kl", nkl, nkl <= nkl_max,
                                    f"KL(before || after) on the prefixed neighbours <= {nkl_max:g} nats"))
    return {"passed": all(c["passed"] for c in checks), "checks": checks, "reported": reported}


# per check: the continuous score (key, what it means; higher is better unless it says otherwise)
MECHANISM_SCORES = {
    "knockout": ("subject_logodds_drop_after", "log-odds drop of p(new) when last -> subject is blocked"),
    "extraction": ("new_minus_old_after", "summed direct logit of new minus old at the extraction heads"),
    "sufficiency": ("logodds_gain", "log-odds gain of p(new) when the edited subject state is patched into the "
                                    "unedited model"),
    "necessity": ("logodds_drop", "log-odds drop of p(new) when the unedited subject state is patched into the "
                                  "edited model"),
    "ov_read": ("gain", "rise of the extraction heads' OV read (new minus old) of the subject state"),
    "enrichment": ("new_best_rank_after", "best logit-lens rank of new in the subject state (lower is better)"),
    "locality": ("max_abs_relative_change", "largest relative change of a neighbour's p(true) (lower is better)"),
}


def mechanism_verdict(mechanism: Mapping[str, Any] | None) -> dict | None:
    """Per mechanistic check: applicable, passed, its continuous score, what the score means and whether the
    verdict counts it (`in_rule`; the others are evidence)."""
    if mechanism is None:
        return None
    checks = {}
    for name, (key, meaning) in MECHANISM_SCORES.items():
        check = mechanism.get(name)
        if check is None:
            continue
        applicable = check.get("applicable", True)
        checks[name] = {"applicable": bool(applicable), "passed": check.get("passed") if applicable else None,
                        "score": check.get(key) if applicable else None, "score_name": key,
                        "score_meaning": meaning, "rule": check.get("rule"), "in_rule": bool(check.get("in_rule",
                                                                                                       True))}
    return {"passed": bool(mechanism.get("passed")), "checks": checks}


def verdict(behaviour: Mapping[str, Any], mechanism: Mapping[str, Any] | None, ns_tolerance: float,
            ns_prefixed_tolerance: float | None = None, nkl_max: float | None = None) -> dict:
    """Behaviour and mechanism verdicts side by side, the overall pass and its exit status."""
    b = behaviour_verdict(behaviour, ns_tolerance, ns_prefixed_tolerance, nkl_max)
    m = mechanism_verdict(mechanism)
    passed = b["passed"] and (m is None or m["passed"])
    return {"passed": passed, "exit_status": exit_status(passed), "behaviour": b, "mechanism": m}


def exit_status(passed: bool) -> int:
    """The CLI's exit status for a verification: 0 when it passed, 1 when it failed."""
    return EXIT_PASSED if passed else EXIT_FAILED


def verdict_lines(v: Mapping[str, Any]) -> list[str]:
    """The verdict as terminal lines: behaviour criteria with their scores, then each mechanistic check's score."""
    b = v["behaviour"]
    parts = [f"{c['name']} {_fmt(c['score'])} {'ok' if c['passed'] else 'FAIL'}" for c in b["checks"]]
    lines = [f"verdict (behaviour): {'PASSED' if b['passed'] else 'FAILED'}: " + "; ".join(parts)]
    if b["reported"]:
        lines.append("  reported, not in the rule (no validated threshold): "
                     + "; ".join(f"{c['name']} {_fmt(c['score'], '.4f')}" for c in b["reported"]))
    m = v.get("mechanism")
    if m is not None:
        def part(name, c):
            return (f"{name} {'n/a' if not c['applicable'] else ('pass' if c['passed'] else 'FAIL')} "
                    f"({c['score_name']} {_fmt(c['score'], '.0f' if 'rank' in c['score_name'] else '.2f')})")

        ruled = [part(n, c) for n, c in m["checks"].items() if c.get("in_rule", True)]
        lines.append(f"verdict (mechanism): {'PASSED' if m['passed'] else 'FAILED'}: " + "; ".join(ruled))
        evidence = [part(n, c) for n, c in m["checks"].items() if not c.get("in_rule", True)]
        if evidence:
            lines.append("  evidence, not in the rule (failed validation): " + "; ".join(evidence))
    return lines


def _fmt(value, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(float(value), spec)

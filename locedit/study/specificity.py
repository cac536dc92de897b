"""Key specificity k*ᵀC⁻¹k*: an edit-oriented layer score (see `recipes/study_specificity.py`).

For ROME's rank-one update ΔW = r uᵀ with u ∝ C⁻¹k* that moves the layer's output at k* by δ, the expected
squared change at the layer's other keys x (E[xxᵀ] = C) is ‖δ‖² / (k*ᵀC⁻¹k*): the larger the specificity, the
less the same δ leaks to other inputs.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from locedit.core.statistics import hase_regression
from locedit.study.correlation import within_fact_correlation
from locedit.study.summary import fmt_ci, regression_line

OUTCOMES = ("S", "NS", "PS")
SCORES = ("log_specificity", "loc_score")


@torch.no_grad()
def template_keys(lm, fact, templates: Sequence[str]) -> dict[int, torch.Tensor]:
    """ROME's k* at every layer: the MLP output projection's input at the subject's last token, averaged over the
    context templates."""
    from locedit.editing.values import pad_rows, templated_prompts

    rows, keys, _ = templated_prompts(lm, fact, templates, "subject_last", None)
    input_ids, mask = pad_rows(lm, rows)
    picked: dict[int, torch.Tensor] = {}
    index = torch.arange(len(rows), device=lm.device)
    key_pos = torch.tensor(keys, device=lm.device)
    hooks = []
    for layer in range(lm.num_layers):
        module = lm.adapter.layer_part(lm.model, layer, lm.adapter.mlp_down)
        hooks.append(module.register_forward_pre_hook(
            lambda m, a, layer=layer: picked.__setitem__(layer, a[0][index, key_pos].float().mean(0).cpu())))
    try:
        lm.model(input_ids=input_ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return picked


def specificity(C: torch.Tensor, k: torch.Tensor) -> float:
    """k ᵀ C⁻¹ k in float64."""
    k64 = k.double()
    return float(k64 @ torch.linalg.solve(C.double(), k64))


def specificity_report(rows: Sequence[dict], spec: Mapping[str, Mapping[int, float]], num_layers: int) -> dict:
    """Within-fact correlations and regressions of every outcome on log specificity and on locate's score, over
    sweep rows that carry `log_specificity`; plus the mean log specificity per layer."""
    import numpy as np

    result: dict = {"rows": len(rows), "facts": len(spec), "specificity": spec, "within_fact": {}, "regression": {}}
    for outcome in OUTCOMES:
        for score in SCORES:
            result["within_fact"][f"{outcome}|{score}"] = within_fact_correlation(rows, outcome=outcome, score=score)
            result["regression"][f"{outcome}|{score}"] = hase_regression(rows, outcome=outcome, score=score)
    result["mean_log_specificity_by_layer"] = {
        layer: float(np.mean([np.log(s[layer]) for s in spec.values()])) for layer in range(num_layers)}
    return result


def markdown(res: dict) -> str:
    """The report `specificity.md`."""
    f = fmt_ci
    lines = ["# Key specificity k*ᵀC⁻¹k* as an edit-oriented layer score (exploratory; layer-sweep rows)", "",
             f"{res['rows']} sweep edits of {res['facts']} facts (tuning split and the oracle subset of held-out).", "",
             "Within each fact, Spearman ρ between a layer score and the edit outcome over the fact's swept layers "
             "(mean over facts, bootstrap 95% CI; facts with the same outcome at every layer left out):", "",
             "| outcome | n facts | log specificity | locate's layer score | earlier is better (−layer) | "
             "specificity − depth |", "|---|---|---|---|---|---|"]
    for outcome in OUTCOMES:
        w = res["within_fact"][f"{outcome}|log_specificity"]
        loc = res["within_fact"][f"{outcome}|loc_score"]
        if not w.get("n"):
            continue
        d = w["score_minus_depth"]
        lines.append(f"| {outcome} | {w['n']} | {f(w['score']['mean'], w['score']['low'], w['score']['high'], False)} | "
                     f"{f(loc['score']['mean'], loc['score']['low'], loc['score']['high'], False)} | "
                     f"{f(w['depth']['mean'], w['depth']['low'], w['depth']['high'], False)} | "
                     f"{f(d['mean'], d['low'], d['high'], False)} |")
    lines += ["", "Hase-style regression (R²; in-sample and fact-grouped cross-validated):", ""]
    for name, r in res["regression"].items():
        if "r2_layer" in r:
            lines.append(regression_line(name, r))
    by_layer = res["mean_log_specificity_by_layer"]
    lines += ["", "Mean log specificity by layer: " + ", ".join(f"L{l} {v:.2f}" for l, v in by_layer.items())]
    return "\n".join(lines) + "\n"


def sweep_rows(rows: Iterable[dict]) -> list[dict]:
    """The layer-sweep rows (phases tuning and oracle) that edited a layer without error."""
    return [r for r in rows if r.get("phase") in ("tuning", "oracle") and "error" not in r
            and r.get("layer") is not None]

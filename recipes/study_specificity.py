"""Does an edit-oriented score rank ROME's layers better than `locate`'s localization score? (exploratory, tuning data)

    python recipes/study_specificity.py [--out data/results/study]

For a rank-one edit ΔW = r uᵀ with u ∝ C⁻¹k* (ROME, r-ROME fix) that moves the layer's output at k* by δ, the
expected squared change at the layer's other keys x (x drawn from the statistics' corpus, E[xxᵀ] = C) is

    E[(ΔW x)²] = ‖δ‖² · uᵀCu / (uᵀk*)² = ‖δ‖² / (k*ᵀ C⁻¹ k*)

so the larger the key's **specificity** s(l) = k*ᵀC⁻¹k* at layer l (a Mahalanobis norm: comparable across layers),
the less the same δ leaks to other inputs. It needs one forward and the cached key statistics, no optimisation.

This recipe reads the layer-sweep rows of `recipes/study_sites.py` (phases `tuning` and `oracle`: each fact edited
at several layers, subject-last key), computes s(l) for each (fact, layer) with ROME's template-averaged
subject-last key, and asks, within each fact, whether s ranks the layers by S and NS better than locate's layer
score and than "earlier is better" (Spearman ρ per fact; mean and paired differences with bootstrap CIs), and how
much of S's variance s explains beyond layer identity (the study's Hase-style regression). It changes no default:
a score chosen on these rows must then win on held-out facts (`study_sites.py`) before `locate` may use it.
Writes `specificity.json` and `specificity.md` next to the rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("study_sites", ROOT / "recipes" / "study_sites.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


@torch.no_grad()
def template_keys(lm, fact, templates) -> dict[int, torch.Tensor]:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(study.OUT))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    out = Path(args.out)
    torch.set_num_threads(args.threads)

    import locedit
    from locedit.core.datasets import curated_facts
    from locedit.editing.hparams import ROMEHyperParams
    from locedit.editing.stats import key_statistics
    from locedit.editing.templates import context_templates

    rows = [r for r in study.read_rows(out).values()
            if r.get("phase") in ("tuning", "oracle") and "error" not in r and r.get("layer") is not None]
    lm = locedit.load(study.MODEL)
    stats = key_statistics(lm, layers=range(lm.num_layers), kinds=("mlp",), progress=False)
    hp = ROMEHyperParams()
    templates = context_templates(lm, hp.context_template_length_params, hp.seed)
    facts = {str(f.meta.get("id")): f for f in curated_facts()}
    spec: dict[str, dict[int, float]] = {}
    for fid in sorted({r["fact"] for r in rows}):
        keys = template_keys(lm, facts[fid], templates)
        spec[fid] = {layer: specificity(stats.get("mlp", layer), k) for layer, k in keys.items()}
    for r in rows:
        r["log_specificity"] = float(np.log(spec[r["fact"]][r["layer"]]))

    result: dict = {"rows": len(rows), "facts": len(spec), "specificity": spec, "within_fact": {}, "regression": {}}
    for outcome in ("S", "NS", "PS"):
        for score in ("log_specificity", "loc_score"):
            result["within_fact"][f"{outcome}|{score}"] = study.within_fact_correlation(rows, outcome=outcome,
                                                                                        score=score)
            result["regression"][f"{outcome}|{score}"] = study.hase_regression(rows, outcome=outcome, score=score)
    by_layer = {layer: float(np.mean([np.log(s[layer]) for s in spec.values()])) for layer in range(lm.num_layers)}
    result["mean_log_specificity_by_layer"] = by_layer
    (out / "specificity.json").write_text(json.dumps(result, indent=1, default=float))
    md = markdown(result)
    (out / "specificity.md").write_text(md)
    print(md)


def markdown(res: dict) -> str:
    f = study._fmt
    lines = ["# Key specificity k*ᵀC⁻¹k* as an edit-oriented layer score (exploratory; layer-sweep rows)", "",
             f"{res['rows']} sweep edits of {res['facts']} facts (tuning split and the oracle subset of held-out).", "",
             "Within each fact, Spearman ρ between a layer score and the edit outcome over the fact's swept layers "
             "(mean over facts, bootstrap 95% CI; facts with the same outcome at every layer left out):", "",
             "| outcome | n facts | log specificity | locate's layer score | earlier is better (−layer) | "
             "specificity − depth |", "|---|---|---|---|---|---|"]
    for outcome in ("S", "NS", "PS"):
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
            lines.append(study.regression_line(name, r))
    by_layer = res["mean_log_specificity_by_layer"]
    lines += ["", "Mean log specificity by layer: " + ", ".join(f"L{l} {v:.2f}" for l, v in by_layer.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

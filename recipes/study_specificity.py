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
import json
from pathlib import Path

import numpy as np
import torch

from locedit.study import read_rows
from locedit.study.specificity import markdown, specificity, specificity_report, sweep_rows, template_keys

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "results" / "study"
MODEL = "smollm2-135m"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    out = Path(args.out)
    torch.set_num_threads(args.threads)

    import locedit
    from locedit.core.datasets import curated_facts
    from locedit.core.results import write_atomic
    from locedit.editing.hparams import ROMEHyperParams
    from locedit.editing.stats import key_statistics
    from locedit.editing.templates import context_templates

    rows = sweep_rows(read_rows(out).values())
    lm = locedit.load(MODEL)
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
    result = specificity_report(rows, spec, lm.num_layers)
    write_atomic(out / "specificity.json", json.dumps(result, indent=1, default=float))
    md = markdown(result)
    write_atomic(out / "specificity.md", md)
    print(md)


if __name__ == "__main__":
    main()

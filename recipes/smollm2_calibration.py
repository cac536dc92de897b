"""Write SmolLM2-135M's shipped calibration (locedit/data/calibrations/<fingerprint>.json) from the recorded study
(data/results/study/summary.json): ROME at its tuned fixed layer, subject-last key, with the study's tuning sweep
and held-out numbers as evidence. Loads the model once to fingerprint its weights.

    python recipes/smollm2_calibration.py
"""

from __future__ import annotations

import json
from pathlib import Path

import locedit
from locedit.editing.calibration import PACKAGED, Calibration
from locedit.editing.edit import geometry
from locedit.editing.fingerprint import weights_fingerprint

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = ROOT / "data" / "results" / "study" / "summary.json"


def main() -> None:
    study = json.loads(SUMMARY.read_text())
    lm = locedit.load("smollm2-135m")
    layer = int(study["fixed_layer"])
    fixed = study["policies"]["fixed"]
    vs_located = study["paired"]["located - fixed"]["S"]
    sweep = [{"method": "rome", "layer": int(l), "layers": [int(l)], "key_position": "subject_last",
              "stage": "study tuning sweep", **{k: v for k, v in row.items() if k in ("S", "ES", "PS", "NS", "n")}}
             for l, row in sorted(study["tuning_sweep"].items(), key=lambda kv: int(kv[0]))]
    chosen = {"rome": {"layers": [layer], "key_position": "subject_last", "n": fixed["n"],
                       "S": fixed["S"], "ES": fixed["ES"]["mean"], "PS": fixed["PS"]["mean"],
                       "NS": fixed["NS"]["mean"], "NKL": fixed["NKL"]["mean"],
                       "scored_on": "held-out facts of the study (the layer was chosen on its tuning facts)",
                       "vs_located": {k: vs_located[k] for k in ("n", "mean", "low", "high", "wins", "ties",
                                                                  "losses", "excludes_zero")}}}
    n_tuning = len(study["config"]["tuning_ids"])
    cal = Calibration(
        fingerprint=weights_fingerprint(lm), model={"name": lm.name, "geometry": geometry(lm)}, chosen=chosen,
        sweep=sweep, facts=list(study["config"]["tuning_ids"]),
        evidence=(f"the recorded study data/results/study/ (recipes/study_sites.py): ROME at layer {layer} (best "
                  f"of layers {', '.join(str(r['layer']) for r in sweep)} on {n_tuning} tuning facts) beat locate's "
                  f"layer by {-100 * vs_located['mean']:.1f} pp of S [{-100 * vs_located['high']:.1f}, "
                  f"{-100 * vs_located['low']:.1f}] on {vs_located['n']} held-out facts: "
                  "data/results/study/summary.md"))
    path = cal.save(PACKAGED / f"{cal.fingerprint}.json")
    print(cal.summary())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

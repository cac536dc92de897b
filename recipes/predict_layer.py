"""Predict ROME's edit layer without trial edits (issue #16 §2), measured on the study's recorded trial sweeps.

    python recipes/predict_layer.py [--study data/results/study] [--out data/results/predict_layer]

Sweeps: the study's rows where one fact was edited with ROME (subject-last key) at many layers: phase "tuning"
(8 tuning facts, layers 0-6, 8, 10, 15) and phase "oracle" (15 held-out facts, layers 0, 5, ..., 25). Each fact is
the curated fact of the row's `fact` id, edited to its `target_new`, as the study did.

Predictors (per fact, every layer of SmolLM2, forwards + one backward, no edit; `locedit.editing.layer_predictor`):
grad_norm, grad_x_out (gradient of the new target's NLL w.r.t. the MLP output at the key), rome_paraphrase,
rome_neighbour, rome_margin (closed-form C⁻¹k* reach), loc_band (locate's recorded layer score, restricted to the
band the shipped calibration's sweep prefers); the baseline is depth (−layer: earlier is better).
Scored with `locedit.study.prediction.score_predictors`: top-layer hit of the sweep's best layer (±1), tie-aware
hit (the predicted layer's S equals the best S), regret in S, within-fact Spearman with S; bootstrap 95% CIs.
Outputs: OUT/summary.json, OUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import locedit
from locedit.core.datasets import curated_facts
from locedit.core.facts import EditRequest
from locedit.core.results import jsonable, write_atomic
from locedit.editing.calibration import calibration_for
from locedit.editing.hparams import read_hparams
from locedit.editing.layer_predictor import gradient_scores, restrict_to_band, rome_reach_scores
from locedit.editing.stats import key_statistics
from locedit.study import read_rows
from locedit.study.prediction import DEPTH, preferred_band, score_predictors

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
PREDICTORS = ("grad_norm", "grad_x_out", "rome_paraphrase", "rome_neighbour", "rome_margin", "loc_band")
PHASES = ("tuning", "oracle")


def sweep_rows(study: Path) -> list[dict]:
    """The ROME subject-last rows of the study's single-fact layer sweeps, without errors."""
    return [r for r in read_rows(study).values()
            if r.get("phase") in PHASES and r.get("method") == "rome" and r.get("key_position") == "subject_last"
            and "error" not in r and r.get("S") is not None]


def fmt(e: dict, scale: float = 100.0, digits: int = 0) -> str:
    if e.get("mean") is None:
        return "—"
    if e.get("low") is None:
        return f"{e['mean'] * scale:.{digits}f}"
    return f"{e['mean'] * scale:.{digits}f} [{e['low'] * scale:.{digits}f}, {e['high'] * scale:.{digits}f}]"


def markdown(result: dict, command: str) -> str:
    lines = [f"# Predicting ROME's edit layer without trial edits ({MODEL})", "",
             f"Command: `{command}`. Band for loc_band: layers {result['band'][0]}–{result['band'][1]} "
             f"(the shipped calibration's sweep, S within 10 pp of its best). Cost: {result['seconds_per_fact']:.1f} s "
             f"per fact for all predictors at all 30 layers (one thread), against {result['trial_edit_s']:.0f} s for one "
             "trial edit of the recorded sweeps (mean edit time, same machine class).", ""]
    for phase, res in result["phases"].items():
        lines += [f"## {phase} sweep ({res['facts']} facts)", "",
                  "| predictor | top = best ±1 (%) | top's S = best S (%) | regret in S (pp) | Spearman ρ with S "
                  "| vs depth: ρ | hit (pp) | top's S = best S (pp) | regret (pp) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, e in res["predictors"].items():
            rho = fmt(e["spearman"], 1, 2)
            diffs = " | ".join(["—"] * 4) if name == DEPTH else " | ".join(
                [fmt(e["spearman_minus_depth"], 1, 2), fmt(e["hit_minus_depth"]), fmt(e["hit_S_minus_depth"]),
                 fmt(e["regret_minus_depth"], 100, 1)])
            lines.append(f"| {name} | {fmt(e['hit'])} | {fmt(e['hit_S'])} | {fmt(e['regret'], 100, 1)} | {rho} "
                         f"(n={e['spearman_n']}) | {diffs} |")
        best = {f: o["best"] for f, o in res["predictors"][DEPTH]["per_fact"].items()}
        lines += ["", f"Best layer per fact: {best}", ""]
        for name in PREDICTORS:
            picks = {f: o["predicted"] for f, o in res["predictors"][name]["per_fact"].items()}
            lines.append(f"- {name} picks: {picks}")
        lines.append("")
    lines += ["Mean and bootstrap 95% CI over facts; ρ − depth and hit − depth are paired over the same facts. "
              "The tuning facts also chose the calibration band, so loc_band is in-sample there; the oracle facts "
              "are held-out facts of the old study (no fact of data/facts/heldout was used)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default=str(ROOT / "data" / "results" / "study"))
    p.add_argument("--out", default=str(ROOT / "data" / "results" / "predict_layer"))
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = sweep_rows(Path(args.study))
    facts = {str(f.meta.get("id")): f for f in curated_facts().facts}
    lm = locedit.load(MODEL)
    calibration = calibration_for(lm)
    if calibration is None:
        raise SystemExit(f"no calibration for {MODEL}'s weights: run `locedit calibrate --model {MODEL}` first")
    band = preferred_band([r for r in calibration.sweep if r.get("method", "rome") == "rome"])
    stats = key_statistics(lm, kinds=("mlp",), tokens=read_hparams("rome", None).params.stats_tokens,
                           progress=False)
    per_fact_scores: dict[str, dict] = {}
    t0 = time.perf_counter()
    for fid in sorted({r["fact"] for r in rows}, key=int):
        fact = facts[fid]
        request = EditRequest(fact, fact.meta["target_new"])
        g = gradient_scores(lm, request)
        reach = rome_reach_scores(lm, request, stats)
        print(f"fact {fid}: {time.perf_counter() - t0:.0f} s", flush=True)
        per_fact_scores[fid] = {"layers": list(g.layers), "grad_norm": list(g.scores["grad_norm"]),
                                "grad_x_out": list(g.scores["grad_x_out"]),
                                **{f"rome_{k}": list(v) for k, v in reach.scores.items()}}
    seconds = (time.perf_counter() - t0) / max(1, len(per_fact_scores))
    scored = []
    by_fact: dict[str, list] = {}
    for r in rows:
        by_fact.setdefault(r["fact"], []).append(r)
    for fid, rs in by_fact.items():
        rs = sorted(rs, key=lambda r: r["layer"])
        s = per_fact_scores[fid]
        banded = restrict_to_band([r.get("loc_score") for r in rs], [r["layer"] for r in rs], band)
        for r, b in zip(rs, banded):
            i = s["layers"].index(r["layer"])
            scored.append({"fact": fid, "phase": r["phase"], "layer": r["layer"], "S": r["S"], "PS": r.get("PS"),
                           "ES": r.get("ES"), "NS": r.get("NS"), "EM": r.get("EM"), "loc_score": r.get("loc_score"),
                           "loc_band": b, **{k: s[k][i] for k in PREDICTORS if k != "loc_band"}})
    phases = {ph: score_predictors([r for r in scored if r["phase"] == ph], PREDICTORS) for ph in PHASES}
    phases["all"] = score_predictors(scored, PREDICTORS)
    command = "python recipes/predict_layer.py"
    trial = sum(r["edit_s"] for r in rows if r.get("edit_s")) / max(1, sum(1 for r in rows if r.get("edit_s")))
    result = {"model": MODEL, "band": list(band), "seconds_per_fact": seconds, "trial_edit_s": trial, "phases": phases,
              "scores": per_fact_scores, "rows": scored}
    out = Path(args.out)
    write_atomic(out / "summary.json", json.dumps(jsonable(result), indent=1))
    write_atomic(out / "summary.md", markdown(result, command))
    print(markdown(result, command))


if __name__ == "__main__":
    main()

"""How far bfloat16 results are from float32 on SmolLM2: attention-knockout curves (max |difference| in
percentage points of relative change) and locate's top MLP layer / top head / carrier token, on a few facts.

    python recipes/bf16_vs_fp32.py [--facts 5] [--locate-facts 5] [--out data/results/bf16_vs_fp32.txt]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import locedit
from locedit.localization import attention_knockout
from locedit.localization.sites import locate

from bench_facts import FACTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--facts", type=int, default=5)
    parser.add_argument("--locate-facts", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lm32 = locedit.load("smollm2-135m")
    lm16 = locedit.load("smollm2-135m", dtype="bfloat16")  # validates (dtype-aware tolerance)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"SmolLM2-135M, float32 vs bfloat16 (both validated), torch {torch.__version__}, CPU")
    say("attention knockout (window 9, default groups): max |bf16 - fp32| of the relative change, percentage points")
    worst = []
    for fact in FACTS[: args.facts]:
        a, b = attention_knockout(lm32, fact), attention_knockout(lm16, fact)
        if a.target_id != b.target_id:
            say(f"  {fact.prompt!r}: top-1 differs ({a.target!r} vs {b.target!r}); skipped")
            continue
        diffs = {g: float(np.max(np.abs(np.subtract(a.relative_change[g], b.relative_change[g]))))
                 for g in a.relative_change}
        prob = abs(a.base_prob - b.base_prob)
        worst.append(max(diffs.values()))
        say(f"  {fact.prompt!r} -> {a.target!r} p={a.base_prob:.3f} (bf16 {b.base_prob:.3f}, |dp| {prob:.4f}): "
            + ", ".join(f"{g} {d:.2f} pp" for g, d in diffs.items()))
    if worst:
        say(f"  max over facts {max(worst):.2f} pp, mean of per-fact maxima {np.mean(worst):.2f} pp")
    say("locate: top MLP layer / top head / carrier token, fp32 vs bf16")
    agree = {"mlp": 0, "mlp_top3": 0, "head": 0, "head_top3": 0, "carrier": 0}
    n = 0
    for fact in FACTS[: args.locate_facts]:
        a, b = locate(lm32, fact).to_dict(), locate(lm16, fact).to_dict()
        if a["target_id"] != b["target_id"]:
            say(f"  {fact.prompt!r}: top-1 differs; skipped")
            continue
        n += 1
        ma, mb = [m["layer"] for m in a["mlp_layers"]], [m["layer"] for m in b["mlp_layers"]]
        ha, hb = [(h["layer"], h["head"]) for h in a["heads"]], [(h["layer"], h["head"]) for h in b["heads"]]
        agree["mlp"] += ma[0] == mb[0]
        agree["mlp_top3"] += ma[0] in mb[:3]
        agree["head"] += ha[0] == hb[0]
        agree["head_top3"] += ha[0] in hb[:3]
        agree["carrier"] += a["carrier"]["position"] == b["carrier"]["position"]
        say(f"  {fact.prompt!r}: MLP L{ma[0]} vs L{mb[0]}; head L{ha[0][0]}H{ha[0][1]} vs L{hb[0][0]}H{hb[0][1]}; "
            f"carrier {a['carrier']['token']!r} vs {b['carrier']['token']!r}")
    if n:
        say(f"  agreement over {n} facts: top MLP layer {agree['mlp']}/{n} (fp32's in bf16's top 3: "
            f"{agree['mlp_top3']}/{n}), top head {agree['head']}/{n} (in top 3: {agree['head_top3']}/{n}), "
            f"carrier {agree['carrier']}/{n}")
    say(f"({time.perf_counter() - start:.0f} s)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("$ python " + " ".join(sys.argv) + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

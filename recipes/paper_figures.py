"""Reproduce the paper's analyses (Geva et al. 2023) on SmolLM2 over the curated facts it knows, write every
figure (PNG and SVG) and a markdown summary that sets the findings beside the paper's.

    python recipes/paper_figures.py [--facts 100] [--trace-facts 20] [--jobs 2] [--out results/paper_figures]

Per-fact results go to OUT/<analysis>-K.jsonl (resumable: rerun to continue). Attribute sets are the model's own
generated text about each subject (the paper's Wikipedia paragraphs were never released; see README).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import locedit
from locedit.core.datasets import curated_facts, known_facts
from locedit.localization import (attention_knockout, attribute_rate, causal_trace, extraction_events, head_projection,
                          knockout_map, state_patching, sublayer_knockout)
from locedit.localization.attributes import AttributeSet, generate_attribute_text
from locedit.localization.extraction import ExtractionResult
from locedit.localization.patching import PatchingResult
from locedit.localization.runner import read_results, run_dataset
from locedit.core.plots import (attribute_rate_curves, extraction_rates, heads_table, knockout_curves, knockout_heatmap,
                           patching_bars, save_figure, sublayer_curves)

ATTRIBUTES: dict[str, AttributeSet] = {}


def attributes_for(lm, subject: str) -> AttributeSet:
    if subject not in ATTRIBUTES:
        text = generate_attribute_text(lm, subject)
        ATTRIBUTES[subject] = AttributeSet.from_text(lm.tokenizer, subject, text, source="generated")
    return ATTRIBUTES[subject]


def attribute_rate_generated(lm, fact, **options):
    """attribute_rate with the model-generated attribute set (cached per subject within a run)."""
    return attribute_rate(lm, fact, attributes=attributes_for(lm, fact.subject), **options)


def sublayer_generated(lm, fact, **options):
    """sublayer_knockout with the model-generated attribute set."""
    return sublayer_knockout(lm, fact, attributes=attributes_for(lm, fact.subject), **options)


def knockout_paper_groups(lm, fact, **options):
    """attention_knockout with the paper's exact groups (position 0 inside non-subject)."""
    return attention_knockout(lm, fact, groups="paper", **options)


ANALYSES = {
    "knockout": attention_knockout,
    "knockout_paper_groups": knockout_paper_groups,
    "attribute_rate": attribute_rate_generated,
    "sublayer": sublayer_generated,
    "extraction": extraction_events,
    "patching": state_patching,
    "heads": head_projection,
}


def read(out: Path, name: str) -> list[dict]:
    return list(read_results(sorted(out.glob(f"{name}-*.jsonl"))).values())


def work(lm, facts, trace_facts, out: Path, shard: str) -> None:
    k, n = map(int, shard.split("/"))
    options: dict = {}  # a fact's given target is the one tracked (issue #15)
    for name, fn in ANALYSES.items():
        run_dataset(lm, fn, facts[k::n], out / f"{name}-{k}.jsonl", options=options)
    run_dataset(lm, causal_trace, trace_facts[k::n], out / f"trace-{k}.jsonl", options={**options, "samples": 5})


def trace_categories(result: dict) -> dict[str, np.ndarray]:
    """ROME's position categories: first / middle / last subject token, first subsequent token, further tokens,
    last token -> that row of indirect effects (restored p - corrupted p)."""
    scores = np.array(result["scores"], dtype=float) - result["low_score"]
    start, end = result["subject_span"]
    n = scores.shape[0]
    cats = {"first subject token": [start], "middle subject tokens": list(range(start + 1, end - 1)),
            "last subject token": [end - 1], "first subsequent token": [end] if end < n - 1 else [],
            "further tokens": list(range(end + 1, n - 1)), "last token": [n - 1]}
    return {c: np.nanmean(scores[p], axis=0) for c, p in cats.items() if p}


def summarize(out: Path, lm, n_facts: int, seconds: float) -> str:
    knock = read(out, "knockout")
    knock_paper = read(out, "knockout_paper_groups")
    rates = read(out, "attribute_rate")
    sub = read(out, "sublayer")
    ext = read(out, "extraction")
    patch = read(out, "patching")
    heads = read(out, "heads")
    traces = read(out, "trace")
    figures = out / "figures"
    save_figure(knockout_curves(knock), figures / "knockout_curves")
    save_figure(knockout_curves(knock_paper, title=f"Attention knockout, the paper's groups (n={len(knock_paper)})"),
                figures / "knockout_curves_paper_groups")
    if knock:
        example = [f for f in curated_facts().facts if f.subject == knock[0]["fact"]["subject"]][0]
        save_figure(knockout_heatmap(knockout_map(lm, example)), figures / "knockout_heatmap_example")
    save_figure(attribute_rate_curves(rates), figures / "attribute_rate")
    save_figure(sublayer_curves(sub), figures / "sublayer_knockout")
    ext_agg = ExtractionResult.aggregate(ext)
    save_figure(extraction_rates(ext_agg), figures / "extraction_rates")
    patch_agg = PatchingResult.aggregate(patch)
    save_figure(patching_bars(patch_agg), figures / "state_patching")
    head_rows = top_heads(heads, lm)
    save_figure(heads_table(head_rows, title="Heads whose OV circuit maps the subject to the target (rank < 10)"),
                figures / "top_heads")
    if traces:
        import matplotlib.pyplot as plt
        cats = {}
        for t in traces:
            for c, row in trace_categories(t).items():
                cats.setdefault(c, []).append(row)
        names = list(cats)
        fig, ax = plt.subplots(figsize=(7, 3), constrained_layout=True)
        im = ax.imshow(np.array([np.nanmean(cats[c], axis=0) for c in names]), aspect="auto", cmap="Purples")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("layer")
        ax.set_title(f"Causal trace (hidden states): average indirect effect (n={len(traces)})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
        save_figure(fig, figures / "causal_trace_average")

    # the paper's four questions
    mean = lambda dicts, key, sub_key: np.nanmean(np.array([d[key][sub_key] for d in dicts], dtype=float), axis=0)
    subj, rel = mean(knock, "relative_change", "subject"), mean(knock, "relative_change", "non_subject")
    last = mean(knock, "relative_change", "last")

    def onset(curve):
        worst = np.min(curve)
        return int(np.argmax(curve <= worst / 2)) if worst < 0 else None

    rate_curves = {p: np.nanmean(np.array([d["rates"][p] for d in rates if d["rates"].get(p) is not None],
                                          dtype=float), axis=0)
                   for p in rates[0]["rates"] if any(d["rates"].get(p) is not None for d in rates)} if rates else {}
    L = lm.num_layers
    middle = slice(L // 5, (3 * L) // 5)
    mlp_ar, attn_ar = mean(sub, "attribute_rate", "mlp"), mean(sub, "attribute_rate", "attn")
    early = slice(0, max(1, len(mlp_ar) // 3))
    base_ar = float(np.nanmean([d["baseline_rate"] for d in sub]))
    trace_line = ""
    if traces:
        eff = {c: float(np.nanmax(np.nanmean(v, axis=0))) for c, v in cats.items()}
        trace_line = ("\n## Causal tracing (ROME, not in the paper)\n\nMax average indirect effect per position category "
                      f"({len(traces)} facts, 5 noise samples): " +
                      ", ".join(f"{c}: {v:.3f}" for c, v in eff.items()) + ".\n")
    lines = [
        f"# The paper's analyses on {lm.name} ({n_facts} curated facts it gets right)",
        "",
        f"Run: `python recipes/paper_figures.py` ({seconds / 60:.0f} min on this machine). Figures in `figures/`.",
        "",
        "## 1. Does relation → last flow matter at earlier layers than subject → last?",
        f"Mean relative change of p(target) (window 9). Last ← non-subject (position 0 apart): worst "
        f"{np.min(rel):.1f}% at layer {int(np.argmin(rel))}, half of that first reached at layer {onset(rel)}. "
        f"Last ← subject: worst {np.min(subj):.1f}% at layer {int(np.argmin(subj))}, half first at layer {onset(subj)}. "
        f"Last ← last: worst {np.min(last):.1f}%.",
        f"**{'Yes' if onset(rel) is not None and onset(subj) is not None and onset(rel) < onset(subj) else 'No'}** "
        "(the paper, GPT-2 XL / GPT-J: relation positions matter earlier than the subject, up to ~60% drops from "
        "the subject in the middle-upper layers).",
        f"With the paper's exact groups (position 0 inside non-subject) the non-subject curve reaches "
        f"{np.min(mean(knock_paper, 'relative_change', 'non_subject')):.1f}%: the first token is an attention "
        "sink in this model, which is why locedit reports it separately by default.",
        "",
        "## 2. Does the attribute rate at subject-last rise through the early-middle layers, above other positions?",
        "Mean attribute rate (%) over the middle layers "
        f"({middle.start}–{middle.stop - 1}): " + ", ".join(
            f"{p}: {np.nanmean(c[middle]):.1f}" for p, c in rate_curves.items()) +
        (f"; subject-last from {rate_curves['subject_last'][0]:.1f} at layer 0 to a peak of "
         f"{np.nanmax(rate_curves['subject_last']):.1f} at layer {int(np.nanargmax(rate_curves['subject_last']))}."
         if "subject_last" in rate_curves else "") +
        " (The paper: ~50% at subject-last in the intermediate-upper layers, much lower elsewhere. Attribute sets "
        "here are the model's own generated text, not Wikipedia, so absolute values are not comparable.)",
        "",
        "## 3. Do early MLP knockouts lower the subject-last attribute rate more than attention knockouts?",
        f"Attribute rate at subject-last, layer {sub[0]['measure_layer']} (no knockout: {base_ar:.1f}%), windows of "
        f"{sub[0]['window']} layers starting in the first third: MLP knocked out {np.nanmean(mlp_ar[early]):.1f}%, "
        f"attention knocked out {np.nanmean(attn_ar[early]):.1f}%. "
        f"**{'Yes' if np.nanmean(mlp_ar[early]) < np.nanmean(attn_ar[early]) else 'No'}** (the paper: early MLPs "
        "drive enrichment, attention much less). Caveat: zeroing layer 0's MLP breaks the whole model in "
        "SmolLM2, and every early window contains it.",
        "",
        "## 4. Are attention extraction events more common than MLP ones?",
        f"Facts with at least one attention event: {100 * ext_agg['share_with_attn_event']:.1f}%; with an MLP event: "
        f"{100 * ext_agg['share_with_mlp_event']:.1f}%; cross-tab {json.dumps({k: round(100 * v, 1) for k, v in ext_agg['crosstab'].items()})}. "
        f"**{'Yes' if ext_agg['share_with_attn_event'] > ext_agg['share_with_mlp_event'] else 'No'}** (the paper: "
        "~68% of prompts have an attention event in GPT-2 XL; MLP events are rarer). Events are top-1 matches of a "
        "single sublayer's projection; in a 135M-parameter model no single sublayer usually makes the target "
        "top-1, so events are rare overall.",
        "",
        "## Early-state patching",
        f"Facts with an attention event, no patching: {100 * patch_agg['baseline']:.1f}%; " + "; ".join(
            f"{g} from layer {s}: {100 * v['rate']:.1f}%" for g, d in patch_agg["groups"].items() for s, v in d.items()),
        "",
        "## Heads",
        "Heads whose OV circuit ranks the target in the top 10 for the subject (tokens or subject-last state), "
        "most frequent first: " + ", ".join(f"L{r['layer']}H{r['head']} ({r['facts']} facts)" for r in head_rows[:8]),
        trace_line,
    ]
    return "\n".join(lines)


def top_heads(heads: list[dict], lm) -> list[dict]:
    counts: dict[tuple[int, int], int] = {}
    for d in heads:
        tokens, last = np.array(d["rank_subject_tokens"]), np.array(d["rank_subject_last"])
        for layer, head in zip(*np.nonzero(np.minimum(tokens, last) < 10)):
            counts[(int(layer), int(head))] = counts.get((int(layer), int(head)), 0) + 1
    rows = [{"layer": l, "head": h, "facts": c, "share": c / max(1, len(heads))} for (l, h), c in counts.items()]
    return sorted(rows, key=lambda r: -r["facts"])[:15]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=locedit.DEFAULT_MODEL)
    parser.add_argument("--facts", type=int, default=100, help="known curated facts to analyse (default 100)")
    parser.add_argument("--trace-facts", type=int, default=20, help="facts to causal-trace (default 20)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/paper_figures"))
    parser.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    lm = locedit.load(args.model)
    known = known_facts(lm, curated_facts().facts, progress=False)
    # spread the facts over relations: round-robin by relation
    by_relation: dict[str, list] = {}
    for f in known:
        by_relation.setdefault(f.relation, []).append(f)
    ordered = []
    while any(by_relation.values()):
        for rel in list(by_relation):
            if by_relation[rel]:
                ordered.append(by_relation[rel].pop(0))
    facts = ordered[: args.facts]
    trace_facts = facts[: args.trace_facts]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.shard or args.jobs == 1:
        work(lm, facts, trace_facts, args.out, args.shard or "0/1")
        if args.shard:
            return
    else:
        workers = [subprocess.Popen([sys.executable, __file__, "--model", args.model, "--out", str(args.out),
                                     "--facts", str(args.facts), "--trace-facts", str(args.trace_facts),
                                     "--shard", f"{k}/{args.jobs}"]) for k in range(args.jobs)]
        if any(w.wait() != 0 for w in workers):
            raise SystemExit("a worker failed")
    text = summarize(args.out, lm, len(facts), time.perf_counter() - start)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

"""The study's figures: policies, tuning sweep and paired differences; the sequential-editing curves."""

from __future__ import annotations

from pathlib import Path

from locedit.study.summary import LABELS


def figures(s: dict, out: Path) -> None:
    """`study.png` (policies, tuning sweep, paired differences) and, with sequential chains, `sequential.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [p for p in LABELS if p in s["policies"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for i, name in enumerate(order):
        e = s["policies"][name]["S"]
        if e["mean"] is None:
            continue
        err = [[e["mean"] - (e["low"] if e["low"] is not None else e["mean"])],
               [(e["high"] if e["high"] is not None else e["mean"]) - e["mean"]]]
        ax.bar(i, e["mean"], yerr=err, capsize=3,
               color="C0" if name.startswith("located") else "C2" if name.startswith("head") else "C1")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("S (held-out), 95% CI")
    ax.set_title("policies")
    ax = axes[1]
    sweep = s["tuning_sweep"]
    if sweep:
        ls = sorted(int(l) for l in sweep)
        for m in ("S", "ES", "PS", "NS"):
            ax.plot(ls, [sweep[l if l in sweep else str(l)][m] for l in ls], marker="o", label=m)
        ax.axvline(s["fixed_layer"], color="k", ls=":")
        ax.set_xlabel("layer (tuning split, subject-last key)")
        ax.legend(fontsize=8)
        ax.set_title("tuning sweep")
    ax = axes[2]
    names = [n for n in s["paired"] if "S" in s["paired"][n] and s["paired"][n]["S"]["low"] is not None]
    for i, name in enumerate(names):
        d = s["paired"][name]["S"]
        ax.errorbar(d["mean"], i, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o", capsize=3,
                    color="C3" if d["excludes_zero"] else "k")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("paired difference in S (held-out), 95% CI")
    ax.set_title("paired differences")
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=120)
    plt.close(fig)
    if s.get("sequential"):
        sequential_figure(s["sequential"], out / "sequential.png")


def sequential_figure(chains: dict, path: Path) -> None:
    """S and NS over the edits so far, retention of the unedited probe facts, and perplexity drift, against the
    number of edits applied, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("S", "S over the edits so far"), ("NS", "neighbourhood accuracy (NS)"),
              ("probe_retention", "unedited probe facts retained"), ("ppl_drift", "perplexity drift"))
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 4.2))
    for ax, (metric, title) in zip(axes, panels):
        for method, pts in chains.items():
            ax.plot([p["n_edits"] for p in pts], [p[metric] for p in pts], marker="o", ms=3, label=method)
        ax.set_xlabel("edits applied, one after another")
        ax.set_title(title)
        if metric != "ppl_drift":
            ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Before/after figures of a verification and the collapse curve of a sequential evaluation (matplotlib, Agg)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

GROUP_COLORS = {"subject": "tab:green", "non_subject": "tab:purple", "last": "tab:orange", "first": "tab:gray"}


def _probs_panel(ax, d: dict) -> None:
    fact = d["behaviour"]["per_fact"][0]
    labels, before_new, before_true, after_new, after_true = [], [], [], [], []
    for key, label in (("rewrite", "prompt"), ("paraphrase", "paraphrases"), ("neighborhood", "neighbours"),
                       ("prefixed", "neighbours+prefix")):
        b, a = np.array(fact["probs_before"][key]).reshape(-1, 2), np.array(fact["probs_after"][key]).reshape(-1, 2)
        if not len(b):
            continue
        labels.append(label)
        before_new.append(b[:, 0].mean())
        before_true.append(b[:, 1].mean())
        after_new.append(a[:, 0].mean())
        after_true.append(a[:, 1].mean())
    x = np.arange(len(labels))
    w = 0.2
    ax.bar(x - 1.5 * w, before_true, w, color="tab:blue", alpha=0.45, label=f"P({fact['true_target'].strip()}) before")
    ax.bar(x - 0.5 * w, after_true, w, color="tab:blue", label="… after")
    ax.bar(x + 0.5 * w, before_new, w, color="tab:red", alpha=0.45, label=f"P({fact['new_target'].strip()}) before")
    ax.bar(x + 1.5 * w, after_new, w, color="tab:red", label="… after")
    ax.set_xticks(x, labels)
    ax.set_ylabel("whole-string P (mean)")
    ax.set_title("Behaviour: old vs new target")
    ax.legend(fontsize=7)


def _knockout_panel(ax, check: dict) -> None:
    ev = check["evidence"]
    for group, values in ev["before"].items():
        color = GROUP_COLORS.get(group)
        ax.plot(values, "--", color=color, alpha=0.6, label=f"{group} (old, before)")
        if group in ev["after"]:
            ax.plot(ev["after"][group], "-", color=color, label=f"{group} (new, after)")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("window centre (layer)")
    ax.set_ylabel("% change of p(target)")
    ax.set_title(f"Attention knockout last←group (window {ev['window']}): "
                 f"{'pass' if check['passed'] else 'FAIL'}", fontsize=9)
    ax.legend(fontsize=6, ncol=2)


def _extraction_panel(ax, check: dict) -> None:
    rows = check["evidence"]["per_head"]
    x = np.arange(len(rows))
    w = 0.2
    for i, (key, color, alpha, label) in enumerate((("old_before", "tab:blue", 0.45, "old, before"),
                                                    ("old_after", "tab:blue", 1.0, "old, after"),
                                                    ("new_before", "tab:red", 0.45, "new, before"),
                                                    ("new_after", "tab:red", 1.0, "new, after"))):
        ax.bar(x + (i - 1.5) * w, [r[key] for r in rows], w, color=color, alpha=alpha, label=label)
    ax.set_xticks(x, [f"L{r['layer']}H{r['head']}" for r in rows])
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("direct logit")
    ax.set_title(f"Extraction heads ({check['head_source']}): {'pass' if check['passed'] else 'FAIL'}", fontsize=9)
    ax.legend(fontsize=7)


def _enrichment_panel(ax, check: dict) -> None:
    if not check.get("applicable"):
        ax.text(0.5, 0.5, f"enrichment: n/a\n{check.get('reason', '')}", ha="center", va="center")
        ax.set_axis_off()
        return
    ev = check["evidence"]
    layers = np.arange(len(ev["new_rank_before"])) - 1  # row l = entering layer l = leaving layer l-1
    for key, color, style, label in (("new_rank_before", "tab:red", "--", "new, before"),
                                     ("new_rank_after", "tab:red", "-", "new, after"),
                                     ("old_rank_before", "tab:blue", "--", "old, before"),
                                     ("old_rank_after", "tab:blue", "-", "old, after")):
        ax.plot(layers[1:], np.array(ev[key][1:]) + 1, style, color=color, label=label)
    ax.axvline(check["layer"], color="k", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("layer (state leaving it)")
    ax.set_ylabel("logit-lens rank + 1")
    ax.set_title(f"Enrichment at {check['token']!r} (edited L{check['layer']}): "
                 f"{'pass' if check['passed'] else 'FAIL'}", fontsize=9)
    ax.legend(fontsize=7)


def verification_figure(d: dict):
    """Before/after panels: target probabilities, knockout curves, extraction heads, enrichment ranks."""
    mech = d.get("mechanism")
    if mech is None:
        fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
        _probs_panel(ax, d)
        return fig
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), constrained_layout=True)
    _probs_panel(axes[0, 0], d)
    _knockout_panel(axes[0, 1], mech["knockout"])
    _extraction_panel(axes[1, 0], mech["extraction"])
    _enrichment_panel(axes[1, 1], mech["enrichment"])
    fig.suptitle(f"{d['facts'][0]['prompt']!r}: {d['facts'][0]['true_target']!r} → {d['facts'][0]['new_target']!r} "
                 f"({d['method']}): {'PASSED' if d['passed'] else 'FAILED'}", fontsize=10)
    return fig


def collapse_figure(points: list[dict]):
    """Sequential editing: efficacy of the edits so far, probe accuracy and perplexity against the edit count."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
    n = [p["edits"] for p in points]
    ax.plot(n, [p["edit_efficacy"] for p in points], "o-", color="tab:red", label="ES of edits so far")
    ax.plot(n, [p["probe_accuracy"] for p in points], "s-", color="tab:blue", label="probe facts: P(true) > P(new)")
    ax.plot(n, [p["probe_top1"] for p in points], "^-", color="tab:cyan", label="probe facts: top-1 correct")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("edits applied")
    ax.set_ylabel("rate")
    ax2 = ax.twinx()
    ax2.plot(n, [p["perplexity"] for p in points], "d--", color="tab:gray", label="perplexity")
    ax2.set_ylabel("perplexity of the text sample")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower left")
    ax.set_title("Sequential editing: collapse curve")
    return fig


def metrics_figure(agg: dict):
    """Mean and bootstrap 95% CI of the rate-like metrics (and mechanistic pass rates) of an evaluation."""
    overall = agg.get("overall", {})
    names = [k for k, s in overall.items() if s.get("mean") is not None and 0 <= s["mean"] <= 1
             and k not in ("neighborhood_kl", "perplexity_drift", "efficacy_magnitude", "paraphrase_magnitude",
                           "neighborhood_magnitude")]
    fig, ax = plt.subplots(figsize=(7, 0.3 * max(len(names), 3) + 1.2), constrained_layout=True)
    means = [overall[k]["mean"] for k in names]
    lows = [overall[k]["ci95"][0] if overall[k]["ci95"][0] is not None else overall[k]["mean"] for k in names]
    highs = [overall[k]["ci95"][1] if overall[k]["ci95"][1] is not None else overall[k]["mean"] for k in names]
    y = np.arange(len(names))
    ax.barh(y, means, color=["tab:purple" if k.startswith("mechanism") else "tab:blue" for k in names])
    ax.errorbar(means, y, xerr=[np.subtract(means, lows), np.subtract(highs, means)], fmt="none", color="k",
                capsize=2)
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("mean over facts (bootstrap 95% CI)")
    ax.set_title(f"Evaluation over {agg.get('n', 0)} facts")
    return fig

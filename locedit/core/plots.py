"""Figures in the paper's forms (matplotlib, Agg backend). Every function takes results (objects or their
`to_dict()`s, one fact or many), draws on `ax` (or a new figure) and returns the figure; `save_figure` writes PNG
and SVG."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from locedit.core.statistics import mean_ci  # noqa: E402

COLORS = {"subject": "tab:green", "non_subject": "tab:purple", "last": "tab:orange", "first": "tab:gray",
          "mlp": "tab:green", "attn": "tab:purple", "subject_first": "tab:blue", "subject_last": "tab:red",
          "after_subject": "tab:brown"}


def _dicts(results) -> list[dict]:
    if isinstance(results, dict):
        return [results]
    if hasattr(results, "to_dict"):
        return [results.to_dict()]
    return [r if isinstance(r, dict) else r.to_dict() for r in results]


def _axes(ax, size=(6, 3.6)):
    if ax is None:
        fig, ax = plt.subplots(figsize=size, constrained_layout=True)
        return fig, ax
    return ax.figure, ax


def save_figure(fig, stem: str | Path) -> list[Path]:
    """Write `stem.png` and `stem.svg`; close the figure."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=130)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def _band(ax, x, values: np.ndarray, label: str, color=None):
    mean, ci = mean_ci(values)
    ax.plot(x, mean, label=label, color=color, lw=1.8)
    if values.shape[0] > 1:
        ci = np.nan_to_num(ci)
        ax.fill_between(x, mean - ci, mean + ci, color=color, alpha=0.2, lw=0)


def knockout_curves(results, ax=None, title: str | None = None):
    """Relative change of p(target) (%) when the last position cannot attend to each group, per window centre;
    mean and 95% CI over facts."""
    dicts = _dicts(results)
    fig, ax = _axes(ax)
    for group in dicts[0]["relative_change"]:
        values = np.array([d["relative_change"][group] for d in dicts if group in d["relative_change"]], dtype=float)
        _band(ax, np.arange(values.shape[1]), values, group.replace("_", "-"), COLORS.get(group))
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel(f"layer (centre of a {dicts[0]['window']}-layer window, 0-indexed)")
    ax.set_ylabel("% change in p(target)")
    ax.set_title(title or f"Attention knockout from the last position (n={len(dicts)})")
    ax.legend(frameon=False, fontsize=8)
    return fig


def knockout_heatmap(result, ax=None):
    """p(target) with last -> one position blocked in a window around each layer (one fact)."""
    d = _dicts(result)[0]
    probs = np.array(d["probs"])
    fig, ax = _axes(ax, (6, 0.35 * len(d["tokens"]) + 1.2))
    im = ax.imshow(probs, aspect="auto", cmap="Purples_r", vmin=0, vmax=max(d["base_prob"], probs.max()))
    ax.set_yticks(range(len(d["tokens"])), [repr(t)[1:-1] for t in d["tokens"]], fontsize=7)
    ax.set_xlabel("layer (window centre)")
    ax.set_title(f"p({d['target']!r}) with last→position blocked (base {d['base_prob']:.2f})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return fig


def attribute_rate_curves(results, ax=None):
    """Attribute rate (%) of each position's state per layer; mean and CI over facts."""
    dicts = _dicts(results)
    fig, ax = _axes(ax)
    for position in dicts[0]["rates"]:
        series = [d["rates"][position] for d in dicts if d["rates"].get(position) is not None]
        if not series:
            continue
        values = np.array(series, dtype=float)
        _band(ax, np.arange(values.shape[1]), values, position.replace("_", "-"), COLORS.get(position))
    baseline = [d.get("embedding_baseline") for d in dicts if d.get("embedding_baseline") is not None]
    if baseline:
        ax.axhline(float(np.mean(baseline)), color="black", ls="--", lw=0.8, label="subject embeddings")
    ax.set_xlabel("layer (state entering it; 0 = embeddings)")
    ax.set_ylabel("attribute rate (%)")
    ax.set_title(f"Subject enrichment: attribute rate by position (n={len(dicts)})")
    ax.legend(frameon=False, fontsize=8)
    return fig


def sublayer_curves(results, ax=None):
    """Attribute rate at the subject-last position (measured at a fixed later layer) after knocking out a window
    of MLP or attention sublayers starting at each layer."""
    dicts = _dicts(results)
    fig, ax = _axes(ax)
    for site in ("mlp", "attn"):
        values = np.array([d["attribute_rate"][site] for d in dicts], dtype=float)
        _band(ax, np.arange(values.shape[1]), values, {"mlp": "MLP knocked out", "attn": "attention knocked out"}[site],
              COLORS[site])
    base = [d.get("baseline_rate") for d in dicts if d.get("baseline_rate") is not None]
    if base:
        ax.axhline(float(np.mean(base)), color="black", ls="--", lw=0.8, label="no intervention")
    ax.set_xlabel(f"first knocked-out layer ({dicts[0].get('window')}-layer window)")
    ax.set_ylabel(f"attribute rate at subject-last, layer {dicts[0].get('measure_layer')}")
    ax.set_title(f"What drives enrichment (n={len(dicts)})")
    ax.legend(frameon=False, fontsize=8)
    return fig


def extraction_rates(aggregate: dict, ax=None):
    """Share of facts whose attention / MLP output at the last position has the target as top-1, per layer."""
    fig, ax = _axes(ax)
    x = np.arange(len(aggregate["attn_rate"]))
    for site, label in (("attn", "attention"), ("mlp", "MLP")):
        mean = np.array(aggregate[f"{site}_rate"]) * 100
        ci = np.nan_to_num(np.array(aggregate[f"{site}_ci95"], dtype=float)) * 100
        ax.plot(x, mean, label=label, color=COLORS[site])
        ax.fill_between(x, mean - ci, mean + ci, color=COLORS[site], alpha=0.2, lw=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("extraction rate (%)")
    ax.set_title(f"Extraction events at the last position (n={aggregate['n']})")
    ax.legend(frameon=False, fontsize=8)
    return fig


def patching_bars(aggregate: dict, ax=None):
    """Share of facts with an attention extraction event when each group's states are replaced by early ones."""
    fig, ax = _axes(ax)
    groups = list(aggregate["groups"])
    sources = list(aggregate["groups"][groups[0]]) if groups else []
    width = 0.8 / max(1, len(sources))
    for j, source in enumerate(sources):
        rates = [aggregate["groups"][g][source]["rate"] * 100 for g in groups]
        ax.bar(np.arange(len(groups)) + j * width, rates, width, label=f"from layer {source}")
    ax.axhline(aggregate["baseline"] * 100, color="black", ls="--", lw=0.8, label="no patching")
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [g.replace("_", "-") for g in groups])
    ax.set_ylabel("facts with an attention event (%)")
    ax.set_title(f"Does extraction need the enriched states? (n={aggregate['n']})")
    ax.legend(frameon=False, fontsize=7)
    return fig


def heads_table(rows: Sequence[dict], ax=None, columns: Sequence[str] | None = None, title: str = "Top heads"):
    """A table of heads (dicts with layer, head and scores)."""
    rows = list(rows)
    columns = list(columns or [c for c in rows[0] if not isinstance(rows[0][c], (list, dict))]) if rows else []
    fig, ax = _axes(ax, (7, 0.3 * len(rows) + 0.8))
    ax.axis("off")
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    if cells:
        table = ax.table(cellText=cells, colLabels=columns, loc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(7)
    ax.set_title(title, fontsize=9)
    return fig


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def causal_trace_heatmap(result, ax=None):
    """ROME-style heatmap: p(target) when each (position, layer) state is restored in the corrupted run."""
    d = _dicts(result)[0]
    scores = np.array(d["scores"])
    fig, ax = _axes(ax, (6, 0.35 * len(d["tokens"]) + 1.2))
    cmap = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}[d["kind"]]
    im = ax.imshow(scores, aspect="auto", cmap=cmap, vmin=d["low_score"])
    labels = [repr(t)[1:-1] + ("*" if d["subject_span"][0] <= i < d["subject_span"][1] else "")
              for i, t in enumerate(d["tokens"])]
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("layer" + (f" (window {d['window']})" if d["kind"] != "hidden" else ""))
    ax.set_title(f"Causal trace ({d['kind']}): p({d['target']!r}), corrupted {d['low_score']:.3f}, "
                 f"clean {d['high_score']:.3f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return fig


def sitemap_figure(sitemap):
    """Four panels: the hidden-state trace at the subject's tokens, the MLP site scores, the knockout curves and
    the head scores."""
    d = _dicts(sitemap)[0]
    ev = d["evidence"]
    subject_tokens = [repr(ev["tokens"][p])[1:-1] for p in ev["subject_positions"]]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), constrained_layout=True)
    im = axes[0, 0].imshow(np.array(ev["hidden_trace"], dtype=float), aspect="auto", cmap="Purples",
                           vmin=ev["trace_low"])
    axes[0, 0].set_yticks(range(len(subject_tokens)), subject_tokens, fontsize=8)
    axes[0, 0].set_title("Causal trace: p(target) with a subject token's state restored", fontsize=9)
    axes[0, 0].set_xlabel("layer")
    fig.colorbar(im, ax=axes[0, 0], fraction=0.04)
    ko = -np.array(ev["mlp_knockout_change"], dtype=float)
    im = axes[0, 1].imshow(ko, aspect="auto", cmap="Greens")
    axes[0, 1].set_yticks(range(len(subject_tokens)), subject_tokens, fontsize=8)
    axes[0, 1].set_title("MLP knockout at one (token, layer): drop in p(target) (%)", fontsize=9)
    axes[0, 1].set_xlabel("layer")
    fig.colorbar(im, ax=axes[0, 1], fraction=0.04)
    ax = axes[1, 0]
    for group, values in ev["knockout"].items():
        ax.plot(values, label=group.replace("_", "-"), color=COLORS.get(group))
    ax.axhline(0, color="black", lw=0.6)
    ax.set_title("Attention knockout from the last position (% change)", fontsize=9)
    ax.set_xlabel("layer (window centre)")
    ax.legend(frameon=False, fontsize=7)
    head_scores = np.zeros_like(np.array(ev["head_direct_logit"], dtype=float))
    for h in d["heads"]:
        head_scores[h["layer"], h["head"]] = h["score"]
    im = axes[1, 1].imshow(head_scores.T, aspect="auto", cmap="Oranges")
    axes[1, 1].set_title("Top extraction heads (score)", fontsize=9)
    axes[1, 1].set_xlabel("layer")
    axes[1, 1].set_ylabel("head")
    fig.colorbar(im, ax=axes[1, 1], fraction=0.04)
    fig.suptitle(f"{d['fact'].get('prompt')!r} → {d['target']!r} (p={d['base_prob']:.2f})", fontsize=10)
    return fig

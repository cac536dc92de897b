"""Per-fact localization: where is this fact retrieved? Ranked MLP enrichment sites (subject position x layer),
the relation-propagation window, and ranked extraction heads, with the evidence and an editing recommendation.

How the ranking is built (see docs/locate.md, "How locate ranks sites"):

* **Carrier token.** ROME-style causal tracing of hidden states, restricted to the subject's positions: the
  subject token whose clean state recovers most of p(target) from the corrupted run carries the fact (on
  SmolLM2, " iffel" does for "The Eiffel Tower", not " Tower"). Rank-one edits key there.
* **Enrichment (MLP) sites.** For each subject position t (without position 0, the attention sink, when the
  subject has other tokens) and layer l: (a) the drop in p(target) when the MLP
  output at (t, l) is zeroed, and (b) the causal-trace effect of restoring the MLP output at (t, l) in the
  corrupted run. Per layer, (c) the drop when that layer's MLP is zeroed at every subject position. Each
  evidence is scaled to [0, 1] by its maximum over sites and the score is their weighted mean: a site ranks
  high when removing it hurts and restoring it helps.
* **Relation propagation.** The window centre where blocking last -> non-subject edges lowers p(target) most.
* **Extraction heads.** Per head at the last position: its direct contribution to the target's logit, the drop
  when its output is zeroed, the drop when only its last -> subject edges are blocked, and whether its OV
  circuit maps the subject to the target (rank of the target). Each scaled to [0, 1]; weighted mean.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from locedit.core.engine import SetSublayer, run
from locedit.core.facts import EncodedFact, Fact
from locedit.core.head import Head
from locedit.errors import FactError
from locedit.localization.common import FlowResult, as_encoded, fact_summary, window_layers
from locedit.core.lm import LM

MLP_WEIGHTS = {"knockout_cell": 0.4, "trace": 0.3, "knockout_layer": 0.3}
HEAD_WEIGHTS = {"direct_logit": 0.35, "output_knockout": 0.35, "edge_knockout": 0.15, "ov": 0.15}
# Prompts longer than this many tokens get a warning naming locate's cost (rows x tokens).
LONG_PROMPT = 512


def _positive_scaled(values: np.ndarray) -> np.ndarray:
    """Clip at 0 and divide by the maximum (all zeros stay zeros)."""
    values = np.nan_to_num(np.clip(np.asarray(values, dtype=float), 0, None))
    top = values.max() if values.size else 0.0
    return values / top if top > 0 else values


@dataclass
class SiteMap(FlowResult):
    """Where one fact is retrieved: ranked sites, the evidence behind them and an editing recommendation."""

    target: str
    target_id: int
    base_prob: float
    carrier: dict
    mlp_sites: list
    mlp_layers: list
    relation: dict
    heads: list
    recommendation: dict
    evidence: dict
    seconds: float
    fact: dict = field(default_factory=dict)
    target_source: str = "top1"
    target_text: str = ""
    analysis = "locate"

    def plot(self, ax=None):
        from locedit.core.plots import sitemap_figure

        return sitemap_figure(self)

    def summary(self) -> str:
        """A few lines for the terminal."""
        rec = self.recommendation
        mlp = ", ".join(f"L{m['layer']} ({m['score']:.2f})" for m in self.mlp_layers[:3])
        heads = ", ".join(f"{Head(h['layer'], h['head'])} ({h['score']:.2f})" for h in self.heads[:3])
        edit_heads = ", ".join(str(Head.parse(h)) for h in rec["head_edit"]["heads"])
        return "\n".join([
            self.target_line(),
            f"fact carried by subject token {self.carrier['token']!r} (position {self.carrier['position']})",
            f"enrichment MLP layers: {mlp}",
            f"relation reaches the last position around layers {self.relation['layers'][0]}-"
            f"{self.relation['layers'][-1]} (blocking last -> non-subject there: "
            f"{self.relation['relative_change']:+.1f}% p(target))",
            f"extraction heads: {heads}",
            f"recommended rank-one edit: layer(s) {rec['rank_one']['layers']} keyed at {rec['rank_one']['token']!r}"
            f"{self._calibrated_note()}; head edit: {edit_heads}",
        ])

    def _calibrated_note(self) -> str:
        rank_one = self.recommendation["rank_one"]
        if rank_one.get("source") != "calibrated":
            return ""
        return (f" (the calibrated edit layer of these weights; the located one is {rank_one['located_layers']} at "
                f"{self.evidence['tokens'][rank_one['located_position']]!r})")

    @staticmethod
    def aggregate(dicts: list[dict]) -> dict:
        """How often each MLP layer / head ranks top, overall and per relation."""
        out: dict = {"n": len(dicts), "top_mlp_layer": {}, "top_head": {}, "by_relation": {}}
        for d in dicts:
            relation = d.get("fact", {}).get("relation") or "unknown"
            layer = str(d["mlp_layers"][0]["layer"]) if d["mlp_layers"] else None
            head = str(Head(d["heads"][0]["layer"], d["heads"][0]["head"])) if d["heads"] else None
            rel = out["by_relation"].setdefault(relation, {"n": 0, "top_mlp_layer": {}, "top_head": {}})
            rel["n"] += 1
            for table, key in ((out["top_mlp_layer"], layer), (out["top_head"], head),
                               (rel["top_mlp_layer"], layer), (rel["top_head"], head)):
                if key is not None:
                    table[key] = table.get(key, 0) + 1
        for table in [out] + list(out["by_relation"].values()):
            for name in ("top_mlp_layer", "top_head"):
                table[name] = dict(sorted(table[name].items(), key=lambda kv: -kv[1]))
        return out


def locate(lm: LM, fact: Fact | EncodedFact, *, samples: int = 2, noise: float = 3.0, trace_window: int = 3,
           trace_stride: int = 2, knockout_window: int = 9, top_heads: int = 10, edit_layers: int = 1,
           edit_heads: int = 3, ov_candidates: int = 30, progress: bool | None = None) -> SiteMap:
    """Locate one fact. All evidence comes from batched analyses (a few thousand intervention rows in a handful
    of forward passes). Cost-saving defaults: `samples` noise draws for the causal traces (ROME uses 10), the
    hidden-state trace every `trace_stride` layers, the MLP trace in non-overlapping windows of `trace_window`
    layers, and the OV reading only for the `ov_candidates` heads with the largest direct or knockout effect.

    The fact's given target is the one tracked (None: the model's top-1). A prompt that ends with its subject
    raises `FactError`. `progress`: a bar over the stages (None: only on a terminal); a prompt longer than
    `LONG_PROMPT` tokens warns of its cost first."""
    # the packed path with one fact: the same analyses in fewer, larger passes (about 12% less time on SmolLM2's
    # CPU than calling each analysis's one-fact form; equal to it to float rounding, tests/test_scale.py)
    return locate_batch(lm, [fact], samples=samples, noise=noise, trace_window=trace_window,
                        trace_stride=trace_stride, knockout_window=knockout_window, top_heads=top_heads,
                        edit_layers=edit_layers, edit_heads=edit_heads, ov_candidates=ov_candidates,
                        progress=progress)[0]


def locate_batch(lm: LM, facts: Sequence[Fact | EncodedFact], *, samples: int = 2, noise: float = 3.0,
                 trace_window: int = 3, trace_stride: int = 2, knockout_window: int = 9, top_heads: int = 10,
                 edit_layers: int = 1, edit_heads: int = 3, ov_candidates: int = 30, max_rows: int = 512,
                 progress: bool | None = None) -> list[SiteMap]:
    """`locate` of several facts at once: every analysis packs the facts' rows into shared forward passes
    (`locedit.core.engine.run_packed`), so a GPU runs a few large forwards instead of many small ones per fact.
    Each SiteMap equals `locate(lm, fact)`'s (tested to 1e-5 in float32); `seconds` is the batch's time divided
    evenly. `max_rows` bounds the rows of one pass (memory)."""
    from locedit.localization.causal_trace import causal_trace_batch
    from locedit.localization.common import clean_run, resolve_targets
    from locedit.localization.heads import head_effects_batch, head_projection_batch
    from locedit.localization.knockout import attention_knockout_batch

    start = time.perf_counter()
    encs = [as_encoded(lm, f) for f in facts]
    if not encs:
        return []
    for enc in encs:
        check_relation(enc)
    _warn_if_long(lm, encs, samples, trace_stride, trace_window)
    subjects = [site_positions(enc) for enc in encs]
    L = lm.num_layers
    centers = list(range(trace_window // 2, L, trace_window))
    with _stages(progress, "locate" if len(encs) == 1 else f"locate ({len(encs)} facts)") as stage:
        # one clean pass for every analysis: its captures (states to restore, heads, targets) and, inside
        # run_packed, the clean bases' keys and values (nothing changes the model in between)
        clean = stage("clean run", lambda: clean_run(lm, encs))
        targets = resolve_targets(lm, encs, clean)
        opts = dict(samples=samples, noise=noise, fact_positions=subjects, targets=targets, max_rows=max_rows,
                    clean=clean)
        hidden = stage("hidden traces", lambda: causal_trace_batch(lm, encs, kind="hidden",
                                                                   layers=range(0, L, trace_stride), **opts))
        mlp_trace = stage("MLP traces", lambda: causal_trace_batch(lm, encs, kind="mlp", window=trace_window,
                                                                   layers=centers, **opts))
        drops = stage("MLP knockouts", lambda: _mlp_knockouts_batch(lm, encs, targets, max_rows=max_rows,
                                                                    clean=clean))
        knockout = stage("attention knockouts", lambda: attention_knockout_batch(
            lm, encs, window=knockout_window, targets=targets, max_rows=max_rows, clean=clean))
        effects = stage("head effects", lambda: head_effects_batch(lm, encs, targets=targets, max_rows=max_rows,
                                                                   clean=clean))
        projection = stage("head projections", lambda: head_projection_batch(
            lm, encs, top=0, targets=targets, fact_heads=[_head_candidates(e, ov_candidates) for e in effects],
            clean=clean))
    seconds = (time.perf_counter() - start) / len(encs)
    return [_site_map(lm, encs[k], targets[k], hidden[k], mlp_trace[k], drops[k][0], drops[k][1], knockout[k],
                      effects[k], projection[k], samples=samples, trace_window=trace_window,
                      knockout_window=knockout_window, top_heads=top_heads, edit_layers=edit_layers,
                      edit_heads=edit_heads, seconds=seconds)
            for k in range(len(encs))]


def check_relation(enc: EncodedFact) -> None:
    """Refuse a prompt with nothing after its subject: no relation reaches the last position, so every
    relation-propagation and extraction number would describe noise."""
    if enc.subject_end >= len(enc):
        example = enc.fact.subject + " is located in"
        raise FactError(f"no relation after the subject: prompt {enc.fact.prompt!r} ends with its subject "
                        f"{enc.fact.subject!r}; add the relation after it (e.g. {example!r})")


def row_estimate(lm: LM, enc: EncodedFact, samples: int, trace_stride: int, trace_window: int) -> int:
    """About how many intervention rows `locate` runs over one prompt (each a forward of the prompt's tokens)."""
    L, H, subject = lm.num_layers, lm.num_heads, len(site_positions(enc))
    traced = subject * (len(range(0, L, trace_stride)) + len(range(trace_window // 2, L, trace_window)))
    return (traced + 2) * samples + (subject + 1) * L + 4 * L + 2 * L * H


def _warn_if_long(lm: LM, encs: Sequence[EncodedFact], samples: int, trace_stride: int, trace_window: int) -> None:
    for enc in encs:
        if len(enc) > LONG_PROMPT:
            rows = row_estimate(lm, enc, samples, trace_stride, trace_window)
            warnings.warn(f"long prompt ({len(enc)} tokens, more than {LONG_PROMPT}): locate runs about {rows} "
                          f"intervention rows over it, each a forward of those tokens; this can take minutes",
                          stacklevel=3)


@contextmanager
def _stages(progress: bool | None, desc: str) -> Iterator[Callable]:
    """`stage(name, fn)` runs `fn()` and ticks a tqdm bar over locate's 7 stages (disable=None: a terminal only)."""
    from tqdm.auto import tqdm

    with tqdm(total=7, desc=desc, unit="stage", leave=False,
              disable=None if progress is None else not progress) as bar:
        def stage(name: str, fn: Callable):
            bar.set_postfix_str(name)
            value = fn()
            bar.update()
            return value

        yield stage


locate.batched = locate_batch


def _site_map(lm: LM, enc: EncodedFact, target, hidden, mlp_trace, cell_drop, layer_drop, knockout, effects,
              projection, *, samples, trace_window, knockout_window, top_heads, edit_layers, edit_heads,
              seconds) -> SiteMap:
    """Rank one fact's sites from its analyses' results (shared by `locate` and `locate_batch`)."""
    subject = site_positions(enc)
    L = lm.num_layers
    centers = list(range(trace_window // 2, L, trace_window))
    # carrier token: the subject position whose restored hidden state recovers p(target) best
    hidden_scores = np.array(hidden.scores, dtype=float)[subject]  # (|subject|, L)
    best_row = int(np.nanargmax(np.nanmax(hidden_scores, axis=1)))
    carrier_pos = subject[best_row]
    carrier = {"position": carrier_pos, "token": enc.tokens[carrier_pos],
               "trace_max": float(np.nanmax(hidden_scores[best_row])),
               "trace_layer": int(np.nanargmax(hidden_scores[best_row])),
               "per_token": {str(p): float(np.nanmax(hidden_scores[i])) for i, p in enumerate(subject)}}

    # MLP sites (subject position x layer); each traced window's effect is credited to every layer in it
    window_effect = np.array(mlp_trace.scores, dtype=float)[subject] - mlp_trace.low_score
    trace_effect = np.zeros_like(window_effect)
    for center in centers:
        for layer in window_layers(center, trace_window, L):
            trace_effect[:, layer] = window_effect[:, center]
    cell_score = (MLP_WEIGHTS["knockout_cell"] * _positive_scaled(-cell_drop) +
                  MLP_WEIGHTS["trace"] * _positive_scaled(trace_effect) +
                  MLP_WEIGHTS["knockout_layer"] * _positive_scaled(-layer_drop)[None, :])
    sites = [{"position": p, "token": enc.tokens[p], "layer": layer, "score": float(cell_score[i, layer]),
              "knockout_change": float(cell_drop[i, layer]), "trace_effect": float(trace_effect[i, layer]),
              "layer_knockout_change": float(layer_drop[layer])}
             for i, p in enumerate(subject) for layer in range(L)]
    sites.sort(key=lambda s: -s["score"])
    layers = []
    for layer in range(L):
        i = int(np.argmax(cell_score[:, layer]))
        layers.append({"layer": layer, "score": float(cell_score[i, layer]), "position": subject[i],
                       "token": enc.tokens[subject[i]], "layer_knockout_change": float(layer_drop[layer]),
                       "knockout_change": float(cell_drop[i, layer]), "trace_effect": float(trace_effect[i, layer])})
    layers.sort(key=lambda s: -s["score"])

    # relation propagation
    non_subject = np.array(knockout.relative_change["non_subject"], dtype=float)
    center = int(np.argmin(non_subject))
    relation = {"center": center, "layers": list(window_layers(center, knockout_window, L)),
                "relative_change": float(non_subject[center]),
                "subject_center": int(np.argmin(knockout.relative_change["subject"])),
                "subject_relative_change": float(np.min(knockout.relative_change["subject"]))}

    # heads
    direct = np.array(effects.direct_logit, dtype=float)
    out_ko = np.array(effects.output_knockout, dtype=float)
    edge_ko = np.array(effects.edge_knockout, dtype=float)
    ov_rank = np.minimum(np.array(projection.rank_subject_tokens), np.array(projection.rank_subject_last))
    ov = 1.0 / (1.0 + ov_rank / 10.0)
    head_score = (HEAD_WEIGHTS["direct_logit"] * _positive_scaled(direct) +
                  HEAD_WEIGHTS["output_knockout"] * _positive_scaled(-out_ko) +
                  HEAD_WEIGHTS["edge_knockout"] * _positive_scaled(-edge_ko) +
                  HEAD_WEIGHTS["ov"] * ov)
    order = np.argsort(-head_score, axis=None)
    heads = []
    for flat in order[:top_heads]:
        layer, head = divmod(int(flat), lm.num_heads)
        heads.append({"layer": layer, "head": head, "score": float(head_score[layer, head]),
                      "direct_logit": float(direct[layer, head]), "output_knockout_change": float(out_ko[layer, head]),
                      "edge_knockout_change": float(edge_ko[layer, head]), "ov_rank": int(ov_rank[layer, head])})

    recommendation = {
        "rank_one": _rank_one_recommendation(lm, enc, [m["layer"] for m in layers[:edit_layers]], carrier_pos),
        "head_edit": {"heads": [Head(h["layer"], h["head"]) for h in heads[:edit_heads]],
                      "why": "highest-scoring extraction heads at the last position"},
    }
    evidence = {
        "hidden_trace": hidden_scores.tolist(), "trace_low": hidden.low_score,
        "mlp_trace_effect": trace_effect.tolist(), "mlp_knockout_change": cell_drop.tolist(),
        "mlp_layer_knockout_change": layer_drop.tolist(), "knockout": knockout.relative_change,
        "head_direct_logit": direct.tolist(), "head_output_knockout_change": out_ko.tolist(),
        "head_edge_knockout_change": edge_ko.tolist(), "head_ov_rank": ov_rank.tolist(),
        "subject_positions": subject, "tokens": list(enc.tokens), "samples": samples,
    }
    return SiteMap(target.token, target.token_id, target.base_prob, carrier, sites[:20], layers, relation, heads,
                   recommendation, evidence, seconds, fact_summary(enc), **target.fields())


def _rank_one_recommendation(lm: LM, enc: EncodedFact, located: list[int], carrier_pos: int) -> dict:
    """Where to make a rank-one edit: the calibrated ROME site of these weights (`locedit calibrate`, keyed by the
    weights' fingerprint) when there is one, else the located layer(s) keyed at the carrier token (with a one-line
    warning naming `locedit calibrate`); the located layer(s) are always kept in `located_layers`."""
    from locedit.editing.calibration import calibrated_site
    from locedit.editing.values import key_position

    located_site = {"located_layers": located, "located_position": carrier_pos}
    site, calibration = calibrated_site(lm, "rome") if len(located) == 1 else (None, None)
    if site is None:
        return {"layers": located, "position": carrier_pos, "token": enc.tokens[carrier_pos],
                "key_position": "carrier", "source": "located", **located_site,
                "why": "highest-scoring MLP layer(s); key the edit at the carrier token"}
    position = key_position(enc, site["key_position"], carrier_pos - enc.subject_start)
    return {"layers": [int(l) for l in site["layers"]], "position": position, "token": enc.tokens[position],
            "key_position": site["key_position"], "source": "calibrated", **located_site,
            "why": f"the calibrated edit site of these weights, not the located one: {calibration.evidence}"}


def site_positions(enc: EncodedFact) -> list[int]:
    """The subject positions where enrichment sites are looked for: the subject's span without position 0, unless
    the subject is that one token. Position 0 is where most models park attention (the attention sink); zeroing
    its MLP breaks every prediction, which says nothing about this fact."""
    subject = list(enc.positions.subject)
    return [p for p in subject if p != 0] or subject


def _head_candidates(effects, count: int) -> list[Head]:
    """The heads worth reading the OV circuit of: the largest direct logit contributions and output-knockout drops."""
    direct = np.array(effects.direct_logit, dtype=float)
    drop = -np.array(effects.output_knockout, dtype=float)
    heads = direct.shape[1]
    chosen: set[Head] = set()
    for values in (direct, drop):
        for flat in np.argsort(-values, axis=None)[: count // 2]:
            chosen.add(Head(*divmod(int(flat), heads)))
    return sorted(chosen)


def _mlp_knockouts(lm: LM, enc: EncodedFact, target_id: int, base_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """Relative change (%) of p(target): MLP output zeroed at one (subject position, layer) cell, and at every
    site position (`site_positions`) of one layer. One batched run."""
    subject = site_positions(enc)
    L = lm.num_layers
    rows = [[SetSublayer("mlp", [layer], [p])] for p in subject for layer in range(L)]
    rows += [[SetSublayer("mlp", [layer], subject)] for layer in range(L)]
    with torch.no_grad():
        probs = run(lm, enc, rows).prob_of(target_id).float().cpu().numpy()
    change = 100 * (probs - base_prob) / base_prob
    return change[: len(subject) * L].reshape(len(subject), L), change[len(subject) * L:]


def _mlp_knockout_rows(lm: LM, enc: EncodedFact) -> list:
    subject = site_positions(enc)
    rows = [[SetSublayer("mlp", [layer], [p])] for p in subject for layer in range(lm.num_layers)]
    return rows + [[SetSublayer("mlp", [layer], subject)] for layer in range(lm.num_layers)]


def _mlp_knockouts_batch(lm: LM, encs: Sequence[EncodedFact], targets, max_rows: int = 512, clean=None) -> list:
    """`_mlp_knockouts` of several facts in shared passes (`run_packed`; `clean`: a `CleanRun` whose clean pass
    is shared)."""
    from locedit.core.engine import run_packed

    plans = [_mlp_knockout_rows(lm, enc) for enc in encs]
    rows = [r for plan in plans for r in plan]
    row_prompt = [k for k, plan in enumerate(plans) for _ in plan]
    ids = torch.tensor([targets[k].token_id for k in row_prompt])
    with torch.no_grad():
        probs = run_packed(lm, list(encs), rows, row_prompt=row_prompt, max_rows=max_rows,
                           clean_kv=None if clean is None else clean.kv).prob_of(ids)
    probs = probs.float().cpu().numpy()
    out, start, L = [], 0, lm.num_layers
    for enc, target, plan in zip(encs, targets, plans):
        change = 100 * (probs[start:start + len(plan)] - target.base_prob) / target.base_prob
        n_cells = len(site_positions(enc)) * L
        out.append((change[:n_cells].reshape(-1, L), change[n_cells:]))
        start += len(plan)
    return out


def locate_dataset(lm: LM, facts: Sequence[Fact], out_path, *, progress: bool = True, only_known: bool = False,
                   batch_facts: int | None = None, **options):
    """`locate` over many facts into a resumable JSON Lines file (see `locedit.localization.run_dataset`). Facts are
    located `batch_facts` at a time with `locate_batch` (default 16 on a GPU, 1 on the CPU; see
    `locedit.localization.runner.default_batch_facts`); the results are the same to float rounding."""
    from locedit.localization.runner import run_dataset

    return run_dataset(lm, locate, facts, out_path, options=options, progress=progress, only_known=only_known,
                       batch_facts=batch_facts)

"""What drives subject enrichment (paper §5): knock out the MLP or the attention sublayers of a window of early
layers at every position and measure the attribute rate of the subject-last representation at a later layer.

Measurement: the residual stream *leaving* layer `measure_layer` (the paper's `hidden_states[41]` with
`subject_repr_layer = 40` of GPT-2 XL's 48 layers) at the last subject token. The default measure layer scales
the paper's choice: round(40/48 * L), at most L - 1.

Window: a start s knocks out exactly `window` layers s .. min(s + window, measure_layer) - 1 (clipped so the
measured layer itself is never knocked out). The official code uses `range(s, min(s + 11, 40))` with
`num_block_layers = 10`, i.e. up to 11 layers; pass `window=11` to reproduce it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np
import torch

from locedit.core.engine import Capture, Intervention, SetSublayer, UniformAttention, run
from locedit.errors import InterventionError
from locedit.core.facts import EncodedFact, Fact
from locedit.core.lm import LM, Projection
from locedit.localization.attribute_rate import state_rates, unwrap
from locedit.localization.attributes import AttributeSet, attribute_set
from locedit.localization.common import FlowResult, Target, as_encoded, fact_summary, resolve_target
from locedit.core.statistics import mean_ci

Mode = Literal["zero", "paper"]
SUBLAYERS: tuple[str, ...] = ("mlp", "attn")


def default_measure_layer(num_layers: int) -> int:
    """The paper's layer 40 of 48, scaled to `num_layers` (at most the last layer)."""
    return max(0, min(num_layers - 1, round(num_layers * 40 / 48)))


def knocked_layers(start: int, window: int, measure_layer: int) -> list[int]:
    """Exactly `window` layers from `start`, clipped below `measure_layer`."""
    return list(range(start, min(start + window, measure_layer)))


def knockout(lm: LM, sublayer: str, layers: Sequence[int], n: int, mode: Mode) -> list[Intervention]:
    """Interventions that knock out `sublayer` at `layers` and all `n` positions.

    "zero": what the sublayer adds to the residual becomes exactly 0. "paper": the official code's effect —
    the MLP's pre-activations are zeroed, so it adds only its output-projection bias (0 where it has none);
    the attention becomes uniform over the visible keys (the -inf-everywhere mask of `set_block_attn_hooks`)."""
    positions = list(range(n))
    if not layers:
        return []
    if mode == "zero":
        return [SetSublayer(sublayer, layers, positions)]
    if mode != "paper":
        raise InterventionError(f"unknown mode {mode!r}; use 'zero' or 'paper'")
    if sublayer == "attn":
        return [UniformAttention(layers, positions)]
    out: list[Intervention] = []
    zero_layers = []
    for layer in layers:
        bias = lm.adapter.mlp_output_bias(lm.model, layer)
        if bias is None:
            zero_layers.append(layer)
        else:
            out.append(SetSublayer("mlp", [layer], positions, bias.detach()))
    if zero_layers:
        out.append(SetSublayer("mlp", zero_layers, positions))
    return out


@dataclass
class SublayerKnockoutResult(FlowResult):
    """`attribute_rate[sublayer][i]` / `target_prob[sublayer][i]`: the attribute rate at subject_last leaving
    `measure_layer`, and p(target) at the last position, with `sublayer` knocked out in `knocked[i]` (the
    window starting at `starts[i]`). `baseline_rate` / `base_prob`: the same without any knockout."""

    target: str
    target_id: int
    base_prob: float
    baseline_rate: float
    starts: list
    knocked: list
    attribute_rate: dict
    target_prob: dict
    mode: str
    window: int
    measure_layer: int
    position: int
    projection: str
    attribute_source: str
    num_attributes: int
    k: int
    m: int
    baseline_top_tokens: list
    fact: dict = field(default_factory=dict)
    target_source: str = "top1"
    target_text: str = ""
    analysis = "sublayer_knockout"

    def summary(self) -> str:
        """The tracked target, the baseline attribute rate, and the knockout that lowers it most per sublayer."""
        lines = [self.target_line(), f"attribute rate at position {self.position} leaving layer {self.measure_layer}: "
                 f"{self.baseline_rate:.1f} without knockout"]
        for sublayer, rates in self.attribute_rate.items():
            values = np.asarray([np.nan if r is None else r for r in rates], dtype=float)
            if np.isfinite(values).any():
                i = int(np.nanargmin(values))
                lines.append(f"  {sublayer} knocked out at layers {self.knocked[i][0]}-{self.knocked[i][-1]}: "
                             f"{values[i]:.1f} (lowest)")
        return "\n".join(lines)

    @staticmethod
    def aggregate(results: Sequence) -> dict:
        return aggregate(results)

    def plot(self, ax=None):
        from locedit.core.plots import sublayer_curves

        return sublayer_curves([self], ax=ax)


def sublayer_knockout(lm: LM, fact: Fact | EncodedFact, *, attributes: AttributeSet | None = None,
                      paragraphs: Mapping[str, str] | None = None, window: int = 10, measure_layer: int | None = None,
                      mode: Mode = "zero", projection: Projection | None = None, k: int = 500, m: int = 50,
                      target: Target | None = None) -> SublayerKnockoutResult:
    """Knock out the MLP / attention sublayers of each window start s = 0..measure_layer-1 (both sublayers,
    every start and a clean row in one batched run) and measure the subject-last attribute rate leaving
    `measure_layer`, and p(target). A_s: `attributes`, else `attribute_set(lm, subject, paragraphs)`."""
    enc = as_encoded(lm, fact)
    n, L = len(enc), lm.num_layers
    measure_layer = default_measure_layer(L) if measure_layer is None else int(measure_layer)
    if not 0 <= measure_layer < L:
        raise InterventionError(f"measure_layer {measure_layer} does not exist (the model has {L} layers)")
    if window < 1:
        raise InterventionError(f"window must be at least 1, not {window}")
    projection = projection or lm.default_projection()
    attributes = attributes if attributes is not None else attribute_set(lm, enc.fact.subject, paragraphs)
    target = target if target is not None else resolve_target(lm, enc)
    position = enc.positions.subject_last
    starts = list(range(measure_layer))
    knocked = [knocked_layers(s, window, measure_layer) for s in starts]
    rows: list[list[Intervention]] = [[]]
    for sublayer in SUBLAYERS:
        rows += [knockout(lm, sublayer, layers, n, mode) for layers in knocked]
    with torch.no_grad():
        out = run(lm, enc, rows, capture=Capture(residual=True, layers=[measure_layer + 1]))
        states = out.captures["residual", measure_layer + 1][:, position]  # (rows, d)
        probs = out.prob_of(target.token_id).cpu().tolist()
    rates, tops = state_rates(lm, states, attributes, projection, k, m)
    count = len(starts)
    return SublayerKnockoutResult(
        target.token, target.token_id, target.base_prob, rates[0], starts, knocked,
        {s: rates[1 + i * count: 1 + (i + 1) * count] for i, s in enumerate(SUBLAYERS)},
        {s: probs[1 + i * count: 1 + (i + 1) * count] for i, s in enumerate(SUBLAYERS)},
        mode, window, measure_layer, position, projection, attributes.source, len(attributes), k, m,
        tops[0][:20], fact_summary(enc), **target.fields())



def aggregate(results: Sequence) -> dict:
    """Mean and 95% CI over facts of the attribute rate and p(target) per sublayer and start, and of the
    no-knockout baselines. Accepts `SublayerKnockoutResult`s, their `to_dict()`s or `run_dataset` lines; each
    entry is `{"mean", "ci95", "n"}`."""
    dicts = [unwrap(r) for r in results]
    if not dicts:
        raise ValueError("nothing to aggregate")
    starts = dicts[0]["starts"]
    if any(d["starts"] != starts for d in dicts):
        raise ValueError("results have different window starts (different models or measure layers)")
    out: dict = {"analysis": "sublayer_knockout", "count": len(dicts), "starts": starts}
    for key in ("attribute_rate", "target_prob"):
        out[key] = {}
        for sublayer in SUBLAYERS:
            rows = np.asarray([[np.nan if v is None else v for v in d[key][sublayer]] for d in dicts], dtype=float)
            mean, ci = mean_ci(rows.reshape(len(dicts), -1))
            out[key][sublayer] = {"mean": mean.tolist(), "ci95": ci.tolist(), "n": len(dicts)}
    for key in ("baseline_rate", "base_prob"):
        mean, ci = mean_ci(np.asarray([np.nan if d[key] is None else d[key] for d in dicts], dtype=float))
        out[key] = {"mean": float(mean), "ci95": float(ci), "n": len(dicts)}
    return out

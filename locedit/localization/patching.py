"""Early-state patching (paper §6): overwrite the subject / non-subject / last positions entering layer l with the
same prompt's states from an early layer l', and see whether attention at l still extracts the target."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from locedit.core.engine import Capture, SetResidual, run
from locedit.core.facts import EncodedFact, Fact
from locedit.core.lm import LM, Projection
from locedit.core.statistics import mean_ci
from locedit.localization.common import FlowResult, Target, as_encoded, fact_summary, resolve_target
from locedit.localization.knockout import position_groups


@dataclass
class PatchingResult(FlowResult):
    """`events[group][source_layer][layer]`: is the attention output at `layer` (last position) still top-1 =
    target when `group`'s states entering `layer` are replaced by their states from `source_layer`?
    `baseline_events[layer]`: the unpatched events."""

    target: str
    target_id: int
    base_prob: float
    projection: str
    source_layers: list
    baseline_events: list
    events: dict
    fact: dict = field(default_factory=dict)
    target_source: str = "top1"
    target_text: str = ""
    analysis = "state_patching"

    def summary(self) -> str:
        """The tracked target, the unpatched extraction events, and per group the sources that keep one."""
        lines = [self.target_line(), f"unpatched attention extraction events at layers "
                 f"{[l for l, e in enumerate(self.baseline_events) if e] or 'none'}"]
        for group, by_source in self.events.items():
            kept = [s for s, events in by_source.items() if any(events)]
            lines.append(f"  {group} patched from layer(s) {', '.join(kept) or 'none'} still extracts")
        return "\n".join(lines)

    def plot(self, ax=None):
        from locedit.core.plots import patching_bars

        return patching_bars(self.aggregate([self.to_dict()]), ax=ax)

    @staticmethod
    def aggregate(dicts: list[dict]) -> dict:
        """Per group and source layer: share of facts with an attention extraction event at any layer (the
        paper's max over layers, then mean), beside the unpatched share."""
        if not dicts:
            return {}
        base = np.array([float(any(d["baseline_events"])) for d in dicts])
        out = {"n": len(dicts), "baseline": float(base.mean()), "groups": {}}
        for group in dicts[0]["events"]:
            out["groups"][group] = {}
            for source in dicts[0]["events"][group]:
                values = np.array([float(any(d["events"][group][source])) for d in dicts])
                mean, ci = mean_ci(values)
                out["groups"][group][source] = {"rate": float(mean), "ci95": float(ci) if np.isfinite(ci) else None}
        return out


def state_patching(lm: LM, fact: Fact | EncodedFact, *, source_layers: Sequence[int] = (0, 1, 5, 10, 20),
                   groups: Sequence[str] = ("subject", "non_subject", "last"), projection: Projection | None = None,
                   target: Target | None = None) -> PatchingResult:
    """All (group, source layer, layer) patches in one batched run. Source layers past the model's depth are
    dropped; index 0 is the embedding output. As in the official code, a patch is applied even when l' > l."""
    enc = as_encoded(lm, fact)
    target = target if target is not None else resolve_target(lm, enc)
    projection = projection or lm.default_projection()
    sources = [s for s in source_layers if 0 <= s <= lm.num_layers]
    named = {k: v for k, v in position_groups(enc, "default").items() if k in groups}
    L = lm.num_layers
    with torch.no_grad():
        clean = run(lm, enc, capture=Capture(residual=True, attn=True, last_only=False)).captures
        rows, keys = [], []
        for group, positions in named.items():
            if not positions:
                continue
            for source in sources:
                value = clean["residual", source][0, list(positions)]
                for layer in range(L):
                    rows.append([SetResidual(layer, positions, value)])
                    keys.append((group, source, layer))
        out = run(lm, enc, rows, capture=Capture(attn=True, last_only=True))
        attn = torch.stack([out.captures["attn", layer][i] for i, (_, _, layer) in enumerate(keys)])
        top1 = lm.project(attn, projection).argmax(-1).tolist()
        base_top1 = lm.project(clean.stack("attn", range(L))[:, 0, -1], projection).argmax(-1).tolist()
    events: dict = {g: {str(s): [False] * L for s in sources} for g in named}
    for (group, source, layer), t in zip(keys, top1):
        events[group][str(source)][layer] = t == target.token_id
    return PatchingResult(target.token, target.token_id, target.base_prob, projection, sources,
                          [t == target.token_id for t in base_top1], events, fact_summary(enc), **target.fields())

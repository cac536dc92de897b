"""Head-parameter edits: a rank-one change of the parameters of the extraction heads `locate` finds.

`mode="out"` (default) — the head's slice W_O,h of the attention output projection, keyed on the head's output
z_h at the last position. With z̄ the template-averaged z_h and C_h = E[z_h z_hᵀ] (the head's block of the output
projection's input second moment):

    W_O,h ← W_O,h + r uᵀ,  u = C_h⁻¹z̄ / ‖C_h⁻¹z̄‖,  r = δ_h / (uᵀz̄)

so the head now writes W_O,h z̄ + δ_h at the last position, while outputs z with small uᵀz (in the C_h-whitened
sense, i.e. typical other inputs) change least. δ_h is optimised as ROME's v*, but as that head's contribution
(weight decay and clamp relative to ‖W_O,h z̄‖), jointly for all edited heads.

`mode="value"` — the head's value projection W_V,h, keyed on the attention input x (after the pre-attention norm)
at the subject/carrier position, with C = E[x xᵀ]:  W_V,h ← W_V,h + r uᵀ, u = C⁻¹x̄/‖C⁻¹x̄‖, r = δ_v/(uᵀx̄).
With grouped-query attention the value rows belong to a kv head shared by several query heads: the edit changes
what all of them read (recorded in the edit's notes); heads that share a kv head are edited once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from locedit.errors import LoceditError
from locedit.core.facts import Fact
from locedit.editing.edit import WeightDelta
from locedit.editing.rank_one import linear_delta, rank_one, weight_out_in
from locedit.editing.templates import context_templates
from locedit.editing.values import Site, build_batch, optimize_values


@dataclass
class HeadEditResult:
    deltas: list[WeightDelta]
    losses: list[float]
    seconds: float
    notes: list[str] = field(default_factory=list)


def head_update(lm, fact: Fact, new_target_text: str, heads, rule: str, carrier_offset: int | None, hp,
                stats) -> HeadEditResult:
    if hp.mode not in ("out", "value"):
        raise LoceditError(f"head edit mode must be 'out' or 'value', not {hp.mode!r}")
    templates = context_templates(lm, hp.context_template_length_params, hp.seed)
    notes: list[str] = []
    if hp.mode == "out":
        batch = build_batch(lm, fact, new_target_text, templates, "last", None, hp.kl_prompt,
                            hp.template_tokens)
        sites, plan = [], []
        for layer, head in heads:
            module = lm.adapter.layer_part(lm.model, layer, lm.adapter.attn_o)
            cols = slice(head * lm.head_dim, (head + 1) * lm.head_dim)
            w_oh = weight_out_in(module, lm.adapter.conv1d)[:, cols]
            sites.append(Site("attn_o", layer, key_columns=cols,
                              reference=lambda x, c=cols, w=w_oh: x[:, c].to(w.dtype) @ w.T))
            plan.append((layer, cols, module))
        result = optimize_values(lm, batch, sites, hp)
        merged: dict[int, tuple] = {}
        for (layer, cols, module), key, delta in zip(plan, result.keys, result.deltas):
            C = stats.get("attn_out", layer)[cols, cols] if hp.mom2_adjustment else None
            r, u = rank_one(C, key, delta)
            right = torch.zeros(lm.num_heads * lm.head_dim, 1)
            right[cols] = u.cpu()
            left = r.cpu()
            if layer in merged:  # several heads of one layer: one delta of rank = number of heads
                l0, r0, _ = merged[layer]
                left, right = torch.cat([l0, left], 1), torch.cat([r0, right], 1)
            merged[layer] = (left, right, module)
        deltas = [linear_delta(lm.model, m, left, right, lm.adapter.conv1d) for left, right, m in merged.values()]
    else:
        batch = build_batch(lm, fact, new_target_text, templates, rule, carrier_offset, hp.kl_prompt,
                            hp.template_tokens)
        groups: dict[tuple[int, int], list[int]] = {}
        group = lm.num_heads // lm.num_kv_heads
        for layer, head in heads:
            groups.setdefault((layer, head // group if lm.num_kv_heads != lm.num_heads else head), []).append(head)
        sites, plan = [], []
        for (layer, kv), members in groups.items():
            module = lm.adapter.layer_part(lm.model, layer, lm.adapter.qkv)
            rows = lm.adapter.head_value_rows(lm.model, members[0])
            sites.append(Site("qkv", layer, columns=rows))
            plan.append((layer, rows, module))
            if group > 1:
                shared = list(range(kv * group, (kv + 1) * group))
                notes.append(f"grouped-query attention: the value edit of L{layer} kv head {kv} changes what query "
                             f"heads {shared} read (asked for {members})")
        result = optimize_values(lm, batch, sites, hp)
        deltas = []
        for (layer, rows, module), key, delta in zip(plan, result.keys, result.deltas):
            r, u = rank_one(stats.get("attn_in", layer) if hp.mom2_adjustment else None, key, delta)
            out_features = weight_out_in(module, lm.adapter.conv1d).shape[0]
            left = torch.zeros(out_features, 1)
            left[rows] = r.cpu()
            deltas.append(linear_delta(lm.model, module, left, u.cpu(), lm.adapter.conv1d))
    deltas = _merge_same_tensor(deltas)
    return HeadEditResult(deltas, result.losses, result.seconds, notes)


def _merge_same_tensor(deltas: list[WeightDelta]) -> list[WeightDelta]:
    """One delta per tensor: factors of deltas of the same parameter are concatenated (ranks add)."""
    merged: dict[str, WeightDelta] = {}
    for d in deltas:
        if d.name in merged:
            m = merged[d.name]
            m.left, m.right = torch.cat([m.left, d.left], 1), torch.cat([m.right, d.right], 1)
        else:
            merged[d.name] = d
    return list(merged.values())

"""ROME with the r-ROME fix: a rank-one update of one layer's MLP output projection.

    Ŵ = W + r uᵀ,  u = C⁻¹k*/‖C⁻¹k*‖,  r = (v* − W k* − b) / (uᵀk*),  v* = W k* + b + δ

k* is the key (the projection's input) at the key position averaged over the context templates; δ is optimised as
in ROME (`values.optimize_values`). r-ROME's fix is that the same template-averaged k* appears in the numerator
and the denominator (ROME's code divides by the bare prompt's key, which causes its "disabling edits"). Ŵk* = v*
holds exactly (up to float rounding)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from locedit.core.facts import Fact
from locedit.editing.edit import WeightDelta
from locedit.editing.rank_one import linear_delta, rank_one
from locedit.editing.templates import context_templates
from locedit.editing.values import Site, build_batch, optimize_values


@dataclass
class RankOneResult:
    delta: WeightDelta
    key: torch.Tensor  # k*, float32
    value: torch.Tensor  # v*, float32 (the module output wanted at k*)
    losses: list[float]
    seconds: float


def rome_update(lm, fact: Fact, new_target_text: str, layer: int, rule: str, carrier_offset: int | None, hp,
                C: torch.Tensor | None) -> RankOneResult:
    """Compute (do not apply) ROME's rank-one change of layer `layer`'s MLP output projection."""
    module = lm.adapter.layer_part(lm.model, layer, lm.adapter.mlp_down)
    templates = context_templates(lm, hp.context_template_length_params, hp.seed)
    batch = build_batch(lm, fact, new_target_text, templates, rule, carrier_offset, hp.kl_prompt,
                        hp.template_tokens)
    result = optimize_values(lm, batch, [Site("mlp_down", layer)], hp)
    key, delta = result.keys[0], result.deltas[0]
    left, right = rank_one(C if hp.mom2_adjustment else None, key, delta)
    with torch.no_grad():
        value = module(key.to(module.weight.device, lm.dtype)[None]).float()[0] + delta.to(module.weight.device)
    return RankOneResult(linear_delta(lm.model, module, left, right, lm.adapter.conv1d), key, value,
                         result.losses, result.seconds)

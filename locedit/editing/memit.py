"""MEMIT (several layers, a batch of facts, one update) and AlphaEdit (`nullspace=True`).

1. Per fact, z = h_L + δ: δ is optimised on the residual stream leaving the last edited layer L (`values`).
2. For each edited layer l in ascending order, on the model with the lower layers' updates already in place:
   K_l = template-averaged keys (d_k × n), R = (z − h_L) / (layers left), and
   MEMIT:     Δ_l = R K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹
   AlphaEdit: Δ_l = R (A⁻¹ P K_l)ᵀ,  A = P (K_l K_lᵀ + K_p K_pᵀ) + α I,  P = projector on the null space of C_l,
              K_p = the keys of the edits already applied to the model at that layer (sequential editing).
The lower layers' updates are written into the weights only temporarily while the higher layers are computed;
the originals are restored in every case, and the caller applies the result atomically as one `Edit`."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch

from locedit.core.facts import Fact
from locedit.editing.edit import WeightDelta, applied_edits
from locedit.editing.rank_one import (
    alphaedit_factors,
    linear_delta,
    memit_factors,
    nullspace_projector,
    weight_out_in,
)
from locedit.editing.templates import context_templates
from locedit.core.engine import Capture, run_batch
from locedit.editing.values import Site, build_batch, optimize_values_many, templated_prompts

_PROJECTORS: dict = {}


@dataclass
class MemitResult:
    deltas: list[WeightDelta]
    keys: dict[int, torch.Tensor]
    losses: list[list[float]]
    seconds_values: float


def memit_update(lm, facts: Sequence[Fact], new_targets: Sequence[str], layers: Sequence[int], rule: str,
                 carrier_offsets: Sequence[int | None], hp, stats) -> MemitResult:
    layers = sorted(set(int(l) for l in layers))
    top = layers[-1]
    templates = context_templates(lm, hp.context_template_length_params, hp.seed)
    zs, losses, seconds = [], [], 0.0
    batches = [build_batch(lm, fact, target, templates, rule, offset, hp.kl_prompt, hp.template_tokens)
               for fact, target, offset in zip(facts, new_targets, carrier_offsets)]
    for chunk in range(0, len(batches), hp.batch_facts):  # the z of several facts in one forward per step
        results = optimize_values_many(lm, batches[chunk:chunk + hp.batch_facts],
                                       [Site("layer", top, record_key=False)], hp)
        for result in results:
            zs.append(result.inits[0] + result.deltas[0])
            losses.append(result.losses)
            seconds += result.seconds
    Z = torch.stack(zs, dim=1)  # (d_model, n)
    prompts = [templated_prompts(lm, f, templates, rule, off, hp.template_tokens)
               for f, off in zip(facts, carrier_offsets)]
    deltas, keys = [], {}
    modules = {l: lm.adapter.layer_part(lm.model, l, lm.adapter.mlp_down) for l in layers}
    with _restoring([modules[l].weight for l in layers]):
        for i, layer in enumerate(layers):
            K, H = _keys_and_outputs(lm, prompts, layer, top)
            R = (Z - H) / (len(layers) - i)
            C = stats.get("mlp", layer)
            if hp.nullspace:
                P = _projector(C, hp.nullspace_threshold, hp.nullspace_energy)
                previous = _previous_keys(lm, modules[layer].weight, layer)
                left, right = alphaedit_factors(P, K, R, previous, hp.L2)
            else:
                weight = hp.mom2_update_weight or 15000.0 * K.shape[0] / 16384
                left, right = memit_factors(C, K, R, weight)
            delta = linear_delta(lm.model, modules[layer], left, right, lm.adapter.conv1d)
            deltas.append(delta)
            keys[layer] = K.float().cpu()
            with torch.no_grad():
                W = weight_out_in(modules[layer], lm.adapter.conv1d)
                W.copy_((W.float() + (left @ right.T).to(W.device)).to(W.dtype))
    return MemitResult(deltas, keys, losses, seconds)


KEY_ROWS = 64  # prompts per forward when collecting keys (bounds the captured states' memory)


def _keys_and_outputs(lm, prompts, key_layer: int, out_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per fact: the template-averaged input of `key_layer`'s MLP output projection at the key position (d_k)
    and the output of decoder layer `out_layer` at the key position of the bare prompt (template 0). Returns
    (d_k × n, d_model × n)."""
    rows, positions, owner = [], [], []
    for f, (ids, keys, _) in enumerate(prompts):
        rows += ids
        positions += keys
        owner += [f] * len(ids)
    capture = Capture(mlp_keys=True, outputs=("layer",), layers=sorted({key_layer, out_layer}))
    k_rows, h_rows = [], []
    with torch.no_grad():
        for start in range(0, len(rows), KEY_ROWS):
            part = range(start, min(start + KEY_ROWS, len(rows)))
            caps = run_batch(lm, [rows[i] for i in part], capture=capture, padding_side="right").captures
            for j, i in enumerate(part):
                k_rows.append(caps.row("mlp_keys", key_layer, j)[positions[i]].float().to(lm.device))
                h_rows.append(caps.row("layer", out_layer, j)[positions[i]].float().to(lm.device))
    keys, outs = torch.stack(k_rows), torch.stack(h_rows)
    owner_t = torch.tensor(owner, device=lm.device)
    n = len(prompts)
    K = torch.stack([keys[owner_t == f].mean(0) for f in range(n)], dim=1)
    first = [owner.index(f) for f in range(n)]
    H = outs[first].T
    return K, H


def _projector(C: torch.Tensor, threshold: float, energy: float | None) -> torch.Tensor:
    key = (C.data_ptr(), tuple(C.shape), float(C.flatten()[0]), threshold, energy)
    if key not in _PROJECTORS:
        _PROJECTORS.clear()
        _PROJECTORS[key] = nullspace_projector(C, threshold, energy)
    return _PROJECTORS[key]


def _previous_keys(lm, weight: torch.Tensor, layer: int) -> torch.Tensor | None:
    """Σ K_p K_pᵀ over the edits applied to the model that changed this layer's projection (AlphaEdit's cache)."""
    total = None
    for edit in applied_edits(lm):
        K = edit.keys.get(layer)
        if K is None:
            continue
        part = K.double() @ K.double().T
        total = part if total is None else total + part
    return total


@contextmanager
def _restoring(params: list[torch.Tensor]):
    """Restore these parameters' exact bytes on exit, whatever happens inside."""
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)

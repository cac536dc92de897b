"""FT-L, the ROME paper's constrained fine-tuning baseline: Adam on one layer's MLP output projection, each entry
of the change kept within ±`norm_constraint`, minimising the NLL of the new target after the bare prompt.

The change D is trained as an engine `AddLinear` (the projection's output gets `x Dᵀ` added), so no weight is
written while training; the result is a dense `WeightDelta`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from locedit.errors import LoceditError
from locedit.core.facts import Fact
from locedit.editing.edit import WeightDelta, tensor_sha256
from locedit.editing.rank_one import param_name, weight_out_in
from locedit.core.engine import AddLinear, prefixed
from locedit.editing.values import build_batch


@dataclass
class FTResult:
    delta: WeightDelta
    losses: list[float]
    seconds: float


def ft_update(lm, fact: Fact, new_target_text: str, layer: int, hp) -> FTResult:
    start = time.perf_counter()
    module = lm.adapter.layer_part(lm.model, layer, lm.adapter.mlp_down)
    W = weight_out_in(module, lm.adapter.conv1d)
    D = torch.zeros(W.shape, dtype=torch.float32, device=W.device, requires_grad=True)
    batch = build_batch(lm, fact, new_target_text, ["{}"], "subject_last", None, None)

    rows = [[AddLinear("mlp_down", layer, D)]]
    run = prefixed(lm, batch.input_ids, batch.attention_mask, 0, batch.position_ids)
    optimizer = torch.optim.Adam([D], lr=hp.lr)
    positions = torch.tensor(batch.target_positions[0])
    ids = torch.tensor(batch.target_ids, device=lm.device)
    losses: list[float] = []
    with run:  # the engine's hooks stay attached for the whole loop
        for step in range(hp.num_steps):
            logits = run.run(rows, logits_at=positions).logits
            loss = -torch.log_softmax(logits[0].float(), -1)[torch.arange(len(ids)), ids].mean()
            value = float(loss.detach())
            if value != value:
                raise LoceditError(f"FT diverged (loss {value}) at step {step}; nothing was changed")
            losses.append(value)
            if value < hp.early_stop_loss:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                D.clamp_(-hp.norm_constraint, hp.norm_constraint)
    weight = module.weight
    delta = WeightDelta(param_name(lm.model, weight), tensor_sha256(weight), tuple(weight.shape),
                        dense=D.detach().cpu(), transposed=lm.adapter.conv1d)
    return FTResult(delta, losses, time.perf_counter() - start)

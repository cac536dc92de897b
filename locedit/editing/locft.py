"""LocFT-BF: localized fine-tuning with a breadth-first pipeline ("Fine-tuning Done Right in Model Editing", Yang
et al., arXiv 2509.22072, ICLR 2026; reference code github.com/ICT-STAR/LocFT `fine-tune.py`).

One layer's MLP output projection is trained with Adam on the NLL of the new target tokens (and an EOS token
after them, as the paper's code appends one) given the bare prompt. Breadth-first: `num_steps` epochs over the
edit set, each a shuffled pass of mini-batches of `batch_size` requests, instead of driving each edit to
convergence before the next (FT-L's depth-first loop, `locedit.editing.ft`). A mini-batch whose loss is already
below `early_stop_loss` takes no step, and training stops once an epoch's mean loss is below it (as the paper's code).

The change D is trained through a forward hook on the projection (its output gets `x Dᵀ` added), so no weight is
written while training; the result is a dense `WeightDelta`, applied and reverted like every `Edit`. The shuffle
uses a fixed seed, so the same requests give the same change (an `EditSession` redoing a batch after a kill
computes what it had computed)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from locedit.core.facts import Fact
from locedit.editing.edit import WeightDelta, tensor_sha256
from locedit.editing.rank_one import param_name, weight_out_in
from locedit.editing.values import left_padded
from locedit.errors import EditError, LoceditError

# The default layer, as a fraction of the depth, for weights without a calibrated LocFT site. The paper's files tune
# layer 6 of 28 (Qwen2.5-7B), 22 of 32 (Llama-3-8B), 23 of 32 (Mistral-7B), and its sweep of Llama-3-8B found
# generalisation peaking at layers 3-8. On SmolLM2's tuning stream (data/results/long_run/locft_sweep.md: 100
# CounterFact-val edits in one breadth-first batch, WILD-scored) layer 4 (0.14 of the depth) had the highest
# reliability among the settings whose perplexity drift stayed within 5% (91%; layers 2, 6, 12 and 24 drifted
# 442%, 16%, 66% and 22% at the same lr), so that is the default; ROME's calibrated layer (1) is not reused.
DEFAULT_DEPTH = 0.14


@dataclass
class LocFTResult:
    delta: WeightDelta
    losses: list[float]  # mean loss of each epoch
    steps: int
    seconds: float


def locft_layer(lm) -> tuple[int, str]:
    """The layer LocFT-BF tunes on `lm` and why: these weights' calibrated `locft` site, else `DEFAULT_DEPTH` of
    the depth (ROME's calibrated layer is not reused: on SmolLM2 it fine-tuned worst, see `DEFAULT_DEPTH`)."""
    from locedit.editing.calibration import calibrated_site

    site, _ = calibrated_site(lm, "locft", warn=False)
    if site is not None and len(site.get("layers", [])) == 1:
        return int(site["layers"][0]), "calibrated"
    return int(round(DEFAULT_DEPTH * (lm.num_layers - 1))), f"default ({DEFAULT_DEPTH:.0%} of the depth)"


def training_rows(lm, facts: Sequence[Fact], targets: Sequence[str], append_eos: bool) -> list[tuple[list[int], int]]:
    """(prompt + target ids [+ EOS], number of target tokens) for each request."""
    from locedit.verification.metrics import prompt_ids, target_ids

    eos = lm.tokenizer.eos_token_id
    rows = []
    for fact, target in zip(facts, targets):
        ids = prompt_ids(lm, fact.prompt)
        new = target_ids(lm, fact.prompt, target, ids) + ([eos] if append_eos and eos is not None else [])
        rows.append((ids + new, len(new)))
    return rows


def batch_loss(lm, rows: list[tuple[list[int], int]]) -> torch.Tensor:
    """Mean over requests of the mean NLL of their target tokens (left-padded, so every target ends the row and
    only the last positions are projected to the vocabulary)."""
    from locedit.core.engine import forward_accepts

    seqs = [ids[:-1] for ids, _ in rows]  # the last token predicts nothing
    ids, mask, positions = left_padded(lm, seqs)
    longest = max(n for _, n in rows)
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    if forward_accepts(lm, "logits_to_keep"):
        logits = lm.model(**kwargs, logits_to_keep=longest).logits
    else:
        logits = lm.model(**kwargs).logits[:, -longest:]
    logp = logits.float().log_softmax(-1)
    losses = []
    for i, (full, n) in enumerate(rows):
        tgt = torch.tensor(full[-n:], device=logp.device)
        losses.append(-logp[i, longest - n:].gather(1, tgt[:, None]).mean())
    return torch.stack(losses).mean()


def locft_update(lm, facts: Sequence[Fact], targets: Sequence[str], layer: int, hp) -> LocFTResult:
    """Train the change of `layer`'s MLP output projection so the model continues each fact's prompt with its
    target (the texts as they continue the prompts), breadth-first over all of them."""
    if not facts:
        raise EditError("no facts to fine-tune on")
    start = time.perf_counter()
    module = lm.adapter.layer_part(lm.model, layer, lm.adapter.mlp_down)
    W = weight_out_in(module, lm.adapter.conv1d)
    D = torch.zeros(W.shape, dtype=torch.float32, device=W.device, requires_grad=True)
    rows = training_rows(lm, facts, targets, hp.append_eos)
    optimizer = torch.optim.Adam([D], lr=hp.lr, weight_decay=hp.weight_decay)
    generator = torch.Generator().manual_seed(hp.seed)

    def add_change(_module, inputs, output):
        return output + torch.nn.functional.linear(inputs[0], D.to(output.dtype))

    handle = module.register_forward_hook(add_change)
    epochs: list[float] = []
    steps = 0
    try:
        for epoch in range(hp.num_steps):
            order = torch.randperm(len(rows), generator=generator).tolist()
            total = 0.0
            for b in range(0, len(order), hp.batch_size):
                chunk = [rows[i] for i in order[b:b + hp.batch_size]]
                loss = batch_loss(lm, chunk)
                value = float(loss.detach())
                if value != value:
                    raise LoceditError(f"LocFT-BF diverged (loss {value}) in epoch {epoch}; nothing was changed")
                total += value * len(chunk)
                if value >= hp.early_stop_loss:
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    steps += 1
            epochs.append(total / len(rows))
            if epochs[-1] < hp.early_stop_loss:
                break
    finally:
        handle.remove()
    weight = module.weight
    delta = WeightDelta(param_name(lm.model, weight), tensor_sha256(weight), tuple(weight.shape),
                        dense=D.detach().cpu(), transposed=lm.adapter.conv1d)
    return LocFTResult(delta, epochs, steps, time.perf_counter() - start)

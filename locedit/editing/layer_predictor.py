"""Predict the edit layer without trial edits (issue #16 §2): per-layer scores of one EditRequest from forwards and
one backward only. No weight is written and no edit is made.

* `gradient_scores`: the gradient g_l of the new target's NLL with respect to layer l's MLP output at the key
  position (one forward + backward through zero `AddToSublayer` values). ``grad_norm`` = ‖g_l‖ (the first-order
  NLL decrease per unit of δ); ``grad_x_out`` = ‖g_l‖·‖m_l‖, m_l the MLP output there: ROME clamps
  ‖δ‖ ≤ c·‖m_l‖, so this is the first-order decrease of the largest step ROME allows at that layer.
* `rome_reach_scores`: closed-form ROME quantities with u ∝ C⁻¹k*: the ratio (kᵀC⁻¹k*)/(k*ᵀC⁻¹k*) says how much of
  the change written at k* a key k receives. ``paraphrase`` = its mean over the paraphrases (at the subject's last
  token, where the subject occurs; else the largest over positions), ``neighbour`` = minus the mean over
  neighbour prompts of the largest |ratio| over their positions (a leak, so higher is better), ``margin`` = the
  two summed. k* is the bare prompt's key (ROME averages it over context templates).
* `restrict_to_band`: any per-layer score (e.g. locate's) kept inside a layer band, ranked below it outside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from locedit.core.facts import EditRequest, Fact, encode_fact
from locedit.errors import FactError, LoceditError


@dataclass(frozen=True)
class LayerScores:
    """Per-layer scores of one request: `scores[name][i]` belongs to `layers[i]`; higher = predicted better."""

    layers: tuple[int, ...]
    scores: dict[str, tuple[float, ...]]

    def best(self, name: str) -> int:
        """The layer `name` ranks first (the earlier layer on a tie)."""
        values = self.scores[name]
        return self.layers[max(range(len(values)), key=lambda i: (values[i], -self.layers[i]))]


def _layers(lm, layers: Sequence[int] | None) -> tuple[int, ...]:
    out = tuple(range(lm.num_layers)) if layers is None else tuple(sorted({int(l) for l in layers}))
    bad = [l for l in out if not 0 <= l < lm.num_layers]
    if bad or not out:
        raise LoceditError(f"layers {list(layers or [])} are not in 0..{lm.num_layers - 1} of {lm.name}")
    return out


def _key_index(lm, fact: Fact, key_position: str) -> int:
    from locedit.editing.values import key_position as position_of

    return position_of(encode_fact(lm.tokenizer, fact), key_position)


def _rewrite_ids(lm, request: EditRequest) -> tuple[list[int], list[int]]:
    """Token ids of prompt + new target minus its last token, and the new target's ids."""
    from locedit.editing.values import target_token_ids

    prompt = request.fact.prompt
    prompt_ids = list(lm.tokenizer(prompt, add_special_tokens=True)["input_ids"])
    target = target_token_ids(lm.tokenizer, prompt, request.new_target_text())
    return prompt_ids + target[:-1], target


def target_nll(lm, request: EditRequest, deltas: dict[int, torch.Tensor] | None = None, *,
               key_position: str = "subject_last", capture_outputs: bool = False):
    """The new target's summed NLL on the edit prompt with `deltas[l]` (d_model) added to layer l's MLP output at
    the key position. Runs under the caller's grad mode. With `capture_outputs`, also returns {layer: the MLP
    output there} (detached)."""
    from locedit.core.engine import AddToSublayer, Capture, forward, intervene

    ids, target = _rewrite_ids(lm, request)
    pos = _key_index(lm, request.fact, key_position)
    deltas = deltas or {}
    row = [AddToSublayer("mlp_down", l, [pos], d.reshape(1, -1)) for l, d in sorted(deltas.items())]
    layers = sorted(deltas) if deltas else list(range(lm.num_layers))
    capture = Capture(mlp=True, layers=layers) if capture_outputs else None
    n_prompt = len(ids) - len(target) + 1
    with intervene(lm, [row], seq_len=len(ids), capture=capture) as caps:
        logits = forward(lm, torch.tensor([ids]), position_ids=torch.arange(len(ids))[None]).logits
    logp = logits[0, n_prompt - 1:n_prompt - 1 + len(target)].float().log_softmax(-1)
    nll = -logp[torch.arange(len(target)), torch.tensor(target, device=logp.device)].sum()
    if not capture_outputs:
        return nll
    return nll, {l: caps["mlp", l][0, pos].detach().float() for l in layers}


def target_gradients(lm, request: EditRequest, *, key_position: str = "subject_last",
                     layers: Sequence[int] | None = None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """∂NLL(new target)/∂(MLP output of each layer at the key position), at δ = 0, from one forward and one
    backward; and the MLP outputs there. No parameter gets a `.grad`."""
    layers = _layers(lm, layers)
    zeros = {l: torch.zeros(lm.d_model, device=lm.device, dtype=torch.float32, requires_grad=True) for l in layers}
    with torch.enable_grad():
        nll, outputs = target_nll(lm, request, zeros, key_position=key_position, capture_outputs=True)
        grads = torch.autograd.grad(nll, [zeros[l] for l in layers])
    return {l: g.detach().float() for l, g in zip(layers, grads)}, outputs


def gradient_scores(lm, request: EditRequest, *, key_position: str = "subject_last",
                    layers: Sequence[int] | None = None) -> LayerScores:
    """``grad_norm`` (‖g_l‖) and ``grad_x_out`` (‖g_l‖·‖m_l‖) per layer; see the module docstring."""
    grads, outputs = target_gradients(lm, request, key_position=key_position, layers=layers)
    ls = tuple(sorted(grads))
    norm = tuple(float(grads[l].norm()) for l in ls)
    scaled = tuple(float(grads[l].norm() * outputs[l].norm()) for l in ls)
    return LayerScores(ls, {"grad_norm": norm, "grad_x_out": scaled})


def reach_ratio(C: torch.Tensor, key: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(kᵀC⁻¹k*)/(k*ᵀC⁻¹k*) for each row k of `keys` (n, d_k): the share of the change ROME writes at k* = `key`
    that a key k receives (1 for k = k*). Solved in float64."""
    u = torch.linalg.solve(C.double(), key.double()[:, None])[:, 0]
    denom = u @ key.double()
    if not torch.isfinite(denom) or denom.abs() < 1e-12:
        raise LoceditError("degenerate key: C⁻¹k* is orthogonal to k* (statistics too few or singular)")
    return (keys.double() @ u / denom).float()


def _prompt_keys(lm, prompts: Sequence[str], layers: Sequence[int]) -> list[dict[int, torch.Tensor]]:
    """Per prompt, {layer: its MLP keys (positions, d_k)} with special-token positions dropped."""
    from locedit.core.engine import Capture, run_batch

    if not prompts:
        return []
    res = run_batch(lm, list(prompts), capture=Capture(mlp_keys=True, layers=list(layers)))
    special = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    out = []
    for i, p in enumerate(prompts):
        ids = lm.tokenizer(p, add_special_tokens=True)["input_ids"]
        keep = torch.tensor([j for j, t in enumerate(ids) if t not in special] or [len(ids) - 1])
        out.append({l: res.captures.row("mlp_keys", l, i).float()[keep.to(lm.device)] for l in layers})
    return out


def _subject_last(lm, subject: str, prompt: str) -> int | None:
    """The subject's last token in `prompt` (positions counted without special tokens), None if absent."""
    if subject not in prompt:
        return None
    enc = encode_fact(lm.tokenizer, Fact(subject, prompt))
    special = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    return sum(1 for t in enc.input_ids[:enc.subject_end] if t not in special) - 1


def rome_reach_scores(lm, request: EditRequest, stats=None, *, key_position: str = "subject_last",
                      layers: Sequence[int] | None = None, paraphrases: Sequence[str] | None = None,
                      neighbours: Sequence[str] | None = None) -> LayerScores:
    """``paraphrase``, ``neighbour`` and ``margin`` per layer (module docstring). `stats`: `KeyStats` with "mlp"
    moments at `layers` (None: `key_statistics` with ROME's default token count, cached). Paraphrases and
    neighbours default to the fact's meta; at least one of each is needed."""
    from locedit.editing.hparams import read_hparams
    from locedit.editing.stats import key_statistics

    layers = _layers(lm, layers)
    fact = request.fact
    meta = fact.meta or {}
    paraphrases = list(meta.get("paraphrases") or []) if paraphrases is None else list(paraphrases)
    neighbours = list(meta.get("neighborhood") or []) if neighbours is None else list(neighbours)
    if not paraphrases or not neighbours:
        raise FactError(f"fact {fact.prompt!r} needs paraphrases and neighbourhood prompts for ROME's reach scores")
    if stats is None:
        stats = key_statistics(lm, layers=layers, kinds=("mlp",), tokens=read_hparams("rome", None).params.stats_tokens,
                               progress=False)
    with torch.no_grad():
        (own,), para, neigh = (_prompt_keys(lm, [fact.prompt], layers), _prompt_keys(lm, paraphrases, layers),
                               _prompt_keys(lm, neighbours, layers))
        special = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
        ids = lm.tokenizer(fact.prompt, add_special_tokens=True)["input_ids"]
        pos = _key_index(lm, fact, key_position)
        pos -= sum(1 for t in ids[:pos] if t in special)
        para_pos = [_subject_last(lm, fact.subject, p) for p in paraphrases]
        reach, leak = [], []
        for l in layers:
            groups = [keys[l] for keys in para + neigh]
            ratios = reach_ratio(stats.get("mlp", l).to(lm.device), own[l][pos], torch.cat(groups))
            split = list(torch.split(ratios, [len(g) for g in groups]))  # one C⁻¹k* solve per layer
            values = [float(r[p]) if p is not None else float(r.max()) for r, p in zip(split, para_pos)]
            reach.append(sum(values) / len(values))
            leak.append(sum(float(r.abs().max()) for r in split[len(para):]) / len(neigh))
    return LayerScores(layers, {"paraphrase": tuple(reach), "neighbour": tuple(-x for x in leak),
                                "margin": tuple(a - b for a, b in zip(reach, leak))})


def restrict_to_band(scores: Sequence[float], layers: Sequence[int], band: tuple[int, int]) -> list[float]:
    """`scores` kept for layers in `band` (inclusive); every layer outside ranks below every layer inside, nearer
    ones higher. None counts as the lowest in-band score."""
    first, last = band
    inside = [s for s, l in zip(scores, layers) if first <= l <= last and s is not None]
    floor = min(inside) if inside else 0.0
    out = []
    for s, l in zip(scores, layers):
        if first <= l <= last:
            out.append(floor if s is None else float(s))
        else:
            out.append(floor - 1.0 - (first - l if l < first else l - last))
    return out

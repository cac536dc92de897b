"""Attention heads: subject->attribute mappings in their parameters (head projection, paper §6 with Dar et al.'s
embedding-space reading), and per-head evidence of extraction at the last position (head effects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from locedit.core.engine import BlockAttention, Capture, SetHeads, run
from locedit.core.facts import EncodedFact, Fact
from locedit.core.head import Head
from locedit.core.lm import LM, Projection
from locedit.localization.common import FlowResult, Target, as_encoded, fact_summary, rank_of, resolve_target


def head_ov(lm: LM, layer: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """W_V (heads, head_dim, d), b_V (heads, head_dim) or None, W_O (heads, d, head_dim) of one layer."""
    from locedit.core.lm import materialized

    w_v, b_v, w_o = [], [], []
    with materialized(lm.layers[layer]):  # offloaded (device_map) weights are loaded for the read
        for h in range(lm.num_heads):
            wv, bv = lm.adapter.head_value_weight(lm.model, layer, h)
            w_v.append(wv)
            b_v.append(bv)
            w_o.append(lm.adapter.head_output_weight(lm.model, layer, h))
        bias = torch.stack(b_v) if b_v[0] is not None else None
        return torch.stack(w_v), bias, torch.stack(w_o)


def _head_ov_cached(lm: LM, layer: int, cache: dict | None):
    if cache is None:
        return head_ov(lm, layer)
    if layer not in cache:
        cache[layer] = head_ov(lm, layer)
    return cache[layer]


def ov_apply(lm: LM, layer: int, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
    """Every head's OV circuit applied to input vectors x (m, d): (heads, m, d) = W_O (W_V x + b_V). `cache`: a
    dict remembering each layer's `head_ov` over several calls (one analysis over many facts)."""
    w_v, b_v, w_o = _head_ov_cached(lm, layer, cache)
    v = torch.einsum("hkd,md->hmk", w_v, x.to(w_v.dtype))
    if b_v is not None:
        v = v + b_v[:, None, :]
    return torch.einsum("hdk,hmk->hmd", w_o, v)


@dataclass
class HeadProjectionResult(FlowResult):
    """`rank_subject_tokens[layer][head]`: best (lowest) rank of the target among the projections of the subject's
    token embeddings through the head's OV circuit; `rank_subject_last[layer][head]`: the same for the
    (normalised) subject-last state entering that layer. `top_heads`: heads sorted by the better of the two."""

    target: str
    target_id: int
    base_prob: float
    projection: str
    rank_subject_tokens: list
    rank_subject_last: list
    top_heads: list
    fact: dict = field(default_factory=dict)
    target_source: str = "top1"
    target_text: str = ""
    analysis = "head_projection"

    def summary(self) -> str:
        """The tracked target and the heads whose OV circuit ranks it best."""
        best = ", ".join(f"{Head(h['layer'], h['head'])} (rank {min(h['rank_subject_tokens'], h['rank_subject_last'])})"
                         for h in self.top_heads[:3])
        if not best:
            ranks = np.minimum(np.asarray(self.rank_subject_tokens), np.asarray(self.rank_subject_last))
            layer, head = np.unravel_index(int(np.argmin(ranks)), ranks.shape)
            best = f"{Head(int(layer), int(head))} (rank {int(ranks[layer, head])})"
        return f"{self.target_line()}\nheads mapping the subject to the target: {best}"

    def plot(self, ax=None):
        from locedit.core.plots import heads_table

        return heads_table(self.top_heads[:15], ax=ax)


def head_projection(lm: LM, fact: Fact | EncodedFact, *, projection: Projection | None = None, top: int = 20,
                    top_tokens: int = 10,
                    heads: Sequence[Head | tuple[int, int]] | None = None,
                    target: Target | None = None) -> HeadProjectionResult:
    """Read each head's OV circuit in vocabulary space: where does the target rank when the subject's token
    embeddings (Dar et al.'s E W_VO reading) and the subject-last representation go through the head?

    The subject-last state is taken entering the layer and passed through the layer's pre-attention norm
    (what the head actually reads); token embeddings are read raw, as in the embedding-space analysis.
    `heads` restricts the computation to those (layer, head) pairs; the others get rank = vocabulary size."""
    enc = as_encoded(lm, fact)
    target = target if target is not None else resolve_target(lm, enc)
    with torch.no_grad():
        states = run(lm, enc, capture=Capture(residual=True)).captures
        return _head_projection_of(lm, enc, target, lambda layer: states["residual", layer][0],
                                   projection or lm.default_projection(), top, top_tokens, heads, None)


def head_projection_batch(lm: LM, facts: Sequence[Fact | EncodedFact], *, projection: Projection | None = None,
                          top: int = 20, top_tokens: int = 10,
                          heads: Sequence[Head | tuple[int, int]] | None = None,
                          targets: Sequence[Target] | None = None,
                          fact_heads: Sequence[Sequence[Head | tuple[int, int]] | None] | None = None,
                          clean=None) -> list[HeadProjectionResult]:
    """`head_projection` of several facts: one padded forward captures every fact's states, and each layer's OV
    weights are gathered once for all facts. `fact_heads[k]` overrides `heads` for fact k. `clean`: the facts'
    `CleanRun` when already made (its states are then used)."""
    from locedit.core.engine import run_batch
    from locedit.localization.common import resolve_targets

    encs = [as_encoded(lm, f) for f in facts]
    if not encs:
        return []
    targets = list(targets) if targets is not None else resolve_targets(lm, encs)
    cache: dict = {}
    with torch.no_grad():
        states = (clean.captures if clean is not None
                  else run_batch(lm, encs, capture=Capture(residual=True), padding_side="right").captures)
        return [_head_projection_of(lm, enc, targets[k], lambda layer, k=k: states["residual", layer][k],
                                    projection or lm.default_projection(), top, top_tokens,
                                    fact_heads[k] if fact_heads is not None else heads, cache)
                for k, enc in enumerate(encs)]


head_projection.batched = head_projection_batch


def _head_projection_of(lm: LM, enc, target: Target, state, projection, top: int, top_tokens: int, heads,
                        cache: dict | None) -> HeadProjectionResult:
    """`state(layer)`: the fact's residual stream entering `layer`, (positions, d)."""
    subject_ids = torch.tensor(enc.input_ids[enc.subject_start:enc.subject_end], device=lm.device)
    L, H = lm.num_layers, lm.num_heads
    heads = [Head.parse(h) for h in heads] if heads is not None else None
    rank_tokens = np.full((L, H), lm.vocab_size, dtype=int)
    rank_last = np.full((L, H), lm.vocab_size, dtype=int)
    wanted = {l: sorted(h for ll, h in heads if ll == l) for l, _ in heads} if heads is not None else \
        {l: list(range(H)) for l in range(L)}
    top_tok: dict = {}
    embeddings = lm.adapter.embed_module(lm.model)(subject_ids)
    for layer, layer_heads in sorted(wanted.items()):
        x_last = state(layer)[enc.positions.subject_last]
        norm_path = lm.adapter.pre_attn_norm
        if norm_path:
            x_last = lm.adapter.layer_part(lm.model, layer, norm_path)(x_last)
        outputs = ov_apply(lm, layer, torch.cat([embeddings, x_last[None]]), cache)[layer_heads]  # (h, m+1, d)
        scores = lm.project(outputs, projection).float()
        ranks = rank_of(scores, target.token_id)  # (h, m+1)
        rank_tokens[layer, layer_heads] = ranks[:, :-1].min(-1).values.cpu().numpy()
        rank_last[layer, layer_heads] = ranks[:, -1].cpu().numpy()
        if top:
            for i, h in enumerate(layer_heads):
                top_tok[(layer, h)] = scores[i, -1].topk(top_tokens).indices.tolist()
    order = sorted(((min(rank_tokens[l, h], rank_last[l, h]), l, h) for l in wanted for h in wanted[l]))
    top_heads = [{"layer": l, "head": h, "rank_subject_tokens": int(rank_tokens[l, h]),
                  "rank_subject_last": int(rank_last[l, h]),
                  "top_tokens_subject_last": [lm.token_str(t) for t in top_tok[(l, h)]]}
                 for _, l, h in order[:top]]
    return HeadProjectionResult(target.token, target.token_id, target.base_prob, projection,
                                rank_tokens.tolist(), rank_last.tolist(), top_heads, fact_summary(enc),
                                **target.fields())


@dataclass
class HeadEffectsResult(FlowResult):
    """Per head (layer, head) at the last position:
    `direct_logit`: how much the head's output raises the target's logit directly (the final-residual logit minus
    the logit without that head's contribution, everything else fixed);
    `edge_knockout`: relative change (%) of p(target) when only that head's last->subject edges are blocked;
    `output_knockout`: relative change (%) of p(target) when that head's output at the last position is zeroed."""

    target: str
    target_id: int
    base_prob: float
    direct_logit: list
    edge_knockout: list
    output_knockout: list
    fact: dict = field(default_factory=dict)
    target_source: str = "top1"
    target_text: str = ""
    analysis = "head_effects"

    def summary(self) -> str:
        """The tracked target, the head with the largest direct logit and the one whose knockout hurts most."""
        direct = np.asarray(self.direct_logit, dtype=float)
        drop = np.asarray(self.output_knockout, dtype=float)
        d = Head(*map(int, np.unravel_index(int(np.argmax(direct)), direct.shape)))
        k = Head(*map(int, np.unravel_index(int(np.argmin(drop)), drop.shape)))
        return (f"{self.target_line()}\nlargest direct logit: {d} ({direct[d]:+.2f}); "
                f"largest output-knockout drop: {k} ({drop[k]:+.1f}% p(target))")

    def top_heads(self, count: int = 15) -> list[dict]:
        """The `count` heads with the largest direct logit, each with its three numbers."""
        direct = np.asarray(self.direct_logit, dtype=float)
        order = np.argsort(-direct, axis=None)[:count]
        heads = [Head(*map(int, np.unravel_index(int(i), direct.shape))) for i in order]
        return [{"head": str(h), "direct_logit": float(direct[h]),
                 "output_knockout": self.output_knockout[h.layer][h.head],
                 "edge_knockout": self.edge_knockout[h.layer][h.head]} for h in heads]

    def plot(self, ax=None):
        from locedit.core.plots import heads_table

        return heads_table(self.top_heads(), ax=ax, title=f"Heads by direct logit of {self.target!r}")


def head_effects(lm: LM, fact: Fact | EncodedFact, *,
                 target: Target | None = None) -> HeadEffectsResult:
    """Direct logit attribution and two knockouts for every head, all batched (2 x layers x heads rows).
    The direct logits are computed in float32 whatever the model's dtype (a difference of two large logits)."""
    enc = as_encoded(lm, fact)
    target = target if target is not None else resolve_target(lm, enc)
    with torch.no_grad():
        clean = run(lm, enc, capture=Capture(heads=True, attn=True, residual=True, last_only=True)).captures
        direct = _direct_logits(lm, clean, 0, target.token_id)
        rows = _head_effect_rows(lm, enc)
        probs = run(lm, enc, rows).prob_of(target.token_id).float().cpu().numpy()
    return _head_effects_result(lm, enc, target, direct, probs)


def head_effects_batch(lm: LM, facts: Sequence[Fact | EncodedFact], *,
                       targets: Sequence[Target] | None = None, max_rows: int = 512,
                       clean=None) -> list[HeadEffectsResult]:
    """`head_effects` of several facts: one padded clean forward for all, then every fact's knockout rows packed
    into shared passes (`run_packed`); each result equals the single-fact one. `clean`: the facts' `CleanRun`
    when already made (its captures and clean pass are then used)."""
    from locedit.core.engine import run_batch, run_packed
    from locedit.localization.common import resolve_targets

    encs = [as_encoded(lm, f) for f in facts]
    if not encs:
        return []
    targets = list(targets) if targets is not None else resolve_targets(lm, encs)
    with torch.no_grad():
        caps = (clean.captures.last() if clean is not None else
                run_batch(lm, encs, capture=Capture(heads=True, attn=True, residual=True, last_only=True),
                          padding_side="right").captures)
        ov_cache: dict = {}
        directs = [_direct_logits(lm, caps, k, t.token_id, ov_cache) for k, t in enumerate(targets)]
        plans = [_head_effect_rows(lm, enc) for enc in encs]
        rows = [r for plan in plans for r in plan]
        row_prompt = [k for k, plan in enumerate(plans) for _ in plan]
        ids = torch.tensor([targets[k].token_id for k in row_prompt])
        probs = run_packed(lm, encs, rows, row_prompt=row_prompt, max_rows=max_rows,
                           clean_kv=None if clean is None else clean.kv).prob_of(ids)
        probs = probs.float().cpu().numpy()
    out, start = [], 0
    for enc, target, direct, plan in zip(encs, targets, directs, plans):
        out.append(_head_effects_result(lm, enc, target, direct, probs[start:start + len(plan)]))
        start += len(plan)
    return out


head_effects.batched = head_effects_batch


def _direct_logits(lm: LM, clean, row: int, token_id: int, cache: dict | None = None) -> np.ndarray:
    L = lm.num_layers
    final = clean["residual", L][row].float()
    contributions = torch.stack([head_contributions(lm, layer, clean, row, cache) for layer in range(L)])
    without = final - contributions
    logit = lm.target_logit(final, token_id)
    logits_without = lm.target_logit(without, token_id)
    return (logit - logits_without).cpu().numpy()


def _head_effect_rows(lm: LM, enc: EncodedFact) -> list:
    L, H = lm.num_layers, lm.num_heads
    last, subject = enc.positions.last, enc.positions.subject
    rows = [[BlockAttention([l], [last], subject, heads=[h])] for l in range(L) for h in range(H)]
    rows += [[SetHeads([l], [h], [last])] for l in range(L) for h in range(H)]
    return rows


def _head_effects_result(lm: LM, enc, target: Target, direct: np.ndarray, probs: np.ndarray) -> HeadEffectsResult:
    L, H = lm.num_layers, lm.num_heads
    change = 100 * (probs - target.base_prob) / target.base_prob
    return HeadEffectsResult(target.token, target.token_id, target.base_prob, direct.tolist(),
                             change[: L * H].reshape(L, H).tolist(), change[L * H:].reshape(L, H).tolist(),
                             fact_summary(enc), **target.fields())


def head_contributions(lm: LM, layer: int, clean, row: int = 0, cache: dict | None = None) -> torch.Tensor:
    """(heads, d): what each head adds to the residual stream at the last position. With a post-attention norm
    (Gemma-2/3, OLMo-2), a head's share is norm(total) - norm(total without the head)."""
    z = clean["heads", layer][row].float()  # (H, head_dim)
    w_o = _head_ov_cached(lm, layer, cache)[2].float()
    per_head = torch.einsum("hdk,hk->hd", w_o, z)  # float32: the difference below must not lose the small heads
    if not lm.adapter.post_norms:
        return per_head
    from locedit.core.lm import materialized

    with materialized(lm.layers[layer]):
        bias = lm.adapter.attn_output_bias(lm.model, layer)
        total = per_head.sum(0) + (bias.float() if bias is not None else 0)
        norm = lm.adapter.layer_part(lm.model, layer, lm.adapter.attn_out)
        return lm.apply_norm(norm, total[None]) - lm.apply_norm(norm, total[None] - per_head)

"""Attention heads: subject->attribute mappings in their parameters (head projection, paper §6 with Dar et al.'s
embedding-space reading), and per-head evidence of extraction at the last position (head effects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..engine import BlockAttention, Capture, SetHeads, run
from ..facts import EncodedFact, Fact
from ..lm import LM, Projection
from .common import FlowResult, Target, as_encoded, fact_summary, rank_of, resolve_target


def head_ov(lm: LM, layer: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """W_V (heads, head_dim, d), b_V (heads, head_dim) or None, W_O (heads, d, head_dim) of one layer."""
    w_v, b_v, w_o = [], [], []
    for h in range(lm.num_heads):
        wv, bv = lm.adapter.head_value_weight(lm.model, layer, h)
        w_v.append(wv)
        b_v.append(bv)
        w_o.append(lm.adapter.head_output_weight(lm.model, layer, h))
    bias = torch.stack(b_v) if b_v[0] is not None else None
    return torch.stack(w_v), bias, torch.stack(w_o)


def ov_apply(lm: LM, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Every head's OV circuit applied to input vectors x (m, d): (heads, m, d) = W_O (W_V x + b_V)."""
    w_v, b_v, w_o = head_ov(lm, layer)
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
    analysis = "head_projection"

    def plot(self, ax=None):
        from ..plots import heads_table

        return heads_table(self.top_heads[:15], ax=ax)


def head_projection(lm: LM, fact: Fact | EncodedFact, *, projection: Projection | None = None,
                    use_fact_target: bool = False, top: int = 20, top_tokens: int = 10,
                    heads: Sequence[tuple[int, int]] | None = None,
                    target: Target | None = None) -> HeadProjectionResult:
    """Read each head's OV circuit in vocabulary space: where does the target rank when the subject's token
    embeddings (Dar et al.'s E W_VO reading) and the subject-last representation go through the head?

    The subject-last state is taken entering the layer and passed through the layer's pre-attention norm
    (what the head actually reads); token embeddings are read raw, as in the embedding-space analysis.
    `heads` restricts the computation to those (layer, head) pairs; the others get rank = vocabulary size."""
    enc = as_encoded(lm, fact)
    target = target if target is not None else resolve_target(lm, enc, use_fact_target)
    projection = projection or lm.default_projection()
    subject_ids = torch.tensor(enc.input_ids[enc.subject_start:enc.subject_end], device=lm.device)
    L, H = lm.num_layers, lm.num_heads
    rank_tokens = np.full((L, H), lm.vocab_size, dtype=int)
    rank_last = np.full((L, H), lm.vocab_size, dtype=int)
    wanted = {l: sorted(h for ll, h in heads if ll == l) for l, _ in heads} if heads is not None else \
        {l: list(range(H)) for l in range(L)}
    top_tok: dict = {}
    with torch.no_grad():
        states = run(lm, enc, capture=Capture(residual=True)).captures
        embeddings = lm.adapter.embed_module(lm.model)(subject_ids)
        for layer, layer_heads in sorted(wanted.items()):
            x_last = states["residual", layer][0, enc.positions.subject_last]
            norm_path = lm.adapter.pre_attn_norm
            if norm_path:
                x_last = lm.adapter.layer_part(lm.model, layer, norm_path)(x_last)
            outputs = ov_apply(lm, layer, torch.cat([embeddings, x_last[None]]))[layer_heads]  # (h, m+1, d)
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
                                rank_tokens.tolist(), rank_last.tolist(), top_heads, fact_summary(enc))


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
    analysis = "head_effects"


def head_effects(lm: LM, fact: Fact | EncodedFact, *, use_fact_target: bool = False,
                 target: Target | None = None) -> HeadEffectsResult:
    """Direct logit attribution and two knockouts for every head, all batched (2 x layers x heads rows).
    The direct logits are computed in float32 whatever the model's dtype (a difference of two large logits)."""
    enc = as_encoded(lm, fact)
    target = target if target is not None else resolve_target(lm, enc, use_fact_target)
    L, H = lm.num_layers, lm.num_heads
    last, subject = enc.positions.last, enc.positions.subject
    with torch.no_grad():
        clean = run(lm, enc, capture=Capture(heads=True, attn=True, residual=True, last_only=True)).captures
        final = clean["residual", L][0].float()
        contributions = torch.stack([_head_contributions(lm, layer, clean) for layer in range(L)])  # (L, H, d)
        without = final - contributions
        logit = lm.target_logit(final, target.token_id)
        logits_without = lm.target_logit(without, target.token_id)
        direct = (logit - logits_without).cpu().numpy()
        rows = [[BlockAttention([l], [last], subject, heads=[h])] for l in range(L) for h in range(H)]
        rows += [[SetHeads([l], [h], [last])] for l in range(L) for h in range(H)]
        probs = run(lm, enc, rows).prob_of(target.token_id).float().cpu().numpy()
    change = 100 * (probs - target.base_prob) / target.base_prob
    return HeadEffectsResult(target.token, target.token_id, target.base_prob, direct.tolist(),
                             change[: L * H].reshape(L, H).tolist(), change[L * H:].reshape(L, H).tolist(),
                             fact_summary(enc))


def _head_contributions(lm: LM, layer: int, clean) -> torch.Tensor:
    """(heads, d): what each head adds to the residual stream at the last position. With a post-attention norm
    (Gemma-2/3, OLMo-2), a head's share is norm(total) - norm(total without the head)."""
    z = clean["heads", layer][0].float()  # (H, head_dim)
    w_o = head_ov(lm, layer)[2].float()
    per_head = torch.einsum("hdk,hk->hd", w_o, z)  # float32: the difference below must not lose the small heads
    if not lm.adapter.post_norms:
        return per_head
    bias = lm.adapter.attn_output_bias(lm.model, layer)
    total = per_head.sum(0) + (bias.float() if bias is not None else 0)
    norm = lm.adapter.layer_part(lm.model, layer, lm.adapter.attn_out)
    return lm.apply_norm(norm, total[None]) - lm.apply_norm(norm, total[None] - per_head)

"""Optimising target values: ROME's v* (compute_v), MEMIT's z (compute_z) and the head variant share one loop.

A vector δ is added to the output of a module (the MLP output projection, a decoder layer, the attention output
projection, or the value columns of the value projection) at each prompt's key position. δ is optimised with Adam
so the edited model predicts the new target after every context-templated rewrite prompt:

    L(δ) = mean_prompts NLL(new target tokens)  +  kl_factor · KL(P_δ ‖ P_0) at the key position of "{subject} is a"
           +  v_weight_decay · ‖δ‖ / ‖v_init‖²

with ‖δ‖ clamped to `clamp_norm_factor · ‖v_init‖` after each step and an early stop when L < `early_stop_loss`
(ROME's code; the paper's Eq. 4 has only the first two terms). The same forward also records the key (the module's
input at the key position) of every rewrite prompt, so the template-averaged key k* costs nothing extra.

Everything that touches the model goes through the engine: δ is an `AddToSublayer` value, the states are a
`Capture` of the first step, and the columns before the key run once (`prefixed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from locedit.errors import FactError, LoceditError
from locedit.core.facts import Fact, encode_fact

KEY_POSITIONS = ("subject_last", "carrier", "last")


@dataclass
class PromptBatch:
    """The rewrite prompts (each ending with the new target minus its last token) and the KL prompt, left-padded so
    that every row's key position falls on the same column `prefix`. Columns before it do not depend on δ, so
    they run once (keys and values cached) and each optimisation step recomputes only columns [prefix, width).
    Target positions are in padded coordinates."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prefix: int  # the common key column
    target_positions: list[list[int]]  # per rewrite row: positions whose logits predict the target tokens
    target_ids: list[int]
    n_rewrite: int
    prompts: list[str] = field(default_factory=list)
    row_target_ids: list[list[int]] | None = None  # merged batches: each row's target ids (empty for KL rows)

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def key_positions(self) -> torch.Tensor:
        return torch.full((self.rows,), self.prefix, dtype=torch.long, device=self.input_ids.device)


@dataclass
class Site:
    """Where δ is added: the output of projection `kind` of `layer` (an engine `Projection`: "mlp_down",
    "attn_o", "qkv" or "layer"), its columns `columns` (all if None). The key recorded is that module's input
    (`key_columns` of it) — or nothing when `record_key` is False."""

    kind: str
    layer: int
    columns: slice | None = None
    key_columns: slice | None = None
    record_key: bool = True
    # maps the module's input rows at the key positions (rows, in) to the reference value whose norm scales the
    # weight decay and the clamp (default: the module's output columns there); head edits use the head's own
    # contribution W_O,h z_h rather than the whole attention output
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None


# the engine capture holding each projection's input
_INPUT_CAPTURE = {"mlp_down": "mlp_keys", "attn_o": "heads", "qkv": "attn_in", "layer": "residual"}


@dataclass
class ValueResult:
    deltas: list[torch.Tensor]  # per site, float32
    inits: list[torch.Tensor]  # per site: the module output (columns) at the key position of the bare prompt
    keys: list[torch.Tensor | None]  # per site: template-averaged key (float32) or None
    outputs: list[torch.Tensor]  # per site: template-averaged module output at the key position (before δ)
    losses: list[float]
    seconds: float = 0.0


def target_token_ids(tokenizer, prompt: str, target_text: str) -> list[int]:
    """Token ids of `target_text` as it continues `prompt` (joint tokenisation where it splits cleanly)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    joint = tokenizer(prompt + target_text, add_special_tokens=True)["input_ids"]
    if len(joint) > len(prompt_ids) and list(joint[:len(prompt_ids)]) == list(prompt_ids):
        return [int(i) for i in joint[len(prompt_ids):]]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    alone = [int(i) for i in tokenizer(target_text, add_special_tokens=False)["input_ids"] if i not in special]
    if not alone:
        raise FactError(f"target {target_text!r} tokenizes to nothing")
    return alone


def key_position(enc, rule: str, carrier_offset: int | None = None) -> int:
    """The key position of an encoded prompt: the subject's last token, the carrier token (its offset inside the
    subject span, clipped to the span) or the last token."""
    if rule == "subject_last":
        return enc.subject_end - 1
    if rule == "last":
        return len(enc.input_ids) - 1
    if rule == "carrier":
        offset = 0 if carrier_offset is None else carrier_offset
        return min(enc.subject_start + max(offset, 0), enc.subject_end - 1)
    raise LoceditError(f"unknown key position {rule!r}; use one of {KEY_POSITIONS}")


TEMPLATE_TOKENS = ("text", "prompt")


def templated_prompts(lm, fact: Fact, templates: Sequence[str], rule: str, carrier_offset: int | None,
                      template_tokens: str = "text") -> tuple[list[list[int]], list[int], list[str]]:
    """Token ids of `template.format(prompt)` for each template, with each one's key position.

    `template_tokens="text"` tokenizes the whole templated text (ROME's way: a prompt that starts with its subject
    and a tokenizer without BOS give the subject a leading-space token in every template but the bare one);
    `"prompt"` writes each template's prefix, a newline, then the bare prompt's own tokens, so the key's token
    (and every token after the prefix) is the same in every template."""
    if template_tokens not in TEMPLATE_TOKENS:
        raise LoceditError(f"template_tokens must be one of {TEMPLATE_TOKENS}, not {template_tokens!r}")
    if template_tokens == "prompt":
        return _prompt_token_templates(lm, fact, templates, rule, carrier_offset)
    rows, keys, texts = [], [], []
    for template in templates:
        text = template.format(fact.prompt) if "{}" in template else template + fact.prompt
        enc = _encode_in_context(lm.tokenizer, fact.subject, text,
                                 len(text) - len(fact.prompt) + fact.prompt.index(fact.subject))
        rows.append(list(enc.input_ids))
        keys.append(key_position(enc, rule, carrier_offset))
        texts.append(text)
    return rows, keys, texts


def _prompt_token_templates(lm, fact: Fact, templates: Sequence[str], rule: str,
                            carrier_offset: int | None) -> tuple[list[list[int]], list[int], list[str]]:
    """`templated_prompts` with `template_tokens="prompt"`: prefix tokens + the bare prompt's tokens."""
    tok = lm.tokenizer
    enc = encode_fact(tok, fact)
    special = set(getattr(tok, "all_special_ids", []) or [])
    lead = 0
    while lead < len(enc.input_ids) and enc.input_ids[lead] in special:
        lead += 1  # BOS: the templated prompt has the prefix's own
    own = list(enc.input_ids[lead:])
    key = key_position(enc, rule, carrier_offset) - lead
    rows, keys, texts = [], [], []
    for template in templates:
        prefix = template.split("{}")[0] if "{}" in template else template
        if not prefix.strip():
            rows.append(list(enc.input_ids))
            keys.append(key + lead)
            texts.append(fact.prompt)
            continue
        head = prefix.rstrip() + "\n"
        ids = list(tok(head, add_special_tokens=True)["input_ids"])
        rows.append(ids + own)
        keys.append(len(ids) + key)
        texts.append(head + fact.prompt)
    return rows, keys, texts


def pad_rows(lm, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask on the model's device."""
    tok = lm.tokenizer
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return input_ids.to(lm.device), mask.to(lm.device)


def left_padded(lm, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and position ids (from the mask) on the model's device: every row ends at
    the last column, where generation appends and where a target's tokens are read."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def build_batch(lm, fact: Fact, new_target_text: str, templates: Sequence[str], rule: str,
                carrier_offset: int | None, kl_prompt: str | None, template_tokens: str = "text") -> PromptBatch:
    """Rewrite prompts `template.format(prompt) + target[:-1]` and the KL prompt, tokenised (`templated_prompts`),
    with their key positions aligned on one column by left padding."""
    target_ids = target_token_ids(lm.tokenizer, fact.prompt, new_target_text)
    prompt_rows, keys, prompts = templated_prompts(lm, fact, templates, rule, carrier_offset, template_tokens)
    rows = [ids + target_ids[:-1] for ids in prompt_rows]
    ends = [len(ids) for ids in prompt_rows]
    if kl_prompt:
        text = kl_prompt.format(fact.subject)
        enc = _encode_in_context(lm.tokenizer, fact.subject, text, text.index(fact.subject))
        rows.append(list(enc.input_ids))
        keys.append(key_position(enc, rule, carrier_offset))
        prompts.append(text)
    prefix = max(keys)
    width = prefix + max(len(r) - k for r, k in zip(rows, keys))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    shifts = []
    for i, (r, k) in enumerate(zip(rows, keys)):
        shift = prefix - k
        input_ids[i, shift:shift + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, shift:shift + len(r)] = 1
        shifts.append(shift)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    target_positions = [[shifts[i] + ends[i] - 1 + j for j in range(len(target_ids))]
                        for i in range(len(templates))]
    return PromptBatch(input_ids.to(lm.device), mask.to(lm.device), position_ids.to(lm.device), prefix,
                       target_positions, target_ids, len(templates), prompts)


def _encode_in_context(tokenizer, subject: str, text: str, char_start: int):
    """Encode `text` with the subject span at `char_start` (not necessarily its first occurrence)."""
    fact = Fact(subject, text)
    if text.index(subject) == char_start:
        return encode_fact(tokenizer, fact)
    # the prefix happens to contain the subject: encode the part from the subject's real occurrence on as if
    # it were first, by masking earlier occurrences with a same-length placeholder for span finding only
    masked = text[:char_start].replace(subject, "\x00" * len(subject)) + text[char_start:]
    enc = encode_fact(tokenizer, Fact(subject, masked))
    real = tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(real) != len(enc.input_ids):
        raise FactError(f"could not locate subject {subject!r} in context {text!r}")
    return type(enc)(fact, tuple(real), tuple(tokenizer.decode([i]) for i in real), enc.subject_start,
                     enc.subject_end, None)


def optimize_values(lm, batch: PromptBatch, sites: Sequence[Site], hp) -> ValueResult:
    """Optimise one δ per site (jointly) for one fact, as described in the module docstring."""
    return optimize_values_many(lm, [batch], sites, hp)[0]


def optimize_values_many(lm, batches: Sequence[PromptBatch], sites: Sequence[Site], hp) -> list[ValueResult]:
    """Optimise the δs of several facts in one batched forward per step (one `ValueResult` per fact).

    Each fact's loss depends only on its own δ, and Adam, the clamp and the early stop act per fact (a fact whose
    loss falls under `early_stop_loss` stops moving), so the result equals optimising the facts one by one — in a
    fraction of the launches on a GPU. Columns before the common key column run once (their keys and values are
    cached, since δ cannot reach them); each step recomputes only the later columns, and the vocabulary
    projection only where a loss term reads it."""
    import time

    from locedit.core.engine import AddToSublayer, Capture, prefixed

    start = time.perf_counter()
    merged, row_fact, target_index_cols = _merge(lm, batches)
    F = len(batches)
    P = merged.prefix
    n_rows = merged.rows
    rewrite = [[r for r in range(n_rows) if row_fact[r] == f and target_index_cols[r]] for f in range(F)]
    kl_rows = [[r for r in range(n_rows) if row_fact[r] == f and not target_index_cols[r]] for f in range(F)]
    inits: list[list] = [[None] * len(sites) for _ in range(F)]
    outputs: list[list] = [[None] * len(sites) for _ in range(F)]
    keys: list[list] = [[None] * len(sites) for _ in range(F)]
    # one δ per fact and site, added at each row's key column (column P of the padded batch: the columns before
    # it run once, their keys and values cached, since δ cannot reach them)
    deltas = [[torch.zeros(_width(lm, site), dtype=torch.float32, device=_device(lm, site), requires_grad=True)
               for site in sites] for _ in range(F)]
    batch = prefixed(lm, merged.input_ids, merged.attention_mask, P, merged.position_ids)
    key_pos = [P - left for left in batch.pad_left]  # each row's own index of its key column

    # built once: Adam updates the δs in place, and each run reads their current values
    rows = [[AddToSublayer(site.kind, site.layer, [key_pos[r]], deltas[row_fact[r]][i],
                           None if site.columns is None else (site.columns.start, site.columns.stop))
             for i, site in enumerate(sites)] for r in range(n_rows)]

    capture = Capture(**{_INPUT_CAPTURE[s.kind]: True for s in sites if s.record_key or s.reference is not None},
                      outputs=tuple(sorted({s.kind for s in sites})), layers=sorted({s.layer for s in sites}))
    wanted = sorted({c - P for cols in target_index_cols for c in cols} | {0})
    column = {c: i for i, c in enumerate(wanted)}

    def record(captures) -> None:
        """The step-0 states at the key column: keys, reference/initial values, template-averaged outputs."""
        for i, site in enumerate(sites):
            cols = site.columns or slice(None)
            here = captures[site.kind, site.layer][:, 0][:, cols].detach().float()
            x = None
            if site.record_key or site.reference is not None:
                x = captures[_INPUT_CAPTURE[site.kind], site.layer][:, 0].detach()
                x = x.reshape(x.shape[0], -1)  # heads: (rows, H, hd) -> the projection's input (rows, H·hd)
            ref = site.reference(x).float() if site.reference is not None else None
            for f in range(F):
                inits[f][i] = (ref if ref is not None else here)[rewrite[f][0]].clone()
                outputs[f][i] = here[rewrite[f]].mean(0)
                if site.record_key:
                    xf = x[rewrite[f]]
                    keys[f][i] = (xf if site.key_columns is None else xf[:, site.key_columns]).float().mean(0)

    # every loss term read in one gather per step (a Python loop of per-row selects made each row's backward
    # zero-fill a whole (rows x columns x vocabulary) gradient): one entry per rewrite target token, weighted so
    # that a fact's sum is the mean over its rows of each row's mean target-token NLL; one per KL row
    entries = [(r, column[c - P], t, f) for f in range(F) for r in rewrite[f]
               for c, t in zip(target_index_cols[r], merged.row_target_ids[r])]
    weights = [1.0 / (len(target_index_cols[r]) * len(rewrite[f])) for f in range(F) for r in rewrite[f]
               for _ in target_index_cols[r]]
    entry_row, entry_col, entry_token, entry_fact = (torch.tensor(v, device=lm.device) for v in zip(*entries))
    entry_weight = torch.tensor(weights, device=lm.device)
    kl_all = [r for f in range(F) for r in kl_rows[f]]
    kl_row = torch.tensor(kl_all, dtype=torch.long, device=lm.device)
    kl_fact = torch.tensor([f for f in range(F) for _ in kl_rows[f]], dtype=torch.long, device=lm.device)
    kl_count = torch.tensor([max(len(rows_f), 1) for rows_f in kl_rows], dtype=torch.float32, device=lm.device)
    losses: list[list[float]] = [[] for _ in range(F)]
    optimizer = torch.optim.Adam([d for per_fact in deltas for d in per_fact], lr=hp.v_lr)
    active = [True] * F
    kl_init = None
    with batch:  # the engine's hooks stay attached for the whole loop
        for step in range(hp.v_num_grad_steps):
            out = batch.run(rows, capture=capture if step == 0 else None, logits_at=wanted)
            if step == 0:
                record(out.captures)
            fact_loss = _fact_losses(out.logits, entry_row, entry_col, entry_token, entry_fact, entry_weight, F)
            if kl_all:
                kl_lp = torch.log_softmax(out.logits[kl_row, column[0]].float(), dim=-1)
                if kl_init is None:
                    kl_init = kl_lp.detach().clone()
                # KL(current || step 0) per row (torch's kl_div(init, current, log_target=True)), averaged per fact
                kl_per_row = (kl_lp.exp() * (kl_lp - kl_init)).sum(-1)
                kl = torch.zeros(F, dtype=kl_per_row.dtype, device=kl_per_row.device).index_add(0, kl_fact, kl_per_row)
                fact_loss = fact_loss + hp.kl_factor * kl / kl_count
            decays = torch.stack([
                sum(hp.v_weight_decay * (delta.norm() / init.norm().clamp(min=1e-8) ** 2).to(fact_loss.device)
                    for delta, init in zip(deltas[f], inits[f])) for f in range(F)])
            fact_loss = fact_loss + decays
            values = fact_loss.detach().tolist()
            total = 0.0
            last = step == hp.v_num_grad_steps - 1
            for f in range(F):
                if not active[f]:
                    continue
                value = values[f]
                if value != value or value in (float("inf"), float("-inf")):
                    raise LoceditError(f"the value optimisation diverged (loss {value}) at step {step}; nothing "
                                       "was changed — try a smaller v_lr")
                losses[f].append(value)
                if value < hp.early_stop_loss or last:
                    active[f] = False  # this fact's δ is final
                else:
                    total = total + fact_loss[f]
            if not any(active):
                break
            optimizer.zero_grad()
            total.backward()
            for f in range(F):
                if not active[f]:
                    for d in deltas[f]:
                        d.grad = None  # Adam leaves parameters without a gradient alone
            optimizer.step()
            with torch.no_grad():
                for f in range(F):
                    for delta, init in zip(deltas[f], inits[f]):
                        limit = hp.clamp_norm_factor * init.norm()
                        if delta.norm() > limit:
                            delta.mul_(limit / delta.norm())
    seconds = (time.perf_counter() - start) / F
    return [ValueResult([d.detach() for d in deltas[f]], list(inits[f]), list(keys[f]), list(outputs[f]),
                        losses[f], seconds) for f in range(F)]


def _fact_losses(logits: torch.Tensor, row: torch.Tensor, col: torch.Tensor, token: torch.Tensor,
                 fact: torch.Tensor, weight: torch.Tensor, n_facts: int) -> torch.Tensor:
    """Each fact's weighted target-token NLL, from the logits at the (row, column) of every entry."""
    picked = logits[row, col].float()  # (entries, vocabulary): only the positions a loss reads
    log_prob = picked.gather(1, token[:, None]).squeeze(1) - torch.logsumexp(picked, dim=-1)
    return torch.zeros(n_facts, dtype=log_prob.dtype, device=log_prob.device).index_add(0, fact, -log_prob * weight)


def site_module(lm, site: Site) -> nn.Module:
    """The module whose output a site changes."""
    if site.kind == "layer":
        return lm.layers[site.layer]
    return lm.adapter.layer_part(lm.model, site.layer, getattr(lm.adapter, site.kind))


def _device(lm, site: Site) -> torch.device:
    return next(site_module(lm, site).parameters()).device


def _width(lm, site: Site) -> int:
    if site.columns is not None:
        return len(range(site.columns.start, site.columns.stop))
    if site.kind == "layer":
        return lm.d_model
    weight = site_module(lm, site).weight
    return int(weight.shape[1] if lm.adapter.conv1d else weight.shape[0])


def _merge(lm, batches: Sequence[PromptBatch]) -> tuple[PromptBatch, list[int], list[list[int]]]:
    """One batch from several facts' batches, every key on one column. Returns the batch, each row's fact index
    and each row's target positions (empty for KL rows)."""
    P = max(b.prefix for b in batches)
    width = P + max(b.input_ids.shape[1] - b.prefix for b in batches)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids, masks, row_fact, targets, row_target_ids = [], [], [], [], []
    for f, b in enumerate(batches):
        shift = P - b.prefix
        right = width - shift - b.input_ids.shape[1]
        ids.append(torch.nn.functional.pad(b.input_ids, (shift, right), value=pad))
        masks.append(torch.nn.functional.pad(b.attention_mask, (shift, right), value=0))
        for r in range(b.rows):
            row_fact.append(f)
            rewrite = r < b.n_rewrite
            targets.append([c + shift for c in b.target_positions[r]] if rewrite else [])
            row_target_ids.append(list(b.target_ids) if rewrite else [])
    input_ids, mask = torch.cat(ids), torch.cat(masks)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    merged = PromptBatch(input_ids, mask, position_ids, P, targets, [], sum(b.n_rewrite for b in batches),
                         row_target_ids=row_target_ids)
    return merged, row_fact, targets

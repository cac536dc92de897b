"""Running a batch of interventions: `run` (one prompt, many intervention rows, with prefix reuse),
`run_packed` (several prompts, many rows each, packed into the same passes, with prefix reuse), `run_batch` (one
row per prompt, padded) and `intervene` (a context manager around the caller's own forwards)."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from locedit.errors import FactError, InterventionError
from locedit.core.facts import EncodedFact, Fact
from locedit.core.engine.hooks import Layout, Pass, attached, needs_projections
from locedit.core.engine.interventions import (
    AddEmbeddingNoise,
    AddToSublayer,
    Capture,
    Intervention,
    SetHeads,
    first_layer,
    written_positions,
)

Rows = Sequence[Sequence[Intervention]]


@dataclass
class Captures:
    """Recorded states. `captures[site, layer]` is (rows, positions, ...) — or (rows, ...) with `last_only` —
    in the coordinates of each row's prompt for `run`, and of the padded batch for `run_batch` (see `row`)."""

    data: dict = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    pad_left: list[int] = field(default_factory=list)
    last_only: bool = False

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        if key not in self.data:
            raise KeyError(f"{key} was not captured; ask for it with Capture({key[0]}=True, layers=...)")
        return self.data[key]

    def __contains__(self, key) -> bool:
        return key in self.data

    def stack(self, site: str, layers: Sequence[int]) -> torch.Tensor:
        """(layers, rows, ...) for one site."""
        return torch.stack([self[site, layer] for layer in layers])

    def last(self) -> "Captures":
        """The same captures at each row's last position only (as `Capture(last_only=True)` records them)."""
        if self.last_only:
            return self
        rows = torch.arange(len(self.lengths))
        last = torch.tensor([p + n - 1 for p, n in zip(self.pad_left, self.lengths)])
        data = {}
        for key, value in self.data.items():
            r, i = rows.to(value.device), last.to(value.device)
            data[key] = value[r, :, i] if key[0] == "attn_weights" else value[r, i]
        return Captures(data, list(self.lengths), list(self.pad_left), True)

    def row(self, site: str, layer: int, row: int) -> torch.Tensor:
        """One row's capture with padding removed: (its positions, ...)."""
        value = self[site, layer][row]
        if self.last_only:
            return value
        start, n = self.pad_left[row], self.lengths[row]
        if site == "attn_weights":
            return value[:, start:start + n, start:start + n]
        return value[start:start + n]


@dataclass
class RunResult:
    """`logits`: (rows, vocab) at each row's last position. `captures`: what `Capture` asked for."""

    logits: torch.Tensor
    captures: Captures

    def probs(self) -> torch.Tensor:
        return self.logits.float().softmax(-1)

    def prob_of(self, token_id: int | torch.Tensor) -> torch.Tensor:
        probs = self.probs()
        if isinstance(token_id, torch.Tensor) and token_id.dim() == 1:
            return probs.gather(1, token_id.view(-1, 1).to(probs.device)).squeeze(1)
        return probs[:, int(token_id)]


def _token_ids(lm, prompt) -> list[int]:
    if isinstance(prompt, EncodedFact):
        return list(prompt.input_ids)
    if isinstance(prompt, Fact):
        return list(lm.encode(prompt).input_ids)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise FactError("empty prompt")
        ids = lm.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return list(ids)
    ids = [int(i) for i in prompt]
    if not ids:
        raise FactError("empty prompt: no token ids")
    return ids


def forward(lm, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, cache=None, use_cache: bool = False,
            logits_at: int | torch.Tensor | None = None):
    """One forward of `lm.model`, the same whatever the model's signature: `cache` goes to its `cache` or
    `past_key_values` argument; `logits_at` keeps only the logits of the last N positions (an int) or of the
    given column indices (a 1-D tensor) — through `logits_to_keep` where the model takes it (then only those are
    projected to the vocabulary), by slicing otherwise. Returns the model's output."""
    kwargs = dict(input_ids=input_ids.to(lm.device), use_cache=use_cache)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids.to(lm.device)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(lm.device)
    params = _forward_params(lm.model)
    if cache is not None:
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
    keep = logits_at.to(lm.device) if isinstance(logits_at, torch.Tensor) else logits_at
    if keep is not None and "logits_to_keep" in params:
        return lm.model(**kwargs, logits_to_keep=keep)
    out = lm.model(**kwargs)
    if keep is not None:
        out.logits = out.logits[:, -keep:] if isinstance(keep, int) else out.logits[:, keep]
    return out


def forward_accepts(lm, argument: str) -> bool:
    """Whether `lm.model.forward` takes the keyword `argument` (e.g. "logits_to_keep")."""
    return argument in _forward_params(lm.model)


def output_cache(output):
    """The key/value cache a forward with `use_cache=True` returned (`cache` or `past_key_values`)."""
    return getattr(output, "cache", None) if getattr(output, "cache", None) is not None else output.past_key_values


def _forward(lm, input_ids: torch.Tensor, *, position_ids, attention_mask=None, cache=None, use_cache=False,
             last_only_logits=True, logits_to_keep: torch.Tensor | None = None):
    if last_only_logits and forward_accepts(lm, "logits_to_keep"):
        keep = 1
    elif logits_to_keep is not None and forward_accepts(lm, "logits_to_keep"):
        keep = logits_to_keep
    else:
        keep = None
    return forward(lm, input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                   use_cache=use_cache, logits_at=keep)


_PARAMS: dict[type, set] = {}


def _forward_params(model) -> set:
    if type(model) not in _PARAMS:
        _PARAMS[type(model)] = set(inspect.signature(model.forward).parameters)
    return _PARAMS[type(model)]




def run(lm, prompt, rows: Rows | None = None, *, capture: Capture | None = None,
        shared: Sequence[Intervention] = (), bases: Rows | None = None, row_base: Sequence[int] | None = None,
        reuse_prefix: bool = True, max_rows: int = 512) -> RunResult:
    """Run one prompt under many interventions in one batched forward: row i applies `rows[i]`.

    `shared` interventions apply to every row (e.g. the corruption of causal tracing). More generally, `bases`
    lists several shared sets and `row_base[i]` picks row i's; bases are computed once each.

    Prefix reuse (`reuse_prefix=True`): by causality, nothing before the first position a row writes at depends
    on its interventions, and nothing below the first layer it touches either. The engine runs each base once
    over the whole prompt (keeping its keys and values), then groups the rows into passes (`plan_chunks`) that
    recompute only positions [p0, n): below the pass's first layer once per base, from there on once per row.
    The result equals the full recompute (tested to 1e-5). `max_rows` bounds the rows of one pass (memory).
    """
    ids = _token_ids(lm, prompt)
    n = len(ids)
    rows = [list(r) for r in (rows if rows is not None else [[]])]
    if bases is None:
        bases = [list(shared)]
        row_base = [0] * len(rows)
    else:
        bases = [list(b) for b in bases]
        if row_base is None or len(row_base) != len(rows):
            raise InterventionError("row_base must give one base index per row")
        if shared:
            bases = [list(shared) + b for b in bases]
    if not rows:
        raise InterventionError("no rows to run")
    if any(not 0 <= b < len(bases) for b in row_base):
        raise InterventionError(f"row_base refers to a base that does not exist (there are {len(bases)})")
    n_rows, n_bases = len(rows), len(bases)
    full = [bases[b] + r for b, r in zip(row_base, rows)]
    _validate(lm, full, [n] * n_rows)
    capture = capture or Capture()
    all_ids = torch.tensor([ids], dtype=torch.long)

    projections = needs_projections(full, capture)
    if not reuse_prefix:
        layout = Layout(full, [n] * n_rows, [0] * n_rows, 0, n, lm.num_layers, lm.num_heads, lm.device)
        with attached(lm, projections) as state:
            state.pass_ = p = Pass(upper=layout, capture=capture, engine_mask=True)
            out = _forward(lm, all_ids.expand(n_rows, n), position_ids=torch.arange(n)[None])
        return RunResult(out.logits[:, -1], _assemble_full(p.captured, capture, n_rows, n))

    points = [_reuse_point([r], n, lm.num_layers) for r in rows]
    chunks = plan_chunks(points, n, lm.num_layers, n_bases, max_rows=max_rows)
    logits = [None] * n_rows
    pieces: dict = {}
    with attached(lm, projections) as state:
        # 1. every base once over the whole prompt, keeping its keys and values
        base_layout = Layout(bases, [n] * n_bases, [0] * n_bases, 0, n, lm.num_layers, lm.num_heads, lm.device)
        state.pass_ = base = Pass(upper=base_layout, capture=None if capture.last_only else capture,
                                 engine_mask=True)
        base_out = _forward(lm, all_ids.expand(n_bases, n), position_ids=torch.arange(n)[None], use_cache=True)
        base_cache = output_cache(base_out)
        # 2. each chunk of rows: positions [p0, n) only, per base below its first layer l0, per row from l0 on
        for members, p0, l0 in chunks:
            chunk_rows = [full[i] for i in members]
            expand = torch.tensor([row_base[i] for i in members], dtype=torch.long, device=lm.device)
            upper = Layout(chunk_rows, [n] * len(members), [0] * len(members), p0, n, lm.num_layers,
                           lm.num_heads, lm.device)
            ids_part = all_ids[:, p0:]
            if l0 <= 0:
                chunk_pass = Pass(upper=upper, capture=capture, expand_index=expand, engine_mask=True)
                ids_part = ids_part.expand(len(members), n - p0)
                split = 0
            else:
                lower = Layout(bases, [n] * n_bases, [0] * n_bases, p0, n, lm.num_layers, lm.num_heads, lm.device)
                chunk_pass = Pass(upper=upper, lower=lower, split=l0, expand_index=expand, capture=capture,
                                  engine_mask=True)
                ids_part = ids_part.expand(n_bases, n - p0)
                split = l0
            cache = _split_cache(lm, base_cache, p0, split, expand) if p0 > 0 else None
            state.pass_ = chunk_pass
            out = _forward(lm, ids_part, position_ids=torch.arange(p0, n)[None], cache=cache,
                           use_cache=cache is not None)
            for j, i in enumerate(members):
                logits[i] = out.logits[j, -1]
            _collect(pieces, base.captured, chunk_pass.captured, capture, expand, members, p0, n)
    captures = Captures({key: torch.stack([v[i] for i in range(n_rows)]) for key, v in pieces.items()},
                        [n] * n_rows, [0] * n_rows, capture.last_only)
    return RunResult(torch.stack(logits), captures)


# Cost model of one chunk pass, in row-token-layers: a pass reads every weight once whatever its batch, which on
# CPU costs about as much as computing ~15 row-tokens through the whole network (measured on SmolLM2-135M).
PASS_OVERHEAD_ROW_TOKENS = 15


def plan_chunks(points: list[tuple[int, int]], n: int, num_layers: int, n_bases: int = 1,
                max_rows: int = 512) -> list[tuple[list[int], int, int]]:
    """Group rows into passes: rows sharing a late first position / high first layer share a cheap pass.

    `points[i]` = (first position, first layer) row i writes at. Returns [(row indices, p0, l0)]. A dynamic
    programme over the rows sorted by (p0, l0) minimises the modelled cost (per-pass overhead + the tokens and
    layers each pass recomputes); passes hold at most `max_rows` rows.
    """
    keys = sorted(set(points))
    members = {k: [] for k in keys}
    for i, point in enumerate(points):
        members[point].append(i)
    counts = [len(members[k]) for k in keys]
    overhead = PASS_OVERHEAD_ROW_TOKENS * num_layers

    best = [0.0] + [float("inf")] * len(keys)
    cut = [0] * (len(keys) + 1)
    for j in range(1, len(keys) + 1):
        rows, lowest = 0, num_layers
        for i in range(j - 1, -1, -1):
            rows += counts[i]
            lowest = min(lowest, keys[i][1])
            if rows > max_rows and i < j - 1:
                break
            p0, l0 = keys[i][0], max(0, lowest)
            c = best[i] + overhead + rows * (n - p0) * (num_layers - l0) + n_bases * (n - p0) * l0
            if c < best[j]:
                best[j], cut[j] = c, i
    bounds, j = [], len(keys)
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    chunks = []
    for i, j in reversed(bounds):
        rows = [r for k in keys[i:j] for r in members[k]]
        p0, l0 = keys[i][0], max(0, min(k[1] for k in keys[i:j]))
        for start in range(0, len(rows), max_rows):
            chunks.append((rows[start:start + max_rows], p0, l0))
    return chunks


def _validate(lm, rows: list[list[Intervention]], lengths: list[int]) -> None:
    Layout(rows, lengths, [0] * len(rows), 0, max(lengths), lm.num_layers, lm.num_heads, lm.device).validate()
    for ivs in rows:
        for iv in ivs:
            value = getattr(iv, "noise", None) if isinstance(iv, AddEmbeddingNoise) else getattr(iv, "value", None)
            if value is None:
                continue
            if isinstance(iv, AddToSublayer):
                if iv.columns is None and iv.kind == "qkv":
                    continue  # the fused projections' widths differ; the add itself checks the shape
                width = iv.columns[1] - iv.columns[0] if iv.columns is not None else lm.d_model
            else:
                width = lm.head_dim if isinstance(iv, SetHeads) else lm.d_model
            if value.shape[-1] != width:
                raise InterventionError(f"{type(iv).__name__}: value of width {value.shape[-1]}, expected {width}")


def _reuse_point(rows: list[list[Intervention]], n: int, num_layers: int) -> tuple[int, int]:
    """(first position, first layer) any row writes at; positions before / layers below are shared."""
    positions, layers = [n - 1], [num_layers - 1]
    for ivs in rows:
        for iv in ivs:
            positions += [p if p >= 0 else n + p for p in written_positions(iv)]
        if ivs:
            layers.append(first_layer(ivs))
    return min(positions), min(min(layers), num_layers - 1)


def _split_cache(lm, base_cache, p0: int, split: int, expand: torch.Tensor):
    """The bases' keys/values of positions [0, p0): per base below `split`, per row from `split` on."""
    from transformers import DynamicCache

    data = []
    for layer_idx, layer in enumerate(base_cache.layers):
        keys, values = layer.keys[:, :, :p0], layer.values[:, :, :p0]
        if layer_idx >= split:
            keys = keys.index_select(0, expand.to(keys.device))
            values = values.index_select(0, expand.to(values.device))
        data.append((keys, values))
    return DynamicCache(ddp_cache_data=data, config=lm.model.config)


def _last(site: str, value: torch.Tensor) -> torch.Tensor:
    return value[:, :, -1] if site == "attn_weights" else value[:, -1]


def _assemble_full(captured: dict, capture: Capture, n_rows: int, n: int) -> Captures:
    data = {key: (_last(key[0], v) if capture.last_only else v) for key, v in captured.items()}
    return Captures(data, [n] * n_rows, [0] * n_rows, capture.last_only)


def _collect(pieces: dict, base: dict, chunk: dict, capture: Capture, expand: torch.Tensor, members: list[int],
             p0: int, n: int) -> None:
    """Put one chunk's captures, completed with the bases' prefix [0, p0), into per-row slots of `pieces`."""
    for key, value in chunk.items():
        site = key[0]
        if value.shape[0] != len(members):
            value = value.index_select(0, expand.to(value.device))
        if capture.last_only:
            value = _last(site, value)
        elif p0 > 0:
            head = base[key].index_select(0, expand.to(value.device))
            if site == "attn_weights":  # (rows, heads, queries, keys)
                value = torch.cat([head[:, :, :p0], value], dim=2)
            else:
                value = torch.cat([head[:, :p0], value], dim=1)
        slots = pieces.setdefault(key, {})
        for j, i in enumerate(members):
            slots[i] = value[j]


def run_packed(lm, prompts: Sequence, rows: Rows, *, row_prompt: Sequence[int] | None = None,
               bases: Rows | None = None, base_prompt: Sequence[int] | None = None,
               row_base: Sequence[int] | None = None, max_rows: int = 512,
               clean_kv: dict | None = None) -> RunResult:
    """`run` for several prompts at once: the rows of many facts share each forward pass (batching across facts,
    so that a GPU gets a few large forwards instead of many small ones).

    Row i runs prompt `row_prompt[i]` under `rows[i]` (positions relative to that prompt). With `bases`, each
    base b is a shared intervention set on prompt `base_prompt[b]` (e.g. one fact's noise sample) and row i
    builds on base `row_base[i]` (its prompt is its base's). Returns the logits at each row's own last position;
    captures are not supported (use `run_batch` for clean captures).

    How: prompts are right-padded to a common width and run without a padding mask — by causality a real token
    never sees the padding after it, and position ids are the same for every prompt — so every base runs once
    (one batched pass, keys and values kept) and the rows are grouped into passes over positions [p0, t) exactly
    as in `run` (`plan_chunks`): below the pass's first layer once per base it uses, from there on once per row.
    Each row's numbers equal `run` on its own prompt (tested to 1e-5 in float32).

    `clean_kv`: a dict in which the clean bases' keys and values (bases without interventions, one per prompt) are
    kept between calls on the same prompts, so several analyses of one model state run that pass once; the caller
    guarantees the model does not change while it holds the dict.
    """
    id_lists = [_token_ids(lm, p) for p in prompts]
    if not id_lists:
        raise InterventionError("no prompts to run")
    rows = [list(r) for r in rows]
    if not rows:
        raise InterventionError("no rows to run")
    if bases is None:
        if row_prompt is None or len(row_prompt) != len(rows):
            raise InterventionError("row_prompt must give one prompt index per row")
        bases, base_prompt, row_base = [[] for _ in id_lists], list(range(len(id_lists))), list(row_prompt)
    else:
        bases = [list(b) for b in bases]
        if base_prompt is None or len(base_prompt) != len(bases):
            raise InterventionError("base_prompt must give one prompt index per base")
        if row_base is None or len(row_base) != len(rows):
            raise InterventionError("row_base must give one base index per row")
    if any(not 0 <= p < len(id_lists) for p in base_prompt):
        raise InterventionError(f"a base refers to a prompt that does not exist (there are {len(id_lists)})")
    if any(not 0 <= b < len(bases) for b in row_base):
        raise InterventionError(f"row_base refers to a base that does not exist (there are {len(bases)})")
    L, H = lm.num_layers, lm.num_heads
    n_bases = len(bases)
    base_len = [len(id_lists[p]) for p in base_prompt]
    row_len = [base_len[b] for b in row_base]
    full = [bases[b] + r for b, r in zip(row_base, rows)]
    _validate(lm, bases, base_len)
    _validate(lm, full, row_len)
    width = max(base_len)
    pad_id = lm.tokenizer.pad_token_id if getattr(lm.tokenizer, "pad_token_id", None) is not None else 0
    base_ids = torch.full((n_bases, width), pad_id, dtype=torch.long)
    for b, p in enumerate(base_prompt):
        base_ids[b, :base_len[b]] = torch.tensor(id_lists[p])
    base_ids = base_ids.to(lm.device)

    points = [_reuse_point([r], n, L) for r, n in zip(rows, row_len)]
    chunks = plan_chunks(points, width, L, n_bases, max_rows=max_rows)
    logits: list = [None] * len(rows)
    keep_positions = "logits_to_keep" in _forward_params(lm.model)

    def layout(ivs, lengths, t0, t1):
        return Layout(ivs, lengths, [0] * len(ivs), t0, t1, L, H, lm.device, causal_only=True)

    with attached(lm, needs_projections(bases + full, None)) as state:
        reuse_key = None
        if clean_kv is not None and not any(bases):
            reuse_key = (tuple(tuple(i) for i in id_lists), tuple(base_prompt))
        if reuse_key is not None and reuse_key in clean_kv:
            base_cache = clean_kv[reuse_key]
        else:
            state.pass_ = Pass(upper=layout(bases, base_len, 0, width), engine_mask=True)
            base_cache = output_cache(_forward(lm, base_ids, position_ids=torch.arange(width)[None], use_cache=True,
                                                last_only_logits=False, logits_to_keep=torch.tensor([width - 1])))
            if reuse_key is not None:
                clean_kv[reuse_key] = base_cache
        for members, p0, l0 in chunks:
            t1 = max(row_len[i] for i in members)
            upper = layout([full[i] for i in members], [row_len[i] for i in members], p0, t1)
            row_bases = torch.tensor([row_base[i] for i in members], dtype=torch.long, device=lm.device)
            if l0 <= 0:
                chunk_pass = Pass(upper=upper, engine_mask=True)
                ids_part, lower_index, split = base_ids.index_select(0, row_bases)[:, p0:t1], row_bases, 0
            else:
                used = sorted({row_base[i] for i in members})
                local = {b: j for j, b in enumerate(used)}
                lower_index = torch.tensor(used, dtype=torch.long, device=lm.device)
                expand = torch.tensor([local[row_base[i]] for i in members], dtype=torch.long, device=lm.device)
                chunk_pass = Pass(upper=upper, lower=layout([bases[b] for b in used], [base_len[b] for b in used],
                                                            p0, t1),
                                  split=l0, expand_index=expand, engine_mask=True)
                ids_part, split = base_ids.index_select(0, lower_index)[:, p0:t1], l0
            cache = _select_cache(lm, base_cache, p0, split, lower_index, row_bases) if p0 > 0 else None
            last = [row_len[i] - 1 - p0 for i in members]
            keep = sorted(set(last))
            state.pass_ = chunk_pass
            out = _forward(lm, ids_part, position_ids=torch.arange(p0, t1)[None], cache=cache,
                           use_cache=cache is not None, last_only_logits=False,
                           logits_to_keep=torch.tensor(keep) if keep_positions else None)
            where = {q: (keep.index(q) if keep_positions else q) for q in keep}
            for j, i in enumerate(members):
                logits[i] = out.logits[j, where[last[j]]]
    return RunResult(torch.stack(logits), Captures({}, row_len, [0] * len(rows), False))


def _select_cache(lm, base_cache, p0: int, split: int, lower_index: torch.Tensor, upper_index: torch.Tensor):
    """Keys/values of positions [0, p0) for one pass of `run_packed`: the bases `lower_index` below `split`, the
    rows' bases `upper_index` from `split` on."""
    from transformers import DynamicCache

    data = []
    for layer_idx, layer in enumerate(base_cache.layers):
        index = upper_index if layer_idx >= split else lower_index
        keys, values = layer.keys[:, :, :p0], layer.values[:, :, :p0]
        data.append((keys.index_select(0, index.to(keys.device)), values.index_select(0, index.to(values.device))))
    return DynamicCache(ddp_cache_data=data, config=lm.model.config)


def run_batch(lm, prompts: Sequence, rows: Rows | None = None, *, capture: Capture | None = None,
              padding_side: str | None = None) -> RunResult:
    """Run several prompts in one padded batch, row i = prompts[i] under rows[i] (positions are relative to each
    prompt). Padding does not change any number: padded keys are masked and position ids follow each prompt."""
    id_lists = [_token_ids(lm, p) for p in prompts]
    if not id_lists:
        raise InterventionError("no prompts to run")
    rows = [list(r) for r in (rows if rows is not None else [[] for _ in id_lists])]
    if len(rows) != len(id_lists):
        raise InterventionError(f"{len(rows)} intervention rows for {len(id_lists)} prompts")
    side = padding_side or getattr(lm.tokenizer, "padding_side", "right") or "right"
    if side not in ("left", "right"):
        raise InterventionError(f"padding_side must be 'left' or 'right', not {side!r}")
    lengths = [len(i) for i in id_lists]
    width = max(lengths)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(id_lists), width), dtype=torch.long)
    pad_left = [width - n if side == "left" else 0 for n in lengths]
    for i, ids in enumerate(id_lists):
        input_ids[i, pad_left[i]:pad_left[i] + lengths[i]] = torch.tensor(ids)
        mask[i, pad_left[i]:pad_left[i] + lengths[i]] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    capture = capture or Capture()
    layout = Layout(rows, lengths, pad_left, 0, width, lm.num_layers, lm.num_heads, lm.device)
    _validate(lm, rows, lengths)
    with attached(lm, needs_projections(rows, capture)) as state:
        state.pass_ = p = Pass(upper=layout, capture=capture, engine_mask=True)
        out = _forward(lm, input_ids, position_ids=position_ids, attention_mask=mask, last_only_logits=False)
    last = torch.tensor([pl + n - 1 for pl, n in zip(pad_left, lengths)], device=out.logits.device)
    batch = torch.arange(len(lengths), device=out.logits.device)
    logits = out.logits[batch, last]
    captures = Captures(dict(p.captured), lengths, pad_left)
    return RunResult(logits, captures.last() if capture.last_only else captures)


@contextmanager
def intervene(lm, rows: Rows, *, seq_len: int, capture: Capture | None = None,
              lengths: Sequence[int] | None = None, pad_left: Sequence[int] | None = None) -> Iterator[Captures]:
    """Apply `rows[i]` to batch row i of every forward the caller runs on `lm.model` inside the block.

    The batch must have `len(rows)` rows of `seq_len` tokens (full sequences, no cache); with padding, give each
    row's prompt `lengths` and `pad_left`. The yielded `Captures` fills as the forwards run. On exit the model is
    exactly as before, also through an exception."""
    rows = [list(r) for r in rows]
    lengths = list(lengths or [seq_len] * len(rows))
    pad_left = list(pad_left or [0] * len(rows))
    capture = capture or Capture()
    layout = Layout(rows, lengths, pad_left, 0, seq_len, lm.num_layers, lm.num_heads, lm.device)
    layout.validate()
    captures = Captures({}, lengths, pad_left, False)
    with attached(lm, needs_projections(rows, capture)) as state:
        state.pass_ = p = Pass(upper=layout, capture=capture)
        p.captured = captures.data
        yield captures

"""`locedit.edit` / `locedit.edit_many`: change facts where `locate` says they are retrieved (or at given sites),
returning an applied, reversible `Edit`."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from locedit.errors import FactError, LoceditError
from locedit.core.facts import Fact
from locedit.editing.edit import Edit, EditError, applied_edits, geometry
from locedit.editing.hparams import METHOD_HPARAMS, as_dict, resolve_hparams

METHODS = tuple(METHOD_HPARAMS)


def edit(lm, fact: Fact, new_target: str, *, method: str = "rome", layers: Sequence[int] | None = None,
         heads: Sequence[Sequence[int]] | None = None, key_position: str | None = None, hparams=None, stats=None,
         sites=None, corpus=None, progress: bool = False) -> Edit:
    """Edit one fact so the model continues `fact.prompt` with `new_target`; the returned edit is applied.

    `layers=None` / `heads=None` edit where `locate` says the fact is retrieved (`sites=` passes a `SiteMap`
    already computed); `key_position` is "subject_last" (ROME's choice) or "carrier" (locate's carrier token),
    default as `locate` recommends. `hparams`: a dict, a JSON/YAML file or the method's dataclass. `stats`: key
    statistics from `locedit.editing.stats.key_statistics` (computed and cached on disk when None, over
    `corpus` or the model's own sampled text)."""
    return edit_many(lm, [fact], [new_target], method=method, layers=layers, heads=heads, key_position=key_position,
                     hparams=hparams, stats=stats, sites=[sites] if sites is not None else None, corpus=corpus,
                     progress=progress)


def edit_many(lm, facts: Sequence[Fact], new_targets: Sequence[str], *, method: str = "memit",
              layers: Sequence[int] | None = None, heads: Sequence[Sequence[int]] | None = None,
              key_position: str | None = None, hparams=None, stats=None, sites=None, corpus=None,
              progress: bool = False) -> Edit:
    """Edit a batch of facts in one update (MEMIT/AlphaEdit; ROME, head and FT edit one fact only)."""
    start = time.perf_counter()
    if method not in METHODS:
        raise LoceditError(f"unknown editing method {method!r}; use one of {', '.join(METHODS)}")
    facts, new_targets = list(facts), list(new_targets)
    if not facts:
        raise LoceditError("no facts to edit")
    if len(facts) != len(new_targets):
        raise LoceditError(f"{len(facts)} facts but {len(new_targets)} new targets")
    if method != "memit" and len(facts) > 1:
        raise LoceditError(f"method {method!r} edits one fact at a time; use method='memit' for a batch")
    hp = resolve_hparams(method, hparams)
    facts = [_resolved(lm, f) for f in facts]
    targets = [_new_target_text(lm, f, t) for f, t in zip(facts, new_targets)]
    site_maps = list(sites) if sites is not None else [None] * len(facts)
    needs_location = (layers is None and method != "head") or (heads is None and method == "head") or \
        key_position == "carrier"
    if needs_location:
        site_maps = [s if s is not None else _locate(lm, f) for s, f in zip(site_maps, facts)]
    # default key position: as locate recommends when it ran (its carrier token, or subject-last at a model's
    # measured edit layer), ROME's subject-last token at given sites
    rule = key_position or (_recommended_key_position(site_maps[0]) if needs_location else "subject_last")
    if rule not in ("subject_last", "carrier"):
        raise LoceditError(f"key_position must be 'subject_last' or 'carrier', not {rule!r}")
    offsets = [_carrier_offset(lm, f, s) if rule == "carrier" else None for f, s in zip(facts, site_maps)]
    located_seconds = time.perf_counter() - start
    located = needs_location and layers is None and heads is None

    if method == "head":
        heads = _checked_heads(lm, heads if heads is not None else site_maps[0].recommendation["head_edit"]["heads"])
        layers_used = sorted({h[0] for h in heads})
    else:
        layers_used = _checked_layers(lm, layers if layers is not None else _located_layers(site_maps, method))
        if method in ("rome", "ft") and len(layers_used) != 1:
            raise LoceditError(f"{method} edits exactly one layer; got layers {layers_used}")
    edit_obj = _compute(lm, method, facts, targets, layers_used, heads, rule, offsets, hp, stats, corpus, progress)
    edit_obj.sites.update({"key_position": rule, "located": located})
    if located and method != "head":  # "located": locate's layer; "measured": the model's measured edit layer
        edit_obj.sites["layer_source"] = site_maps[0].recommendation["rank_one"].get("source", "located")
    if site_maps[0] is not None:  # what verify's extraction check reads
        edit_obj.sites["extraction_heads"] = [list(h) for h in site_maps[0].recommendation["head_edit"]["heads"]]
    edit_obj.hparams = as_dict(hp)
    edit_obj.timings["locate_s"] = located_seconds
    edit_obj.timings["total_s"] = time.perf_counter() - start
    return edit_obj.apply(lm)


def _compute(lm, method, facts, targets, layers, heads, rule, offsets, hp, stats, corpus, progress) -> Edit:
    from locedit.editing.stats import key_statistics
    from locedit.editing.templates import context_templates

    notes: list[str] = []
    timings: dict = {}
    _check_editable(lm, method, layers, heads, hp)
    t0 = time.perf_counter()
    stats_key = None
    with unedited(lm):  # statistics and templates always describe the unedited model
        if method != "ft":
            context_templates(lm, hp.context_template_length_params, hp.seed)
        if method == "memit" or (method in ("rome", "head") and hp.mom2_adjustment):
            kind = "mlp" if method != "head" else ("attn_out" if hp.mode == "out" else "attn_in")
            if stats is None:
                stats = key_statistics(lm, layers=layers, kinds=(kind,), corpus=corpus, tokens=hp.stats_tokens,
                                       progress=progress)
            stats_key = getattr(stats, "cache_key", None)
    timings["stats_s"] = time.perf_counter() - t0
    # No weight is written while an edit is computed: ROME, head and FT optimise through hooks, MEMIT restores its
    # temporary writes (memit._restoring). The Edit is applied atomically afterwards.
    if method == "rome":
        from locedit.editing.rome import rome_update

        result = rome_update(lm, facts[0], targets[0], layers[0], rule, offsets[0], hp,
                             stats.get("mlp", layers[0]) if hp.mom2_adjustment else None)
        deltas, keys, losses = [result.delta], {}, [result.losses]
        timings["values_s"] = result.seconds
    elif method == "memit":
        from locedit.editing.memit import memit_update

        result = memit_update(lm, facts, targets, layers, rule, offsets, hp, stats)
        deltas, keys, losses = result.deltas, result.keys, result.losses
        timings["values_s"] = result.seconds_values
    elif method == "head":
        from locedit.editing.heads import head_update

        result = head_update(lm, facts[0], targets[0], heads, rule, offsets[0], hp, stats)
        deltas, keys, losses = result.deltas, {}, [result.losses]
        notes += result.notes
        timings["values_s"] = result.seconds
    else:
        from locedit.editing.ft import ft_update

        result = ft_update(lm, facts[0], targets[0], layers[0], hp)
        deltas, keys, losses = [result.delta], {}, [result.losses]
        timings["values_s"] = result.seconds
    timings["edit_s"] = time.perf_counter() - t0
    sites = {"layers": list(layers), "heads": [list(h) for h in heads] if heads else [],
             "carrier_offsets": offsets}
    model = {"name": lm.name, "geometry": geometry(lm), "tensors": {d.name: d.original_sha256 for d in deltas}}
    return Edit(method=method, facts=facts, new_targets=targets, sites=sites, hparams={}, deltas=deltas, model=model,
                keys=keys, stats_key=stats_key, timings=timings, losses=losses, notes=notes)


def _check_editable(lm, method: str, layers, heads, hp) -> None:
    """Refuse, before any work, to edit a weight accelerate has offloaded (a meta tensor between forwards): an
    edit must write the weight where the model reads it, and weights on disk are never touched."""
    adapter = lm.adapter
    if method == "head":
        path = adapter.attn_o if hp.mode == "out" else adapter.qkv
    else:
        path = adapter.mlp_down
    for layer in layers:
        weight = adapter.layer_part(lm.model, layer, path).weight
        if weight.device.type == "meta":
            raise EditError(f"layer {layer}'s {path} is offloaded by accelerate (device_map 'cpu'/'disk'); locedit "
                            "edits only weights that live on a device — load the model with a device_map that "
                            f"keeps layer {layer} on a GPU or the CPU")


@contextmanager
def unedited(lm) -> Iterator[None]:
    """Temporarily revert every edit applied to `lm` (newest first), re-applying them in order afterwards."""
    stack = applied_edits(lm)
    for e in reversed(stack):
        e.revert()
    try:
        yield
    finally:
        for e in stack:
            e.apply(lm)


def _resolved(lm, fact: Fact) -> Fact:
    """The fact with its true target filled in (the model's top-1 token when None)."""
    if not isinstance(fact, Fact):
        raise FactError(f"expected a locedit.Fact, got {type(fact).__name__}")
    if fact.target is not None:
        return fact
    top = lm.predict(fact)[0]
    if not top.token.strip():
        raise FactError(f"the model's top-1 prediction after {fact.prompt!r} is the blank token {top.token!r}; give "
                        "the fact's true target explicitly")
    return Fact(fact.subject, fact.prompt, top.token, fact.relation, dict(fact.meta))


def _new_target_text(lm, fact: Fact, new_target: str) -> str:
    if not isinstance(new_target, str) or not new_target.strip():
        raise FactError(f"new target {new_target!r} is empty; give the attribute the edit should produce")
    text = Fact(fact.subject, fact.prompt, new_target).target_text()
    if text.strip() == (fact.target or "").strip():
        raise FactError(f"new target {new_target!r} is the fact's current target; nothing to edit")
    if lm.predict(fact)[0].token.strip() == text.strip():
        raise FactError(f"the model already predicts {new_target!r} after {fact.prompt!r}; nothing to edit")
    return text


def _locate(lm, fact: Fact):
    from locedit.localization.sites import locate

    return locate(lm, fact)


def _carrier_offset(lm, fact: Fact, site_map) -> int | None:
    if site_map is None:
        return None
    enc = lm.encode(fact)
    return int(site_map.carrier["position"]) - enc.subject_start


def _recommended_key_position(site_map) -> str:
    return site_map.recommendation["rank_one"].get("key_position", "carrier")  # older SiteMaps: the carrier


def _located_layers(site_maps, method: str) -> list[int]:
    """ROME/FT: the layer `locate` recommends. MEMIT: a window of up to 5 layers ending at the most often
    recommended layer (MEMIT's convention: GPT-2 XL edits 13-17 where ROME edits 17)."""
    counts: dict[int, int] = {}
    for s in site_maps:
        for layer in s.recommendation["rank_one"]["layers"][:1]:
            counts[layer] = counts.get(layer, 0) + 1
    top = max(sorted(counts), key=lambda l: counts[l])
    if method == "memit":
        return list(range(max(0, top - 4), top + 1))
    return [top]


def _checked_layers(lm, layers) -> list[int]:
    out = sorted({int(l) for l in layers})
    if not out:
        raise LoceditError("no layers to edit")
    for l in out:
        if not 0 <= l < lm.num_layers:
            raise LoceditError(f"layer {l} does not exist (the model has {lm.num_layers} layers: 0-{lm.num_layers - 1})")
    return out


def _checked_heads(lm, heads) -> list[tuple[int, int]]:
    out = []
    for h in heads:
        try:
            layer, head = int(h[0]), int(h[1])
        except (TypeError, ValueError, IndexError):
            raise LoceditError(f"a head is a (layer, head) pair, not {h!r}") from None
        if not 0 <= layer < lm.num_layers or not 0 <= head < lm.num_heads:
            raise LoceditError(f"head L{layer}H{head} does not exist (the model has {lm.num_layers} layers of "
                               f"{lm.num_heads} heads)")
        out.append((layer, head))
    if not out:
        raise LoceditError("no heads to edit")
    return out


def save_model(lm, directory) -> Path:
    """Write `lm` (with whatever edits are applied) as a normal Hugging Face directory that `from_pretrained` loads:
    config.json, the tokenizer and model.safetensors, written to a temporary directory and renamed into place.
    Works also for models dequantized from GGUF files (whose config still names the GGUF quantizer)."""
    from locedit.core.loading import write_hf_directory

    return write_hf_directory(lm.model, lm.tokenizer, Path(directory))

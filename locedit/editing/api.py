"""`locedit.edit`: change facts where `locate` says they are retrieved (or at given sites), returning an applied,
reversible `Edit`. One `EditRequest` is one edit; a sequence of them is one joint edit (MEMIT, AlphaEdit)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from locedit.core.facts import EditRequest, Fact
from locedit.core.head import Head
from locedit.editing.edit import Edit, geometry, unedited
from locedit.editing.hparams import METHOD_HPARAMS, as_dict, read_hparams
from locedit.errors import EditError, FactError, InterventionError

METHODS = tuple(METHOD_HPARAMS)
# where a rank-one edit reads its key; "last" (the prompt's last token) is the control of issue #17 §1
KEY_POSITIONS = ("subject_last", "carrier", "last")
JOINT = ("memit", "locft")  # methods that edit many requests in one update


def edit(lm, request: EditRequest | Sequence[EditRequest], *positional: object, method: str | None = None,
         layers: Sequence[int] | None = None, heads: Sequence[Head | str | Sequence[int]] | None = None,
         key_position: str | None = None, hparams=None, stats=None, sites=None, corpus=None,
         progress: bool = False) -> Edit:
    """Edit so the model continues each request's `fact.prompt` with its `new_target`; the returned edit is applied.

    `request`: one `EditRequest` (default method "rome") or a sequence of them, edited jointly in one update
    (default "memit"; ROME, head and FT edits take one request). `fact.target` is the attribute replaced (None: the
    model's top-1; the edit records which in `target_sources`). `layers=None` edits at the calibrated site of these
    weights where they have one (`locedit.calibrate`; `locate` does not run for it), else, like `heads=None`, where
    `locate` says the fact is retrieved (`sites=` passes the `SiteMap`, or one per request, already computed); heads are
    read with `Head.parse` ("L23H4", "23.4", (23, 4)); `sites="select"` (or a `locedit.editing.select.Selection`)
    chooses the site per fact by trial edits on selection probes. `key_position` is "subject_last" (ROME's choice) or
    "carrier" (locate's carrier token), default as `locate` recommends; "last" (the prompt's last token) is a
    **control**, not a way to edit facts: a rank-one edit keyed there writes the new target without going through
    the subject's enrichment (a shortcut `verify`'s mechanistic checks must fail; `recipes/validate_verify.py`).
    `hparams`: a dict, a JSON/YAML file (ROME, MEMIT and EasyEdit files as they are: `alg_name` picks the method,
    their `layers` and `fact_token` are used
    where not given here, keys that do not apply are listed in `Edit.hparams_ignored` and one warning) or the
    method's dataclass. `stats`: key statistics from `locedit.editing.stats.key_statistics` (computed and cached
    on disk when None, over `corpus` or the model's own sampled text). The old form `edit(lm, fact, " Rome")` is
    refused with an `EditError` that shows the `EditRequest` to write."""
    start = time.perf_counter()
    requests, single = _requests(request, positional)
    read = read_hparams(method, hparams, default_method="rome" if single else "memit")
    method = method or read.method or ("rome" if single else "memit")
    if isinstance(sites, str) or _is_selection(sites):
        return _select(lm, requests, single, sites, method, layers, heads, key_position, hparams, stats, corpus)
    if method not in JOINT and len(requests) > 1:
        raise EditError(f"method {method!r} edits one fact at a time; use method='memit' for a joint edit of "
                        f"{len(requests)} requests")
    hp, ignored = read.params, dict(read.ignored)
    if read.layers is not None:
        if method == "head":
            ignored["layers"] = "head edits take heads="
        elif layers is not None:
            ignored["layers"] = "layers= given to edit"
        else:
            layers = read.layers
    if read.key_position is not None:
        if key_position is not None:
            ignored["fact_token"] = "key_position= given to edit"
        else:
            key_position = read.key_position
    locft_source = None
    if method == "locft":  # trains on the new targets only: no top-1 needed, and no forward per request
        facts, sources = [r.fact for r in requests], ["given" if r.fact.target else "none" for r in requests]
        targets = [r.new_target_text() for r in requests]
        if layers is None:
            from locedit.editing.locft import locft_layer

            layer, locft_source = locft_layer(lm)
            layers = [layer]
    else:
        facts, sources = zip(*[_resolved(lm, r.fact) for r in requests])
        facts = list(facts)
        targets = [_new_target_text(lm, f, r) for f, r in zip(facts, requests)]
    site_maps = _site_maps(sites, single, len(requests))
    # these weights' calibrated site, where they have one, without running `locate` (which would only recommend it)
    calibrated = _calibrated_layers(lm, method) if layers is None and method in ("rome", "memit", "ft") else None
    if calibrated is not None:
        layers = list(calibrated["layers"])
        key_position = key_position or calibrated["key_position"]
    needs_location = (layers is None and method != "head") or (heads is None and method == "head") or \
        key_position == "carrier"
    if needs_location:
        site_maps = [s if s is not None else _locate(lm, f) for s, f in zip(site_maps, facts)]
    # default key position: as locate recommends when it ran (its carrier token, or the calibrated site's key
    # position for these weights), ROME's subject-last token at given sites
    rule = key_position or (_recommended_key_position(site_maps[0]) if needs_location else "subject_last")
    if rule not in KEY_POSITIONS:
        raise EditError(f"key_position must be one of {', '.join(map(repr, KEY_POSITIONS))}, not {rule!r}")
    if rule == "last" and method in ("ft", "locft"):
        raise EditError(f"key_position='last' is a control of the rank-one and head edits; {method} has no key "
                        "position")
    offsets = [_carrier_offset(lm, f, s) if rule == "carrier" else None for f, s in zip(facts, site_maps)]
    located_seconds = time.perf_counter() - start
    located = needs_location and layers is None and heads is None

    if method == "head":
        heads = _checked_heads(lm, heads if heads is not None else site_maps[0].recommendation["head_edit"]["heads"])
        layers_used = sorted({h.layer for h in heads})
    else:
        if layers is None:
            layers = _located_layers(site_maps, method)
        layers_used = _checked_layers(lm, layers)
        if method in ("rome", "ft", "locft") and len(layers_used) != 1:
            raise EditError(f"{method} edits exactly one layer; got layers {layers_used}")
    edit_obj = _compute(lm, method, facts, targets, layers_used, heads, rule, offsets, hp, stats, corpus, progress)
    edit_obj.sites.update({"key_position": rule, "located": located})
    if locft_source is not None:
        edit_obj.sites["layer_source"] = locft_source
    if calibrated is not None:  # these weights' calibrated site
        edit_obj.sites["layer_source"] = "calibrated"
    elif located and method != "head":  # locate's recommended layer
        edit_obj.sites["layer_source"] = site_maps[0].recommendation["rank_one"].get("source", "located")
    if site_maps[0] is not None:  # what verify's extraction check reads
        edit_obj.sites["extraction_heads"] = [list(Head.parse(h))
                                              for h in site_maps[0].recommendation["head_edit"]["heads"]]
    edit_obj.hparams = as_dict(hp)
    edit_obj.hparams_ignored = ignored
    edit_obj.target_sources = list(sources)
    edit_obj.notes += read.notes
    edit_obj.timings["locate_s"] = located_seconds
    edit_obj.timings["total_s"] = time.perf_counter() - start
    return edit_obj.apply(lm)


def _is_selection(sites) -> bool:
    from locedit.editing.select import Selection

    return isinstance(sites, Selection)


def _select(lm, requests, single, sites, method, layers, heads, key_position, hparams, stats, corpus) -> Edit:
    """`sites="select"` (or a `Selection`): per-fact site selection by trial edits (`locedit.editing.select`)."""
    from locedit.editing.select import Selection, select_edit

    if isinstance(sites, str) and sites != "select":
        raise EditError(f"sites= takes a SiteMap, 'select' or a Selection, not the string {sites!r}")
    if not single:
        raise EditError("sites='select' chooses the site of one request; edit the requests one at a time")
    given = [name for name, v in (("layers", layers), ("heads", heads), ("key_position", key_position))
             if v is not None]
    if given:
        raise EditError(f"sites='select' chooses the layer and key position itself; do not give {', '.join(given)}")
    if method not in ("rome", "ft"):
        raise EditError(f"sites='select' chooses the layer of one-layer edits (rome, ft), not method {method!r}")
    fact, _ = _resolved(lm, requests[0].fact)
    request = EditRequest(fact, requests[0].new_target)
    _new_target_text(lm, fact, request)  # refused before any trial, as edit refuses it

    def trial(layer: int, key: str, site_map) -> Edit:
        return edit(lm, request, method=method, layers=[layer], key_position=key, hparams=hparams, stats=stats,
                    corpus=corpus, sites=site_map)

    return select_edit(lm, request, sites if isinstance(sites, Selection) else Selection(), trial, stats=stats,
                       corpus=corpus)


def check_request(lm, request: EditRequest) -> None:
    """Raise the `FactError` that `edit` would raise for `request` on `lm` as it is now (the model already gives
    the new target, the new target is the current one, a blank top-1), or return None when it can be edited."""
    fact, _ = _resolved(lm, request.fact)
    _new_target_text(lm, fact, request)


def located_sites(lm, fact: Fact, method: str = "rome") -> tuple[list[int], str]:
    """The layers and key position `edit` chooses for `fact` with `layers=None` and `key_position=None` (one
    `locate`: its recommended layer, the model's measured edit layer where it has one; MEMIT: the window of up to
    5 layers ending there). For fixing one site for many edits (`EditSession`)."""
    fact, _ = _resolved(lm, fact)
    site_map = _locate(lm, fact)
    return _located_layers([site_map], method), _recommended_key_position(site_map)


def _requests(request, positional: tuple) -> tuple[list[EditRequest], bool]:
    """The requests as a list, and whether one request (not a sequence) was given."""
    if positional or isinstance(request, Fact):
        new = repr(positional[0]) if positional else "' Rome'"
        raise EditError(f"locedit.edit takes an EditRequest (or a sequence of them) after the model: write "
                        f"locedit.edit(lm, EditRequest(fact, {new}), ...)")
    if isinstance(request, EditRequest):
        return [request], True
    if isinstance(request, (str, bytes)) or not isinstance(request, Sequence):
        raise EditError(f"locedit.edit takes an EditRequest or a sequence of them, not {type(request).__name__}")
    requests = list(request)
    if not requests:
        raise EditError("no edit requests: give at least one EditRequest")
    for i, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise EditError(f"request {i} is a {type(r).__name__}, not an EditRequest")
    return requests, False


def _site_maps(sites, single: bool, n: int) -> list:
    if sites is None:
        return [None] * n
    if single:
        return [sites]
    if isinstance(sites, (str, bytes)) or not isinstance(sites, Sequence) or len(sites) != n:
        raise EditError(f"sites= of a joint edit is one SiteMap per request ({n})")
    return list(sites)


def _compute(lm, method, facts, targets, layers, heads, rule, offsets, hp, stats, corpus, progress) -> Edit:
    from locedit.editing.stats import key_statistics
    from locedit.editing.templates import context_templates

    notes: list[str] = []
    timings: dict = {}
    _check_editable(lm, method, layers, heads, hp)
    t0 = time.perf_counter()
    stats_key = None
    with unedited(lm):  # statistics and templates always describe the unedited model
        if method not in ("ft", "locft"):
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
    elif method == "locft":
        from locedit.editing.locft import locft_update

        result = locft_update(lm, facts, targets, layers[0], hp)
        deltas, keys, losses = [result.delta], {}, [result.losses]
        timings["values_s"] = result.seconds
        notes.append(f"LocFT-BF: {len(result.losses)} epoch(s), {result.steps} step(s), final epoch loss "
                     f"{result.losses[-1]:.4f}")
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


def _resolved(lm, fact: Fact) -> tuple[Fact, str]:
    """The fact with its true target filled in (the model's top-1 token when None), and which it is."""
    if fact.target is not None:
        return fact, "given"
    top = lm.predict(fact)[0]
    if not top.token.strip():
        raise FactError(f"the model's top-1 prediction after {fact.prompt!r} is the blank token {top.token!r}; give "
                        "the fact's true target explicitly")
    return Fact(fact.subject, fact.prompt, top.token, fact.relation, dict(fact.meta)), "top1"


def _new_target_text(lm, fact: Fact, request: EditRequest) -> str:
    """The request's new target as it continues the prompt, refused when the model already gives it."""
    new_target = request.new_target
    text = request.new_target_text()
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


def _calibrated_layers(lm, method: str) -> dict | None:
    """The calibrated site of `method` for `lm`'s weights (MEMIT's window, FT's layer), None without one (ROME's
    calibrated site reaches `edit` through locate's recommendation)."""
    from locedit.editing.calibration import calibrated_site

    site, _ = calibrated_site(lm, method, warn=False)
    return site


def _located_layers(site_maps, method: str) -> list[int]:
    """ROME/FT: the layer `locate` recommends (these weights' calibrated one where they have a calibration).
    MEMIT: a window of up to 5 layers ending at the most often recommended layer (MEMIT's convention: GPT-2 XL
    edits 13-17 where ROME edits 17)."""
    counts: dict[int, int] = {}
    for s in site_maps:
        for layer in s.recommendation["rank_one"]["layers"][:1]:
            counts[layer] = counts.get(layer, 0) + 1
    top = max(sorted(counts), key=lambda l: counts[l])
    if method == "memit":
        return list(range(max(0, top - 4), top + 1))
    return [top]


def _checked_layers(lm, layers) -> list[int]:
    try:
        out = sorted({int(l) for l in layers})
    except (TypeError, ValueError):
        raise InterventionError(f"layers must be layer numbers, not {layers!r}") from None
    if not out:
        raise EditError("no layers to edit")
    for l in out:
        if not 0 <= l < lm.num_layers:
            raise InterventionError(f"layer {l} does not exist (the model has {lm.num_layers} layers: "
                                    f"0-{lm.num_layers - 1})")
    return out


def _checked_heads(lm, heads) -> list[Head]:
    out = []
    for h in heads:
        head = Head.parse(h)
        if not 0 <= head.layer < lm.num_layers or not 0 <= head.head < lm.num_heads:
            raise InterventionError(f"head {head} does not exist (the model has {lm.num_layers} layers of "
                                    f"{lm.num_heads} heads)")
        out.append(head)
    if not out:
        raise EditError("no heads to edit")
    return out


def save_model(lm, directory) -> Path:
    """Write `lm` (with whatever edits are applied) as a normal Hugging Face directory that `from_pretrained` loads:
    config.json, the tokenizer and model.safetensors, written to a temporary directory and renamed into place.
    Works also for models dequantized from GGUF files (whose config still names the GGUF quantizer)."""
    from locedit.core.loading import write_hf_directory

    return write_hf_directory(lm.model, lm.tokenizer, Path(directory))

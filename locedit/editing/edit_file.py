"""Reading saved edits (a directory with `edit.safetensors` (the factors) and `edit.json` (everything else).

`edit.json` records the SHA-256 of `edit.safetensors` and of its own content (`content_sha256`, over the JSON with
sorted keys, that field left out). `load_edit` checks both hashes, then that the fields make sense and agree with
each other (a known method, layers that exist in the recorded model and are the layers of the changed parameters,
string targets, one per fact), so a changed, inconsistent, truncated or foreign file is refused with one line.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from locedit.core.facts import Fact
from locedit.editing.edit import (FORMAT, FORMAT_VERSION, JSON_NAME, TENSORS_NAME, Edit, WeightDelta, content_sha256,
                                   file_sha256)
from locedit.editing.hparams import METHOD_HPARAMS
from locedit.errors import EditError, LoceditError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LAYER = re.compile(r"\.(\d+)\.")


def load_edit(path: str | os.PathLike) -> Edit:
    """Read an edit saved with `Edit.save` (not applied). Refuses a missing, changed, inconsistent, truncated,
    corrupt or foreign file with `EditError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(path)
    json_path, tensors_path = directory / JSON_NAME, directory / TENSORS_NAME
    for p in (json_path, tensors_path):
        if not p.is_file():
            raise EditError(f"{directory} is not a saved locedit edit: {p.name} is missing")
    try:
        info = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise EditError(f"{json_path} is not valid JSON (corrupt or truncated): {exc}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise EditError(f"{json_path} is not a locedit edit file (format {found!r})")
    if info.get("version") != FORMAT_VERSION:
        raise EditError(f"{json_path} has edit format version {info.get('version')!r}; this locedit reads "
                        f"version {FORMAT_VERSION}")
    if info.get("content_sha256") != content_sha256(info):
        raise EditError(f"{json_path} was changed after it was saved (its content does not match its "
                        "content_sha256); refusing to trust it")
    if file_sha256(tensors_path) != info.get("tensors_sha256"):
        raise EditError(f"{tensors_path} does not match {json_path} (corrupt, truncated or from another edit)")
    try:
        check_info(info)
        tensors = load_file(str(tensors_path))
        deltas = [_delta(i, d, tensors) for i, d in enumerate(info["deltas"])]
        keys = {int(layer): tensors[f"keys.{layer}"] for layer in info.get("key_layers", [])}
        return Edit(method=info["method"], facts=[fact_from_dict(f) for f in info["facts"]],
                    new_targets=list(info["new_targets"]), sites=info["sites"], hparams=info["hparams"],
                    deltas=deltas, model=info["model"], keys=keys, stats_key=info.get("stats_key"),
                    timings=info.get("timings", {}), losses=info.get("losses", []), notes=info.get("notes", []),
                    created=info.get("created", 0.0), target_sources=list(info.get("target_sources", [])),
                    hparams_ignored=dict(info.get("hparams_ignored", {})))
    except EditError as exc:
        raise EditError(f"{json_path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, SafetensorError, LoceditError) as exc:
        raise EditError(f"{directory}: malformed edit ({type(exc).__name__}: {exc})") from None


def check_info(info: dict) -> None:
    """Refuse (`EditError`) an `edit.json` mapping whose fields are of the wrong kind or disagree with each other."""
    method = info.get("method")
    if method not in METHOD_HPARAMS:
        raise EditError(f"unknown editing method {method!r} (known: {', '.join(METHOD_HPARAMS)})")
    facts, targets = info.get("facts"), info.get("new_targets")
    if not isinstance(facts, list) or not facts or not all(isinstance(f, dict) for f in facts):
        raise EditError("facts must be a non-empty list of fact records")
    if not isinstance(targets, list) or not all(isinstance(t, str) and t.strip() for t in targets):
        raise EditError(f"new_targets must be a list of non-empty strings, not {targets!r}")
    if len(targets) != len(facts):
        raise EditError(f"{len(facts)} facts but {len(targets)} new targets")
    if method != "memit" and len(facts) != 1:
        raise EditError(f"a {method} edit changes one fact, but the file lists {len(facts)}")
    geometry = (info.get("model") or {}).get("geometry") if isinstance(info.get("model"), dict) else None
    if not isinstance(geometry, dict) or not _is_int(geometry.get("num_layers")) or \
            not _is_int(geometry.get("num_heads")):
        raise EditError("model.geometry (num_layers, num_heads) is missing")
    num_layers, num_heads = geometry["num_layers"], geometry["num_heads"]
    sites = info.get("sites")
    if not isinstance(sites, dict):
        raise EditError("sites must be a mapping")
    layers = sites.get("layers")
    if not isinstance(layers, list) or not layers or not all(_is_int(l) and 0 <= l < num_layers for l in layers):
        raise EditError(f"sites.layers must be a non-empty list of layers 0-{num_layers - 1}, not {layers!r}")
    heads = sites.get("heads") or []
    if not isinstance(heads, list) or not all(isinstance(h, list) and len(h) == 2 and _is_int(h[0]) and _is_int(h[1])
                                              and 0 <= h[0] < num_layers and 0 <= h[1] < num_heads for h in heads):
        raise EditError(f"sites.heads must be [layer, head] pairs of the model's heads, not {heads!r}")
    if method == "head" and sorted({h[0] for h in heads}) != sorted(layers):
        raise EditError(f"sites.layers {layers} are not the layers of the edited heads {heads}")
    if method in ("rome", "ft", "locft") and len(layers) != 1:
        raise EditError(f"a {method} edit changes one layer, but sites.layers is {layers}")
    deltas = info.get("deltas")
    if not isinstance(deltas, list) or not deltas:
        raise EditError("deltas must be a non-empty list")
    for d in deltas:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or \
                not _SHA256.match(str(d.get("original_sha256"))) or not isinstance(d.get("transposed"), bool) or \
                not isinstance(d.get("shape"), list) or not all(_is_int(n) for n in d["shape"]):
            raise EditError(f"delta {d!r} lacks a name, shape, orientation or fingerprint")
        if (d.get("kind") == "dense") != (method in ("ft", "locft")):
            raise EditError(f"a {method} edit cannot hold a {d.get('kind')} change of {d['name']}")
    changed = sorted({_layer_of(d["name"]) for d in deltas})
    if changed != sorted(set(layers)):
        raise EditError(f"sites.layers {layers} are not the layers of the changed parameters "
                        f"{[d['name'] for d in deltas]}")
    tensors = (info.get("model") or {}).get("tensors")
    if tensors is not None and tensors != {d["name"]: d["original_sha256"] for d in deltas}:
        raise EditError("model.tensors does not list the fingerprints of the changed parameters")
    key_layers = info.get("key_layers", [])
    if not isinstance(key_layers, list) or not set(key_layers) <= set(layers):
        raise EditError(f"key_layers {key_layers!r} are not among the edited layers {layers}")
    if not isinstance(info.get("hparams"), dict):
        raise EditError("hparams must be a mapping")


def fact_from_dict(d: dict) -> Fact:
    return Fact(d["subject"], d["prompt"], d.get("target"), d.get("relation"), d.get("meta") or {})


def _delta(i: int, d: dict, tensors: dict) -> WeightDelta:
    parts = {p: tensors.get(f"{i}.{p}") for p in ("left", "right", "dense")}
    delta = WeightDelta(d["name"], d["original_sha256"], tuple(d["shape"]), transposed=d["transposed"], **parts)
    if (delta.dense is None and (delta.left is None or delta.right is None)) or \
            tuple(delta.matrix().shape) != tuple(delta.shape):
        raise EditError(f"the factors of {delta.name} in {TENSORS_NAME} do not give its shape {tuple(delta.shape)}")
    return delta


def _layer_of(name: str) -> int:
    m = _LAYER.search(name)
    if m is None:
        raise EditError(f"changed parameter {name!r} is not inside a numbered layer")
    return int(m.group(1))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)



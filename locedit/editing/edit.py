"""`Edit`: a weight change as a reversible, saveable object.

An edit is a list of `WeightDelta`s (a low-rank or dense change of one parameter each) plus everything that explains
it: method, facts, new targets, sites, hyper-parameters, timings, the optimisation loss curves and a **model
fingerprint** (the model's geometry and a SHA-256 of the original bytes of every tensor it changes).

Guarantees:
* `apply` is atomic: every new tensor is computed (and checked finite) before any weight is written; an exception
  or KeyboardInterrupt while writing restores what was written.
* `revert` restores the saved original bytes, so it is bit-exact. Edits compose: apply A then B, revert B then A.
  Reverting A while a later edit B changes the same tensor is refused (it would silently drop B).
* Applying an edit twice, or to a model whose geometry or tensors differ from the fingerprint, is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from locedit.errors import EditError, LoceditError
from locedit.core.facts import Fact

FORMAT = "locedit-edit"
FORMAT_VERSION = 1
JSON_NAME = "edit.json"
TENSORS_NAME = "edit.safetensors"


# model -> edits applied to it, oldest first
_APPLIED: "weakref.WeakKeyDictionary[torch.nn.Module, list[Edit]]" = weakref.WeakKeyDictionary()


def applied_edits(lm) -> list["Edit"]:
    """The locedit edits currently applied to `lm`'s model, oldest first."""
    return list(_APPLIED.get(lm.model, []))


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (dtype and shape included)."""
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{data.dtype}:{tuple(data.shape)}:".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def geometry(lm) -> dict:
    """What identifies a model's architecture for an edit: family and sizes."""
    return {"family": lm.adapter.family, "num_layers": lm.num_layers, "d_model": lm.d_model,
            "num_heads": lm.num_heads, "num_kv_heads": lm.num_kv_heads, "head_dim": lm.head_dim,
            "vocab_size": lm.vocab_size}


@dataclass
class WeightDelta:
    """The change of one parameter, in (out, in) orientation: `left @ right.T` (low rank) or `dense`.

    `transposed` marks parameters stored as (in, out) (GPT-2's Conv1D); the change is transposed when applied."""

    name: str
    original_sha256: str
    shape: tuple[int, ...]
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    transposed: bool = False

    def matrix(self) -> torch.Tensor:
        """The change in the parameter's storage orientation, float32."""
        if self.dense is not None:
            change = self.dense.float()
        else:
            change = self.left.float() @ self.right.float().T
        return change.T if self.transposed else change

    @property
    def rank(self) -> int | None:
        return None if self.left is None else int(self.left.shape[1])

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        out = {}
        for part in ("left", "right", "dense"):
            value = getattr(self, part)
            if value is not None:
                out[f"{index}.{part}"] = value.detach().float().contiguous().cpu()
        return out

    def describe(self) -> dict:
        return {"name": self.name, "original_sha256": self.original_sha256, "shape": list(self.shape),
                "transposed": self.transposed, "kind": "dense" if self.dense is not None else "low_rank",
                "rank": self.rank}


@dataclass
class Edit:
    """A fact edit: what changed, why, and how to undo it. Made by `locedit.edit` / `edit_many` (applied) or read
    by `locedit.load_edit` (not applied)."""

    method: str
    facts: list[Fact]
    new_targets: list[str]
    sites: dict
    hparams: dict
    deltas: list[WeightDelta]
    model: dict  # {"name", "geometry", "tensors": {param name: sha256 of its original bytes}}
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (d_k, n) edited keys (AlphaEdit history)
    stats_key: str | None = None
    timings: dict = field(default_factory=dict)
    losses: list[list[float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    _lm: object = field(default=None, repr=False, compare=False)
    _saved: dict = field(default_factory=dict, repr=False, compare=False)

    # --- state ----------------------------------------------------------------------------------------------
    @property
    def is_applied(self) -> bool:
        return self._lm is not None

    @property
    def layers(self) -> list[int]:
        return list(self.sites.get("layers") or [])

    def __repr__(self) -> str:
        what = ", ".join(f"{f.subject!r} -> {t!r}" for f, t in zip(self.facts[:3], self.new_targets[:3]))
        more = f" (+{len(self.facts) - 3})" if len(self.facts) > 3 else ""
        return (f"Edit({self.method}, {what}{more}, sites={self.sites.get('layers') or self.sites.get('heads')}, "
                f"{'applied' if self.is_applied else 'not applied'})")

    # --- apply / revert -------------------------------------------------------------------------------------
    def apply(self, lm) -> "Edit":
        """Write the change into `lm`'s weights (atomically). Refuses an applied edit or another model."""
        if self.is_applied:
            raise EditError(f"{self!r} is already applied; revert it before applying it again")
        self._check_model(lm)
        params = dict(lm.model.named_parameters())
        new_values = []
        for delta in self.deltas:
            param = params[delta.name]
            with torch.no_grad():
                change = delta.matrix().to(param.device)
                if tuple(change.shape) != tuple(param.shape):
                    raise EditError(f"edit changes {delta.name} with shape {tuple(change.shape)}, but the model's "
                                    f"tensor has shape {tuple(param.shape)}")
                value = (param.detach().float() + change).to(param.dtype)
            if not torch.isfinite(value).all():
                raise EditError(f"edit would write non-finite values into {delta.name}; nothing was changed")
            new_values.append((delta.name, param, value))
        saved: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, param, value in new_values:
                    saved[name] = param.detach().clone()
                    param.copy_(value)
        except BaseException:
            with torch.no_grad():
                for name, original in saved.items():
                    params[name].copy_(original)
            raise
        self._saved = saved
        self._lm = lm
        _APPLIED.setdefault(lm.model, []).append(self)
        return self

    def revert(self) -> None:
        """Restore the original bytes of every tensor this edit changed (bit-exact)."""
        if not self.is_applied:
            raise EditError(f"{self!r} is not applied; nothing to revert")
        lm = self._lm
        stack = _APPLIED.get(lm.model, [])
        later = stack[stack.index(self) + 1:]
        mine = {d.name for d in self.deltas}
        for other in later:
            shared = mine & {d.name for d in other.deltas}
            if shared:
                raise EditError(f"cannot revert {self!r} while the later {other!r} changes the same tensor(s) "
                                f"{sorted(shared)}; revert the later edit first")
        params = dict(lm.model.named_parameters())
        with torch.no_grad():
            for name, original in self._saved.items():
                params[name].copy_(original)
        stack.remove(self)
        self._saved = {}
        self._lm = None

    @contextmanager
    def applied(self, lm) -> Iterator["Edit"]:
        """Apply for the duration of the block, revert afterwards (also after an exception)."""
        self.apply(lm)
        try:
            yield self
        finally:
            self.revert()

    @contextmanager
    def reverted(self) -> Iterator["Edit"]:
        """Remove an applied edit for the duration of the block (e.g. to measure the unedited model)."""
        lm = self._lm
        self.revert()
        try:
            yield self
        finally:
            self.apply(lm)

    def _check_model(self, lm) -> None:
        mine, theirs = self.model.get("geometry", {}), geometry(lm)
        if mine != theirs:
            diff = {k: (mine.get(k), theirs.get(k)) for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)}
            raise EditError(f"this edit was made for model {self.model.get('name')!r}, whose geometry differs from "
                            f"{lm.name!r}: " + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in sorted(diff.items())))
        params = dict(lm.model.named_parameters())
        stack = _APPLIED.get(lm.model, [])
        for delta in self.deltas:
            if delta.name not in params:
                raise EditError(f"this edit changes {delta.name!r}, which {lm.name!r} does not have")
            current = tensor_sha256(params[delta.name])
            base = next((e._saved_sha(delta.name) for e in stack if delta.name in e._saved), current)
            if delta.original_sha256 not in (current, base):
                raise EditError(f"this edit was made for other weights than {lm.name!r}'s {delta.name} (fingerprint "
                                f"{delta.original_sha256[:12]} vs {current[:12]}): it belongs to another model or "
                                "a differently edited one")

    def _saved_sha(self, name: str) -> str:
        return tensor_sha256(self._saved[name])

    # --- serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "method": self.method,
            "facts": [fact_to_dict(f) for f in self.facts], "new_targets": list(self.new_targets),
            "sites": self.sites, "hparams": self.hparams, "model": self.model,
            "deltas": [d.describe() for d in self.deltas],
            "key_layers": sorted(int(k) for k in self.keys), "stats_key": self.stats_key,
            "timings": self.timings, "losses": self.losses, "notes": self.notes, "created": self.created,
            "applied": self.is_applied,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write `edit.safetensors` (the factors) and `edit.json` (everything else) into directory `path`,
        atomically (each file goes to a temporary name first; the JSON, which holds the tensors' hash, last)."""
        from safetensors.torch import save_file

        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for i, delta in enumerate(self.deltas):
            tensors.update(delta.tensors(i))
        for layer, keys in self.keys.items():
            tensors[f"keys.{int(layer)}"] = keys.detach().float().contiguous().cpu()
        info = self.to_dict()
        info.pop("applied")
        tmp_tensors = _temp_path(directory, TENSORS_NAME)
        tmp_json = _temp_path(directory, JSON_NAME)
        try:
            save_file(tensors, str(tmp_tensors), metadata={"format": FORMAT})
            info["tensors_sha256"] = _file_sha256(tmp_tensors)
            tmp_json.write_text(json.dumps(info, indent=1, default=_json_default))
            os.replace(tmp_tensors, directory / TENSORS_NAME)
            os.replace(tmp_json, directory / JSON_NAME)
        finally:
            for tmp in (tmp_tensors, tmp_json):
                if tmp.exists():
                    tmp.unlink()
        return directory


def load_edit(path: str | os.PathLike) -> Edit:
    """Read an edit saved with `Edit.save` (not applied). Refuses a missing, truncated, corrupt or foreign file."""
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
        raise EditError(f"{json_path} is not a locedit edit file (format {info.get('format') if isinstance(info, dict) else None!r})")
    if info.get("version") != FORMAT_VERSION:
        raise EditError(f"{json_path} has edit format version {info.get('version')!r}; this locedit reads "
                        f"version {FORMAT_VERSION}")
    if _file_sha256(tensors_path) != info.get("tensors_sha256"):
        raise EditError(f"{tensors_path} does not match {json_path} (corrupt, truncated or from another edit)")
    try:
        tensors = load_file(str(tensors_path))
        deltas = []
        for i, d in enumerate(info["deltas"]):
            parts = {p: tensors.get(f"{i}.{p}") for p in ("left", "right", "dense")}
            delta = WeightDelta(d["name"], d["original_sha256"], tuple(d["shape"]), transposed=d["transposed"],
                                **parts)
            if (delta.dense is None and (delta.left is None or delta.right is None)) or \
                    tuple(delta.matrix().shape) != tuple(delta.shape):
                raise EditError(f"{tensors_path}: the factors of {delta.name} do not give its shape "
                                f"{tuple(delta.shape)}")
            deltas.append(delta)
        keys = {int(layer): tensors[f"keys.{layer}"] for layer in info.get("key_layers", [])}
        facts = [fact_from_dict(f) for f in info["facts"]]
        edit = Edit(method=info["method"], facts=facts, new_targets=list(info["new_targets"]), sites=info["sites"],
                    hparams=info["hparams"], deltas=deltas, model=info["model"], keys=keys,
                    stats_key=info.get("stats_key"), timings=info.get("timings", {}), losses=info.get("losses", []),
                    notes=info.get("notes", []), created=info.get("created", 0.0))
    except EditError:
        raise
    except (KeyError, TypeError, ValueError, SafetensorError, LoceditError) as exc:
        raise EditError(f"{directory}: malformed edit ({type(exc).__name__}: {exc})") from None
    return edit


def fact_to_dict(fact: Fact) -> dict:
    return {"subject": fact.subject, "prompt": fact.prompt, "target": fact.target, "relation": fact.relation,
            "meta": json.loads(json.dumps(fact.meta, default=_json_default))}


def fact_from_dict(d: dict) -> Fact:
    return Fact(d["subject"], d["prompt"], d.get("target"), d.get("relation"), d.get("meta") or {})


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _temp_path(directory: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    os.close(fd)
    return Path(tmp)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

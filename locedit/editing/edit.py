"""`Edit`: a weight change as a reversible, saveable object.

An edit is a list of `WeightDelta`s (a low-rank or dense change of one parameter each) plus everything that explains
it: method, facts, new targets, sites, hyper-parameters, timings, the optimisation loss curves and a **model
fingerprint** (the model's geometry and a SHA-256 of the original bytes of every tensor it changes).

Guarantees:
* `apply` is atomic: every new tensor is computed (and checked finite) before any weight is written; an exception
  or KeyboardInterrupt while writing restores what was written.
* `revert` restores the saved original bytes, so it is bit-exact. Edits compose: apply A then B, revert B then A.
  Reverting A while a later edit B changes the same tensor is refused (it would silently drop B).
* Applying an edit twice (the same object, or another with the same content, e.g. one file loaded twice), or to
  a model whose geometry or tensors differ from the fingerprint, is refused. Edits are compared by identity (`is`),
  never by their tensors.

`Edit.save` writes an edit's directory; `locedit.editing.edit_file.load_edit` reads and checks one.
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

from locedit.core.facts import Fact
from locedit.core.results import Result, jsonable, write_atomic
from locedit.errors import EditError


# model -> edits applied to it, oldest first
_APPLIED: "weakref.WeakKeyDictionary[torch.nn.Module, list[Edit]]" = weakref.WeakKeyDictionary()


def applied_edits(lm) -> list["Edit"]:
    """The locedit edits currently applied to `lm`'s model, oldest first."""
    return list(_APPLIED.get(lm.model, []))


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


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (dtype and shape included)."""
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{data.dtype}:{tuple(data.shape)}:".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def geometry(lm) -> dict:
    """What identifies a model's architecture for an edit: family and sizes."""
    return {"family": lm.adapter.family, "num_layers": lm.num_layers, "d_model": lm.d_model,
            "num_heads": lm.num_heads, "num_kv_heads": lm.num_kv_heads, "head_dim": lm.head_dim,
            "vocab_size": lm.vocab_size}


@dataclass(eq=False)
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

    def content_sha256(self) -> str:
        """SHA-256 of what this delta writes: parameter, original fingerprint, orientation and factors (as float32,
        the precision they are saved in, so an edit and its loaded copy agree)."""
        digest = hashlib.sha256(f"{self.name}:{self.original_sha256}:{tuple(self.shape)}:{self.transposed}".encode())
        for part in ("left", "right", "dense"):
            value = getattr(self, part)
            part_sha = tensor_sha256(value.float()) if value is not None else "-"
            digest.update(f"|{part}:{part_sha}".encode())
        return digest.hexdigest()

    def describe(self) -> dict:
        return {"name": self.name, "original_sha256": self.original_sha256, "shape": list(self.shape),
                "transposed": self.transposed, "kind": "dense" if self.dense is not None else "low_rank",
                "rank": self.rank}


@dataclass(eq=False)
class Edit(Result):
    """A fact edit: what changed, why, and how to undo it. Made by `locedit.edit` (applied) or read by
    `locedit.load_edit` (not applied). Compared by identity; `content_sha256()` says whether two hold the same
    change."""

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
    target_sources: list[str] = field(default_factory=list)  # per fact: "given" (fact.target) or "top1"
    hparams_ignored: dict[str, str] = field(default_factory=dict)  # hyper-parameter file keys -> why not used
    _lm: object = field(default=None, repr=False)
    _saved: dict = field(default_factory=dict, repr=False)
    _content: str | None = field(default=None, repr=False)

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
        mine = self.content_sha256()
        if any(other is not self and other.content_sha256() == mine for other in _APPLIED.get(lm.model, [])):
            raise EditError("an edit with the same content is already applied to this model (e.g. the same file "
                            "loaded twice); revert that one or apply this edit to another model")
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
        index = next((i for i, e in enumerate(stack) if e is self), None)
        if index is None:
            raise EditError(f"{self!r} is marked applied but is not on its model's edit stack")
        later = stack[index + 1:]
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
        del stack[index]
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

    def content_sha256(self) -> str:
        """SHA-256 of the weight change (every delta's parameter, fingerprint and factors); the same for an edit
        and its saved-and-loaded copy."""
        if self._content is None:
            digest = hashlib.sha256()
            for delta in self.deltas:
                digest.update(delta.content_sha256().encode())
            self._content = digest.hexdigest()
        return self._content

    # --- Result ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {**edit_info(self), "applied": self.is_applied}

    def summary(self) -> str:
        where = f"heads {self.sites.get('heads')}" if self.method == "head" else f"layer(s) {self.layers}"
        lines = [f"{self.method} edit of {len(self.facts)} fact(s) at {where} "
                 f"({'applied' if self.is_applied else 'not applied'})"]
        for fact, new in list(zip(self.facts, self.new_targets))[:5]:
            lines.append(f"  {fact.prompt!r}: {fact.target!r} -> {new!r}")
        if len(self.facts) > 5:
            lines.append(f"  ... and {len(self.facts) - 5} more")
        lines += [f"  note: {n}" for n in self.notes]
        if self.hparams_ignored:
            lines.append(f"  hyper-parameters ignored: {', '.join(self.hparams_ignored)}")
        return "\n".join(lines)

    def plot(self, ax=None):
        """The optimisation loss of each fact, by step."""
        import matplotlib.pyplot as plt

        fig, ax = (plt.subplots(figsize=(5, 3)) if ax is None else (ax.figure, ax))
        for i, curve in enumerate(self.losses):
            ax.plot(range(len(curve)), curve, label=self.facts[i].subject if i < len(self.facts) else str(i))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{self.method} edit")
        if 1 < len(self.losses) <= 10:
            ax.legend(fontsize=7)
        return fig

    def save(self, path: str | os.PathLike) -> Path:
        """Write `edit.safetensors` (the factors) and `edit.json` (everything else, with a content hash) into
        directory `path`, atomically; `locedit.load_edit` reads it back."""
        return save_edit(self, path)


# --- saving (reading and checking saved edits: locedit.editing.edit_file) ---------------------------------
FORMAT = "locedit-edit"
FORMAT_VERSION = 2  # 2: content_sha256, checked fields
JSON_NAME = "edit.json"
TENSORS_NAME = "edit.safetensors"


def edit_info(edit: Edit) -> dict:
    """Everything about `edit` but its tensors, as JSON types (what `edit.json` holds, without the hashes)."""
    return jsonable({
        "format": FORMAT, "version": FORMAT_VERSION, "method": edit.method,
        "facts": [fact_to_dict(f) for f in edit.facts], "new_targets": list(edit.new_targets),
        "target_sources": list(edit.target_sources), "sites": edit.sites, "hparams": edit.hparams,
        "hparams_ignored": dict(edit.hparams_ignored), "model": edit.model,
        "deltas": [d.describe() for d in edit.deltas],
        "key_layers": sorted(int(k) for k in edit.keys), "stats_key": edit.stats_key,
        "timings": edit.timings, "losses": edit.losses, "notes": edit.notes, "created": edit.created,
    })


def content_sha256(info: dict) -> str:
    """SHA-256 of an `edit.json` mapping with sorted keys, its `content_sha256` field left out."""
    body = {k: v for k, v in info.items() if k != "content_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def save_edit(edit: Edit, path: str | os.PathLike) -> Path:
    """Write `edit` into directory `path`: the tensors to a temporary name, then `edit.json` (which holds their
    hash) atomically, last; nothing half-written is left behind."""
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for i, delta in enumerate(edit.deltas):
        tensors.update(delta.tensors(i))
    for layer, keys in edit.keys.items():
        tensors[f"keys.{int(layer)}"] = keys.detach().float().contiguous().cpu()
    info = json.loads(json.dumps(edit_info(edit), default=str))  # exactly what a reader will parse
    fd, tmp = tempfile.mkstemp(prefix=f".{TENSORS_NAME}.", dir=directory)
    os.close(fd)
    tmp_tensors = Path(tmp)
    try:
        save_file(tensors, str(tmp_tensors), metadata={"format": FORMAT})
        info["tensors_sha256"] = file_sha256(tmp_tensors)
        info["content_sha256"] = content_sha256(info)
        os.replace(tmp_tensors, directory / TENSORS_NAME)
        write_atomic(directory / JSON_NAME, json.dumps(info, indent=1))
    finally:
        if tmp_tensors.exists():
            tmp_tensors.unlink()
    return directory


def fact_to_dict(fact: Fact) -> dict:
    return {"subject": fact.subject, "prompt": fact.prompt, "target": fact.target, "relation": fact.relation,
            "meta": jsonable(fact.meta)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

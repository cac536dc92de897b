"""One interface for every result locedit returns (analyses, `SiteMap`, `Verification`, `Evaluation`, dataset runs).

A result class derives from `Result` and implements `to_dict()` (JSON-ready) and `summary()` (a few lines of
text); it overrides `plot(ax=None)` where it has a figure. `save(path)` writes the JSON atomically, and
`_repr_html_()` lets a notebook display it.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch


def jsonable(value):
    """`value` with tensors, arrays, numpy scalars and dataclasses turned into JSON types (non-finite floats: None)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    return value


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class Result:
    """Base of every result: `to_dict()`, `save(path)`, `plot(ax=None)`, `summary()`, `_repr_html_()`."""

    def to_dict(self) -> dict:  # pragma: no cover - every subclass implements it
        raise NotImplementedError(f"{type(self).__name__} does not implement to_dict()")

    def summary(self) -> str:
        """A few lines of plain text saying what the result shows."""
        return f"{type(self).__name__}"

    def plot(self, ax=None):
        """A matplotlib figure of the result (on `ax` where the figure has one panel)."""
        raise NotImplementedError(f"{type(self).__name__} has no figure")

    def save(self, path: str | os.PathLike) -> Path:
        """Write `to_dict()` as JSON to `path`, atomically; returns the path."""
        return write_atomic(path, json.dumps(jsonable(self.to_dict()), indent=1))

    def _repr_html_(self) -> str:
        lines = html.escape(self.summary()).replace("\n", "<br>")
        return f"<div class='locedit-result'><b>{html.escape(type(self).__name__)}</b><br>{lines}</div>"

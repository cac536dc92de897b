"""`RunStore`: one resumable run's rows, one JSON object per line, keyed by a field.

A row is appended whole, flushed and fsync'd, so an interruption leaves at most a truncated last line; reading
drops it (and rewrites the file without it, atomically). A corrupt line before the last is an error. Several
processes each append to their own shard file (`shard(name)`); `merge()` folds the shards into the main file and
removes them. Where a key has several rows (a re-run), `latest()` keeps the newest: the later one in reading order
(main file, then shards by name), or the one with the greater `newer(row)`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from locedit.errors import DatasetError

Row = dict[str, Any]


def latest(rows: Iterable[Row], key: str = "id", newer: Callable[[Row], Any] | None = None) -> dict[str, Row]:
    """`{row[key]: row}`: a row replaces an earlier one with its key (with `newer`, when `newer(row)` is at least
    the kept row's)."""
    out: dict[str, Row] = {}
    for row in rows:
        k = row[key]
        if newer is None or k not in out or newer(row) >= newer(out[k]):
            out[k] = row
    return out


class RunStore:
    """Keyed JSONL rows in `path`, plus per-process shard files named by `shard_name` (a template with `{name}`,
    the main file's name, `{stem}`, `{suffix}` and `{shard}`: `"{name}.rank{shard}"` gives `out.jsonl.rank0`).
    Every row must be a JSON object with the field `key`."""

    def __init__(self, path: str | os.PathLike, *, key: str = "id", shard_name: str = "{name}.{shard}") -> None:
        self.path = Path(path)
        self.key = key
        self.shard_name = shard_name
        if "{shard}" not in shard_name:
            raise DatasetError(f"shard_name {shard_name!r} must contain '{{shard}}'")

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r}, key={self.key!r})"

    # --- reading -----------------------------------------------------------------------------------------------
    def read(self, *, repair: bool = True) -> tuple[list[Row], bool]:
        """The rows of the main file in file order, and whether a truncated/corrupt last line was dropped (with
        `repair`, the file is then rewritten without it). A corrupt line before the last raises `DatasetError`."""
        if not self.path.exists():
            return [], False
        raw = self.path.read_bytes()
        pieces = raw.split(b"\n")
        rows: list[Row] = []
        dropped = False
        for number, piece in enumerate(pieces, start=1):
            if not piece.strip():
                continue
            try:
                value = json.loads(piece)
                if not isinstance(value, dict) or self.key not in value:
                    raise ValueError(f"not a row with the field {self.key!r}")
            except ValueError as e:
                if any(p.strip() for p in pieces[number:]):
                    raise DatasetError(f"{str(self.path)!r} line {number} is corrupt ({e}); only a truncated last "
                                       "line is repaired automatically") from None
                dropped = True
                continue
            rows.append(value)
        if repair and (dropped or (raw and not raw.endswith(b"\n"))):
            self.rewrite(rows)
        return rows, dropped

    def read_all(self, *, repair: bool = True) -> list[Row]:
        """The rows of the main file, then of every shard (by file name)."""
        rows = self.read(repair=repair)[0]
        for shard in self.shards():
            rows += shard.read(repair=repair)[0]
        return rows

    def latest(self, newer: Callable[[Row], Any] | None = None) -> dict[str, Row]:
        """`latest(self.read_all())`: one row per key, the newest."""
        return latest(self.read_all(), self.key, newer)

    def keys(self) -> set[str]:
        """The keys with a row in the main file or any shard."""
        return {row[self.key] for row in self.read_all()}

    # --- writing -----------------------------------------------------------------------------------------------
    def append(self, rows: Row | Sequence[Row]) -> None:
        """Append one row or several, each a whole line, flushed and fsync'd. A truncated last line left by an
        interrupted writer is removed first, so a new row never joins it."""
        batch = [rows] if isinstance(rows, dict) else list(rows)
        for row in batch:
            if self.key not in row:
                raise DatasetError(f"a row of {str(self.path)!r} needs the field {self.key!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._ends_open():
            self.read()
        with open(self.path, "a", encoding="utf-8") as f:
            for row in batch:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def writer(self) -> "_Writer":
        """A context manager whose `add(row)` appends rows through one open file (for many rows in a loop)."""
        return _Writer(self)

    def rewrite(self, rows: Iterable[Row]) -> None:
        """Replace the main file by `rows`, atomically (a temporary file and a rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _ends_open(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() == 0:
                    return False
                f.seek(-1, os.SEEK_END)
                return f.read(1) != b"\n"
        except FileNotFoundError:
            return False

    # --- shards ------------------------------------------------------------------------------------------------
    def _shard_file(self, shard: str) -> str:
        p = self.path
        return self.shard_name.format(name=p.name, stem=p.stem, suffix=p.suffix, shard=shard)

    def shard(self, name: str | int) -> "RunStore":
        """The store of one process's shard file (same key)."""
        return RunStore(self.path.with_name(self._shard_file(str(name))), key=self.key, shard_name=self.shard_name)

    def shards(self) -> list["RunStore"]:
        """The shard files present, by file name."""
        pattern = self._shard_file("*")
        return [RunStore(p, key=self.key, shard_name=self.shard_name)
                for p in sorted(self.path.parent.glob(pattern)) if p != self.path and not p.name.endswith(".tmp")]

    def merge(self, order: Sequence[str] | None = None) -> list[Row] | None:
        """Fold every shard into the main file (atomically), then remove the shards; returns the merged rows (None,
        touching nothing, when there is no shard and no `order`). Each key keeps its first row (main file, then
        shards by name): a finished row is never replaced by a duplicate. With `order`, those keys come first in
        that order, the others after in the order found."""
        shards = self.shards()
        if not shards and order is None:
            return None
        rows: dict[str, Row] = {}
        for row in self.read_all():
            rows.setdefault(row[self.key], row)
        if order is not None:
            wanted = [k for k in order if k in rows]
            chosen = set(wanted)
            keys = wanted + [k for k in rows if k not in chosen]
        else:
            keys = list(rows)
        merged = [rows[k] for k in keys]
        self.rewrite(merged)
        for shard in shards:
            shard.path.unlink()
        return merged


class _Writer:
    """`RunStore.writer()`: rows appended through one open file, each flushed and fsync'd."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self._file = None

    def __enter__(self) -> "_Writer":
        store = self.store
        store.path.parent.mkdir(parents=True, exist_ok=True)
        if store._ends_open():
            store.read()
        self._file = open(store.path, "a", encoding="utf-8")
        return self

    def add(self, row: Row) -> None:
        """Append one row as a whole line, flushed and fsync'd."""
        if self.store.key not in row:
            raise DatasetError(f"a row of {str(self.store.path)!r} needs the field {self.store.key!r}")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def __exit__(self, *exc) -> None:
        self._file.close()

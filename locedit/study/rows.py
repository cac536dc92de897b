"""The study's rows: one `RunStore` of per-process shards `rows-<pid>.jsonl`, keyed by "key"; a re-run's row (a
later "t") replaces an older one."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

from locedit.core.store import RunStore, latest
from locedit.study.policies import FIXED_POLICIES, policy_key


def rows_store(out: str | Path) -> RunStore:
    """The store of a study directory: rows keyed by "key", one shard `rows-<name>.jsonl` per worker process."""
    return RunStore(Path(out) / "rows.jsonl", key="key", shard_name="{stem}-{shard}{suffix}")


def _rekeyed(row: dict) -> dict:
    if row.get("phase") == "heldout" and row.get("policy") in FIXED_POLICIES and row.get("layer") is not None:
        row["key"] = policy_key(row["fact"], row["policy"], row["layer"])  # rows written before keys had it
    return row


def read_rows(out: str | Path) -> dict[str, dict]:
    """`{key: row}` of every shard of the study in `out` (a truncated last line is repaired); fixed-policy rows
    written before their keys named the layer are read under a key that does."""
    rows = [_rekeyed(r) for r in rows_store(out).read_all()]
    return latest(rows, "key", newer=lambda r: r.get("t", 0))


def sequential_key(chain: str, method: str, n: int) -> str:
    """A sequential checkpoint's key: the chain (its length and edit layer) is part of it, so a longer chain or a
    re-tuned layer never reuses a shorter chain's checkpoints."""
    return f"sequential|{chain}|{method}|{n}"


def chain_complete(rows: Iterable[Mapping], chain: str, method: str, n_facts: int) -> bool:
    """Whether a sequential chain ran to its end: one of its checkpoints attempted every fact (edits the model
    already made, which are skipped, make the last checkpoint's `n_edits` smaller than the chain)."""
    return any(r.get("phase") == "sequential" and r.get("chain") == chain and r.get("policy") == method
               and r.get("attempted", 0) >= n_facts for r in rows)


def latest_chains(rows: Iterable[Mapping]) -> dict[str, list]:
    """Per method, the checkpoints of its longest sequential chain (rows before chains were named count as one
    chain), in edit order."""
    chains: dict = {}
    for r in rows:
        chains.setdefault(r["policy"], {}).setdefault(r.get("chain", "unnamed"), []).append(r)
    out = {}
    for method, by_chain in chains.items():
        longest = max(by_chain.values(), key=lambda pts: max(p["n_edits"] for p in pts))
        out[method] = sorted(longest, key=lambda r: r["n_edits"])
    return out

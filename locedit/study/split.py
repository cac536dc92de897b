"""Deterministic fact selection: a relation-stratified split by sha256(id), round-robin subsets, sequential chains."""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Hashable, Sequence

Item = Any


def fact_hash(fact_id: Hashable) -> str:
    """sha256 of the fact id's text: the order every selection here uses."""
    return hashlib.sha256(str(fact_id).encode()).hexdigest()


def _id(x: Item) -> Any:
    return x["id"]


def _relation(x: Item) -> Any:
    return x["relation"]


def split_facts(items: Sequence[Item], *, tuning_fraction: float = 0.3, key: Callable[[Item], Any] = _id,
                relation: Callable[[Item], Any] = _relation) -> tuple[list[Item], list[Item]]:
    """Relation-stratified deterministic split: per relation, items sorted by sha256(id); the first
    round(fraction × n) are tuning, the rest held-out. Returns (tuning, held_out), each sorted by hash."""
    by_relation: dict[str, list] = {}
    for item in items:
        by_relation.setdefault(relation(item) or "-", []).append(item)
    tuning: list[Item] = []
    held_out: list[Item] = []
    for name in sorted(by_relation):
        group = sorted(by_relation[name], key=lambda x: fact_hash(key(x)))
        k = int(round(tuning_fraction * len(group)))
        tuning += group[:k]
        held_out += group[k:]

    def order(x: Item) -> str:
        return fact_hash(key(x))

    return sorted(tuning, key=order), sorted(held_out, key=order)


def stratified_subset(items: Sequence[Item], n: int, *, key: Callable[[Item], Any] = _id,
                      relation: Callable[[Item], Any] = _relation) -> list[Item]:
    """`n` items, round-robin over relations (each relation in hash order): the same subset on every run."""
    by_relation: dict[str, list] = {}
    for item in sorted(items, key=lambda x: fact_hash(key(x))):
        by_relation.setdefault(relation(item) or "-", []).append(item)
    lists = [list(by_relation[r]) for r in sorted(by_relation)]
    chosen: list[Item] = []
    while len(chosen) < n and any(lists):
        for group in lists:
            if group and len(chosen) < n:
                chosen.append(group.pop(0))
    return chosen


def sequential_chain(split: dict, extra: list[dict], n: int, probes: Sequence[str]) -> list[str]:
    """The facts of a sequential chain, in order: the held-out facts, then the tuning facts outside the retention
    probes (all known at top-1), then, when `n` needs more, facts the model does not know at top-1 (`extra`: id
    and relation), each group in relation-stratified hash order. `split`: {"tuning", "held_out", "relation"}."""
    rel = split["relation"]

    def as_items(ids: Sequence[str]) -> list[dict]:
        return [{"id": i, "relation": rel[i]} for i in ids]

    chain = [x["id"] for x in stratified_subset(as_items(split["held_out"]), len(split["held_out"]))]
    chain += [x["id"] for x in stratified_subset(as_items(split["tuning"]), len(split["tuning"]))
              if x["id"] not in probes]
    chain += [x["id"] for x in stratified_subset(extra, len(extra)) if x["id"] not in chain and x["id"] not in probes]
    return chain[:n]

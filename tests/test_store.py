"""core/store.py: keyed JSONL rows, atomic appends, truncated-line repair, replace-by-key, shards and merge."""

import json

import pytest

from locedit.core.store import RunStore, latest
from locedit.errors import DatasetError


def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_append_and_read_round_trip(tmp_path):
    store = RunStore(tmp_path / "sub" / "runs.jsonl")
    assert store.read() == ([], False) and store.read_all() == []
    store.append({"id": "a", "x": 1})
    with store.writer() as w:
        w.add({"id": "b", "x": 2})
        w.add({"id": "c", "x": 3})
    store.append([{"id": "d"}, {"id": "e"}])
    rows, repaired = store.read()
    assert [r["id"] for r in rows] == ["a", "b", "c", "d", "e"] and not repaired
    assert store.keys() == {"a", "b", "c", "d", "e"}
    with pytest.raises(DatasetError, match="needs the field 'id'"):
        store.append({"x": 1})
    assert len(lines(store.path)) == 5


def test_truncated_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "resu')
    store = RunStore(path)
    rows, repaired = store.read()
    assert [r["id"] for r in rows] == ["a", "b"] and repaired
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'            # rewritten without it
    assert store.read() == (rows, False)
    # a complete last line without its newline is kept, and the file gets the newline back
    path.write_text('{"id": "a"}\n{"id": "b"}')
    assert [r["id"] for r in store.read()[0]] == ["a", "b"] and path.read_text().endswith("}\n")


def test_read_without_repair_leaves_the_file(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\n{"id": ')
    rows, dropped = RunStore(path).read(repair=False)
    assert [r["id"] for r in rows] == ["a"] and dropped and path.read_text() == '{"id": "a"}\n{"id": '


def test_append_after_a_truncated_line_never_joins_it(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "x"')
    store = RunStore(path)
    store.append({"id": "c"})
    assert [r["id"] for r in lines(path)] == ["a", "c"]


def test_corrupt_line_before_the_last_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(DatasetError, match="line 2 is corrupt"):
        RunStore(path).read()
    path.write_text('{"id": "a"}\n{"other": 1}\n{"id": "b"}\n')           # a row without the key field
    with pytest.raises(DatasetError, match="line 2 is corrupt"):
        RunStore(path).read()


def test_two_shards_merge_in_the_requested_order(tmp_path):
    store = RunStore(tmp_path / "out.jsonl", shard_name="{name}.rank{shard}")
    store.append({"id": "f0", "v": "main"})
    store.shard(0).append([{"id": "f2"}, {"id": "f0", "v": "dup"}])
    store.shard(1).append({"id": "f1"})
    store.shard(1).path.write_text(store.shard(1).path.read_text() + '{"id": "f3", "tr')   # a torn shard
    assert [s.path.name for s in store.shards()] == ["out.jsonl.rank0", "out.jsonl.rank1"]
    assert store.keys() == {"f0", "f1", "f2"}
    merged = store.merge(order=["f1", "f0", "f2"])
    assert [r["id"] for r in merged] == ["f1", "f0", "f2"] and merged[1]["v"] == "main"   # first row kept
    assert [r["id"] for r in lines(store.path)] == ["f1", "f0", "f2"] and store.shards() == []
    assert store.merge() is None                                                          # nothing to merge
    store.shard("w").append({"id": "f9"})
    assert [r["id"] for r in store.merge()] == ["f1", "f0", "f2", "f9"]                   # unordered: appended


def test_shard_names_follow_the_template(tmp_path):
    rows = RunStore(tmp_path / "rows.jsonl", key="key", shard_name="{stem}-{shard}{suffix}")
    assert rows.shard(123).path.name == "rows-123.jsonl"
    results = RunStore(tmp_path / "results.jsonl", shard_name="{stem}.w{shard}{suffix}")
    assert results.shard(0).path.name == "results.w0.jsonl"
    with pytest.raises(DatasetError, match="must contain"):
        RunStore(tmp_path / "x.jsonl", shard_name="{name}.rank")


def test_latest_replaces_by_key(tmp_path):
    rows = [{"key": "a", "t": 2.0, "v": 1}, {"key": "b", "v": 2}, {"key": "a", "t": 1.0, "v": 3}]
    assert latest(rows, "key")["a"]["v"] == 3                              # later in reading order
    assert latest(rows, "key", newer=lambda r: r.get("t", 0))["a"]["v"] == 1   # the newer timestamp
    store = RunStore(tmp_path / "rows.jsonl", key="key", shard_name="{stem}-{shard}{suffix}")
    store.shard(9).append(rows[0])
    store.shard(10).append(rows[2])
    assert store.latest(newer=lambda r: r["t"])["a"]["v"] == 1
    assert store.latest()["a"]["v"] == 1                                   # rows-10 reads before rows-9 (by name)

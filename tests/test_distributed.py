"""Datasets over several processes (`torchrun` / `accelerate launch`): each process runs its shard of the facts
into its own JSONL file, the main process merges; the merged file equals a one-process run, and a rerun resumes.
Two CPU processes (gloo), a tiny model saved to a temporary directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import locedit
import tiny

pytestmark = pytest.mark.slow  # starts worker processes (torchrun-style ranks)

FACTS = [
    {"subject": "The Eiffel Tower", "prompt": "The Eiffel Tower is located in the city of", "target": " Paris"},
    {"subject": "Rome", "prompt": "Rome is the capital of", "target": " Italy"},
    {"subject": "Michael Jordan", "prompt": "Michael Jordan plays", "target": " basketball"},
    {"subject": "The Colosseum", "prompt": "The Colosseum is in", "target": " Rome"},
    {"subject": "Big Ben", "prompt": "Big Ben is in", "target": " London"},
]

SCRIPT = textwrap.dedent('''
    import sys, torch
    import locedit
    from locedit.localization import run_dataset
    torch.set_num_threads(1)
    model_dir, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    facts = [locedit.Fact(f["subject"], f["prompt"], f["target"], meta={"id": str(i)})
             for i, f in enumerate(__import__("json").load(open(model_dir + "/facts.json")))][:limit]
    lm = locedit.load(model_dir)
    run = run_dataset(lm, "knockout", facts, out, options={"window": 3}, progress=False)
    # one file per process: the processes' stdout would interleave
    rank = __import__("os").environ.get("RANK", "0")
    open(out + ".result" + rank, "w").write(f"RESULT {len(run.results)} {run.skipped} {run.ran}")
''')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tiny.save(tmp_path_factory.mktemp("tiny_llama"), "llama")
    (path / "facts.json").write_text(json.dumps(FACTS))
    (path / "run.py").write_text(SCRIPT)
    return path


def _torchrun(model_dir: Path, out: Path, limit: int, processes: int = 2) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_port=0",
           "--standalone", str(model_dir / "run.py"), str(model_dir), str(out), str(limit)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    results = []
    for rank in range(processes):  # each process writes its own result file (their stdout would interleave)
        path = Path(f"{out}.result{rank}")
        results.append(path.read_text())
        path.unlink()
    return results


def test_two_process_dataset_run_equals_one_process_and_resumes(model_dir, tmp_path):
    from locedit.localization import run_dataset

    facts = [locedit.Fact(f["subject"], f["prompt"], f["target"], meta={"id": str(i)})
             for i, f in enumerate(FACTS)]
    lm = locedit.load(str(model_dir))
    single = run_dataset(lm, "knockout", facts, tmp_path / "one.jsonl", options={"window": 3}, progress=False,
                         distributed=False)

    out = tmp_path / "two.jsonl"
    assert _torchrun(model_dir, out, limit=3) == ["RESULT 3 0 3"] * 2  # every process returns the merged run
    assert not list(tmp_path.glob("two.jsonl.rank*"))  # shards merged and removed
    assert _torchrun(model_dir, out, limit=5) == ["RESULT 5 3 2"] * 2  # resumed: only the two new facts ran

    merged = [json.loads(line) for line in out.read_text().splitlines()]
    assert [m["id"] for m in merged] == [str(i) for i in range(5)]
    for a, b in zip(merged, single.results):
        assert a["id"] == b["id"]
        for group, values in b["result"]["relative_change"].items():
            assert a["result"]["relative_change"][group] == pytest.approx(values, rel=1e-4, abs=1e-3)

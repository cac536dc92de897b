"""Benchmark the GGUF → float32 dequantization of the built-in SmolLM2 (CPU): transformers' plain path (it parses the
file's metadata three times) against locedit's (`loading._load_gguf`: parsed once), each in its own process, and
check that both give the same weights, config and tokenizer. Wall and CPU seconds; CPU seconds are what an idle
machine's wall time would be for these one-thread runs.

    nice -n 10 python recipes/bench_gguf_convert.py [--record]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "data" / "results" / "bench_gguf_convert.txt"


def worker(mode: str) -> None:
    import torch

    from locedit.core import loading

    path = loading.smollm2_gguf_path()
    start, cpu = time.perf_counter(), time.process_time()
    with (contextlib.nullcontext() if mode == "locedit" else _plain(loading)):
        model, tokenizer = loading._load_gguf(path, torch.float32)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode() + tensor.to(torch.float32).contiguous().numpy().tobytes())
    config = json.loads(model.config.to_json_string())
    digest.update(json.dumps(config, sort_keys=True).encode())
    digest.update(json.dumps(tokenizer("The Eiffel Tower is located in the city of Paris.")["input_ids"]).encode())
    digest.update(str(len(tokenizer)).encode())
    print(json.dumps({"mode": mode, "wall": wall, "cpu": cpu, "digest": digest.hexdigest()[:16]}))


@contextlib.contextmanager
def _plain(loading):
    """transformers' own path: `_gguf_parsed_once` replaced by a no-op."""
    original = loading._gguf_parsed_once
    loading._gguf_parsed_once = contextlib.nullcontext
    try:
        yield
    finally:
        loading._gguf_parsed_once = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    load = os.getloadavg()[0]
    rows = []
    for mode in ("transformers", "locedit"):
        out = subprocess.run([sys.executable, __file__, "--worker", mode], env=env, check=True, capture_output=True,
                             text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    same = rows[0]["digest"] == rows[1]["digest"]
    lines = [f"# {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC SmolLM2 GGUF dequantization, one thread, "
             f"load average before={load:.2f}"]
    for row in rows:
        lines.append(f"{row['mode']:<14} wall {row['wall']:6.1f} s  CPU {row['cpu']:6.1f} s  digest {row['digest']}")
    lines.append(f"CPU ratio {rows[0]['cpu'] / rows[1]['cpu']:.2f}x; weights, config and tokenizer identical: {same}")
    text = "\n".join(lines)
    print(text)
    if args.record:
        with RESULT.open("a") as f:
            f.write(text + "\n\n")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()

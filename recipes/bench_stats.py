"""Benchmark key statistics on SmolLM2 (CPU): the MLP-key second moments of ALL layers in one forward pass (locedit)
against one pass per layer, each stopped after its layer (ROME's `layer_stats` loop), on the same tokens.

Each mode runs in its own process (so peak RSS is its own); times are also given as a ratio to one clean forward
of a 10-token prompt measured in the same run.

    python recipes/bench_stats.py [--tokens 4096] [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULT = Path(__file__).resolve().parent.parent / "data" / "results" / "bench_stats.txt"
CHECK_LAYERS = (0, 14, 29)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args) -> None:
    """One mode in a fresh process: prints a JSON line with its time and peak RSS."""
    import locedit
    from locedit.editing.stats import key_statistics

    torch.set_num_threads(args.threads)
    lm = locedit.load(args.model, validate=False)
    ids = torch.load(args.ids)
    base_rss = rss_mb()
    kinds = ("mlp", "attn_in", "attn_out") if args.worker == "one_all" else ("mlp",)
    start = time.perf_counter()
    if args.worker == "per_layer":
        moments = {}
        for layer in range(lm.num_layers):
            s = key_statistics(lm, [layer], kinds=kinds, corpus=ids, batch_tokens=args.batch_tokens, cache=False,
                               progress=False)
            moments[layer] = s.mlp[layer]
    else:
        s = key_statistics(lm, None, kinds=kinds, corpus=ids, batch_tokens=args.batch_tokens, cache=False,
                           progress=False)
        moments = s.mlp
    seconds = time.perf_counter() - start
    torch.save({layer: moments[layer] for layer in CHECK_LAYERS if layer in moments}, args.out)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": rss_mb(), "rss_after_load_mb": base_rss,
                      "tokens": int(ids.numel())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=4096, help="corpus tokens (default 4096)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true", help=f"write {RESULT.relative_to(RESULT.parents[2])}")
    parser.add_argument("--worker", choices=["one", "one_all", "per_layer"], help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import locedit
    from locedit.editing import corpus as corpus_mod

    torch.set_num_threads(args.threads)
    lm = locedit.load(args.model)
    enc = lm.encode(locedit.Fact("The Eiffel Tower", "The Eiffel Tower is located in the city of"))
    prompt = torch.tensor([enc.input_ids])
    with torch.no_grad():
        lm.model(input_ids=prompt)
        clean = []
        for _ in range(10):
            start = time.perf_counter()
            lm.model(input_ids=prompt)
            clean.append(time.perf_counter() - start)
    t_clean = min(clean)

    seq_len = corpus_mod.seq_len_for(lm, args.batch_tokens)
    start = time.perf_counter()  # sampled cold (no corpus cache) to time the default corpus's one-off cost
    text = corpus_mod.build_corpus(lm, None, args.tokens, seed=args.seed, seq_len=seq_len, cache_root=None,
                                   progress=False)
    t_corpus = time.perf_counter() - start
    del lm

    lines = [f"model {args.model}: {args.tokens} tokens of the default sampled corpus (seed {args.seed}), rows of "
             f"{seq_len}, batch_tokens {args.batch_tokens}, torch threads {args.threads}, CPU",
             f"one clean forward of the {prompt.shape[1]}-token prompt: {t_clean * 1e3:.1f} ms (best of 10)",
             f"sampling the default corpus (one-off, then cached): {t_corpus:.1f} s = "
             f"{args.tokens / t_corpus:.1f} tok/s (KV cache, {corpus_mod.GEN_BATCH} sequences per batch)"]
    print("\n".join(lines), flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = os.path.join(tmp, "ids.pt")
        torch.save(text.ids, ids_path)
        for mode in ("one", "one_all", "per_layer"):
            out_path = os.path.join(tmp, f"{mode}.pt")
            proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--ids", ids_path, "--out", out_path,
                                   "--model", args.model, "--threads", str(args.threads),
                                   "--batch-tokens", str(args.batch_tokens)],
                                  capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if proc.returncode != 0:
                sys.exit(f"worker {mode} failed:\n{proc.stderr}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[mode]["moments"] = torch.load(out_path)
    diff = max((results["one"]["moments"][l] - results["per_layer"]["moments"][l]).abs().max().item()
               for l in CHECK_LAYERS)
    names = {"one": "all 30 layers, one pass (mlp)", "one_all": "all 30 layers, one pass (mlp+attn_in+attn_out)",
             "per_layer": "one pass per layer (mlp), 30 passes"}
    for mode, r in results.items():
        tps = r["tokens"] / r["seconds"]
        lines.append(f"  {names[mode]:<48} {r['seconds']:8.1f} s = {r['seconds'] / t_clean:7.0f} clean forwards, "
                     f"{tps:7.1f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB "
                     f"(+{r['peak_rss_mb'] - r['rss_after_load_mb']:.0f} MB over the loaded model)")
    ratio = results["per_layer"]["seconds"] / results["one"]["seconds"]
    lines.append(f"  speed-up one pass vs per layer: {ratio:.1f}x; max |difference| of the moments at layers "
                 f"{list(CHECK_LAYERS)}: {diff:.2e}")
    print("\n".join(lines[3:]))
    if args.record:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        command = "python recipes/bench_stats.py " + " ".join(a for a in sys.argv[1:])
        RESULT.write_text(f"# {command}\n" + "\n".join(lines) + "\n")
        print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()

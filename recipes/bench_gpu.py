"""GPU benchmark on randomly initialised models of real sizes (timing needs no trained weights, nothing is
downloaded): GPT-2-XL size (48 layers, d 1600, 25 heads) and Llama-7B size (32 layers, d 4096, 32 heads, MLP
11008), built directly on the GPU in bfloat16 (and float32 for the agreement checks), with the SmolLM2 tokenizer.

Reports per model: adapter validation in bf16 (and how far a no-op run is from the plain forward, in eps), one
clean forward, the attention-knockout sweep vs the official one-forward-per-configuration loop (ratio, agreement),
the bf16 knockout under each SDPA backend and a kernel profile (why bf16 could be slower than fp32), causal trace
per fact, locate per fact (single, dataset mode, and packed: `locate_batch` over 16 facts), peak memory, bf16 vs
fp32 knockout agreement, key statistics, and a ROME / MEMIT edit per fact (when the edit API is there). JSON goes to $OUT/bench_gpu.json (and --json).

    python recipes/bench_gpu.py --tokenizer DIR [--facts 5] [--budget-s 330]      # on the GPU machine
    python recipes/bench_gpu.py --quick --device cpu                               # tiny configs, CPU, minutes

`--tokenizer DIR` holds tokenizer.json and tokenizer_config.json (copied from ~/.cache/locedit/smollm2-135m);
without it the quick mode uses that cache directory or the tests' tiny tokenizer.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import locedit  # noqa: E402
from locedit import Fact  # noqa: E402
from locedit.core.engine import BlockAttention, run  # noqa: E402
from locedit.localization import attention_knockout, causal_trace  # noqa: E402
from locedit.localization.common import resolve_target, window_layers  # noqa: E402
from locedit.localization.knockout import position_groups  # noqa: E402

from bench_facts import FACTS  # noqa: E402

SIZES = {
    "gpt2-xl-size": ("gpt2", dict(n_layer=48, n_embd=1600, n_head=25, n_positions=1024)),
    "llama-7b-size": ("llama", dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                                    num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=4096)),
}
QUICK_SIZES = {
    "gpt2-tiny": ("gpt2", dict(n_layer=4, n_embd=64, n_head=4, n_positions=128)),
    "llama-tiny": ("llama", dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128, max_position_embeddings=128)),
}


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.start = time.perf_counter()
        self.results: dict = {"device": str(self.device), "torch": torch.__version__, "quick": args.quick,
                              "gpu": torch.cuda.get_device_name(0) if self.cuda else None, "models": {}}
        out = os.environ.get("OUT")
        self.json_paths = [Path(p) for p in ([args.json] if args.json else []) +
                           ([os.path.join(out, "bench_gpu.json")] if out else [])]

    # --- helpers -----------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn, repeats: int = 1):
        best, result = float("inf"), None
        for _ in range(repeats):
            self.sync()
            t = time.perf_counter()
            result = fn()
            self.sync()
            best = min(best, time.perf_counter() - t)
        return best, result

    def peak_reset(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self):
        return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if self.cuda else None

    def save(self):
        for path in self.json_paths:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(self.results, indent=1, default=str))
            except OSError as e:
                print(f"could not write {path}: {e}", file=sys.stderr)

    def section(self, record: dict, name: str, fn, need_s: float = 10.0):
        """Run one section; record its result or its error; skip it when the time budget is nearly spent (or when
        `--sections` leaves it out)."""
        if self.args.sections and name not in self.args.sections:
            return None
        if self.left() < need_s:
            record[name] = {"skipped": f"time budget ({self.left():.0f} s left)"}
            print(f"  [{name}] skipped: time budget", flush=True)
            return None
        t = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # a bench reports, it does not stop
            record[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)}
            print(f"  [{name}] ERROR {type(e).__name__}: {e}", flush=True)
            value = None
        else:
            record[name] = value
            print(f"  [{name}] {json.dumps(value, default=str)[:400]}", flush=True)
        record.setdefault("_section_seconds", {})[name] = round(time.perf_counter() - t, 2)
        self.save()
        return value

    # --- models ------------------------------------------------------------------------------------------------
    def build(self, family: str, shape: dict, tokenizer, dtype):
        import transformers as T

        cls = T.GPT2Config if family == "gpt2" else T.LlamaConfig
        ids = dict(bos_token_id=tokenizer.bos_token_id or 0, eos_token_id=tokenizer.eos_token_id or 0)
        config = cls(vocab_size=len(tokenizer), **shape, **ids)
        torch.manual_seed(0)
        with torch.device(self.device):
            model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model.eval()


def eps_units(lm, ids) -> float:
    """|no-op run - plain forward| / max |logit|, in units of the dtype's eps."""
    with torch.no_grad():
        plain = lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0, -1].float()
        out = run(lm, ids, [[]], reuse_prefix=False).logits[0].float()
    return float((out - plain).abs().max() / plain.abs().max().clamp(min=1.0)) / torch.finfo(lm.dtype).eps


def knockout_rows(lm, enc, window: int = 9):
    rows, keys = [], []
    for name, positions in position_groups(enc, "default").items():
        for layer in range(lm.num_layers):
            if positions:
                rows.append([BlockAttention(window_layers(layer, window, lm.num_layers), [enc.positions.last],
                                            positions)])
                keys.append((name, layer))
    return rows, keys


def official_loop(bench, lm, enc, target, rows, sample: int):
    """One full forward per configuration, batch 1 (the paper's code), on `sample` evenly spread configurations;
    the time is extrapolated to all of them."""
    chosen = sorted(set(np.linspace(0, len(rows) - 1, min(sample, len(rows))).astype(int).tolist()))
    probs = []
    bench.sync()
    t = time.perf_counter()
    with torch.no_grad():
        for i in chosen:
            probs.append(run(lm, enc, [rows[i]], reuse_prefix=False).prob_of(target.token_id)[0])
    probs = torch.stack(probs).float().cpu()
    seconds = (time.perf_counter() - t) * len(rows) / len(chosen)
    return seconds, chosen, probs


def bench_model(bench: Bench, name: str, family: str, shape: dict, tokenizer):
    args = bench.args
    rec: dict = {"family": family, "shape": shape}
    bench.results["models"][name] = rec
    print(f"== {name} ({family}, {shape})", flush=True)
    facts = FACTS[: args.facts]

    # build float32 first, bfloat16 as a copy (the same weights for the agreement checks)
    bench.peak_reset()
    t, m32 = bench.timed(lambda: bench.build(family, shape, tokenizer, torch.float32))
    t16, m16 = bench.timed(lambda: copy.deepcopy(m32).to(torch.bfloat16))
    rec["build_s"] = {"float32": round(t, 2), "bfloat16_copy": round(t16, 2)}
    rec["parameters_b"] = round(sum(p.numel() for p in m16.parameters()) / 1e9, 3)

    def load(model):
        try:
            return locedit.load((model, tokenizer)), None
        except locedit.UnsupportedModelError as e:
            return locedit.load((model, tokenizer), validate=False), str(e)

    lm16, err16 = load(m16)
    lm32, err32 = load(m32)
    enc0 = lm16.encode(facts[0])
    rec["validation"] = {"bfloat16": err16 or "ok", "float32": err32 or "ok",
                         "noop_eps_bfloat16": round(eps_units(lm16, enc0.input_ids), 3),
                         "noop_eps_float32": round(eps_units(lm32, enc0.input_ids), 3),
                         "tolerance_eps": locedit.core.lm.VALIDATION_EPS}
    print(f"  validation {rec['validation']}", flush=True)
    bench.save()

    def clean():
        out = {}
        for label, lm in (("bfloat16", lm16), ("float32", lm32)):
            ids = torch.tensor([enc0.input_ids], device=lm.device)
            with torch.no_grad():
                for _ in range(3):
                    lm.model(input_ids=ids)
                times = []
                for _ in range(10):
                    times.append(bench.timed(lambda: lm.model(input_ids=ids))[0])
            out[label + "_ms"] = round(1e3 * statistics.median(times), 2)
        out["prompt_tokens"] = len(enc0)
        return out

    clean_ms = bench.section(rec, "clean_forward", clean, need_s=5) or {}

    def knockout():
        out = {"per_fact": []}
        for fact in facts[: max(1, min(len(facts), 2 if not args.quick else 1))]:
            row = {}
            for label, lm in (("bfloat16", lm16), ("float32", lm32)):
                enc = lm.encode(fact)
                target = resolve_target(lm, enc)
                attention_knockout(lm, enc, target=target)  # warm-up
                bench.peak_reset()
                t_sweep, result = bench.timed(lambda: attention_knockout(lm, enc, target=target), repeats=2)
                peak = bench.peak_gib()
                rows, keys = knockout_rows(lm, enc)
                t_loop, chosen, loop_p = official_loop(bench, lm, enc, target, rows, args.loop_sample)
                batched_p = torch.tensor([result.probs[keys[i][0]][keys[i][1]] for i in chosen])
                row[label] = {"sweep_s": round(t_sweep, 4), "loop_s_extrapolated": round(t_loop, 3),
                              "ratio": round(t_loop / t_sweep, 2), "configurations": len(rows),
                              "clean_forwards": round(1e3 * t_sweep / clean_ms.get(label + "_ms", float("nan")), 2),
                              "max_abs_diff_vs_loop_pp": round(100 * float((batched_p - loop_p).abs().max()), 4),
                              "peak_gib": peak, "curves": result.relative_change, "base_prob": result.base_prob,
                              "target_id": result.target_id}
            a, b = row["bfloat16"], row["float32"]
            row["bf16_vs_fp32"] = {"same_target": a["target_id"] == b["target_id"],
                                   "max_abs_diff_pp": round(max(
                                       float(np.nanmax(np.abs(np.subtract(a["curves"][g], b["curves"][g]))))
                                       for g in a["curves"]), 3) if a["target_id"] == b["target_id"] else None}
            for label in ("bfloat16", "float32"):
                row[label].pop("curves")
            out["per_fact"].append(row)
        return out

    bench.section(rec, "knockout", knockout, need_s=20)

    def backends():
        """The bf16 knockout sweep under each SDPA backend, and with eager attention: which kernel path costs."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        enc = lm16.encode(facts[0])
        target = resolve_target(lm16, enc)
        variants = {"default": None,
                    "no_cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
                    "efficient_only": [SDPBackend.EFFICIENT_ATTENTION], "math_only": [SDPBackend.MATH]}
        out = {}
        for label, allowed in variants.items():
            try:
                if allowed is None:
                    fn = lambda: attention_knockout(lm16, enc, target=target)  # noqa: E731
                else:
                    def fn(allowed=allowed):
                        with sdpa_kernel(allowed):
                            return attention_knockout(lm16, enc, target=target)
                fn()
                out[label + "_s"] = round(bench.timed(fn, repeats=2)[0], 4)
            except Exception as e:
                out[label + "_s"] = f"{type(e).__name__}: {str(e)[:120]}"
        impl = lm16.model.config._attn_implementation
        try:
            lm16.model.config._attn_implementation = "eager"
            attention_knockout(lm16, enc, target=target)
            out["eager_s"] = round(bench.timed(lambda: attention_knockout(lm16, enc, target=target), repeats=2)[0], 4)
        finally:
            lm16.model.config._attn_implementation = impl
        return out

    bench.section(rec, "knockout_sdpa_backends_bf16", backends, need_s=20)

    def profile():
        from torch.profiler import ProfilerActivity, profile as torch_profile

        out = {}
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
        for label, lm in (("bfloat16", lm16), ("float32", lm32)):
            enc = lm.encode(facts[0])
            target = resolve_target(lm, enc)
            with torch_profile(activities=activities) as prof:
                attention_knockout(lm, enc, target=target)
                bench.sync()
            key = "self_cuda_time_total" if bench.cuda else "self_cpu_time_total"
            events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key.replace("cuda", "device"),
                                                                            getattr(e, key, 0)))
            out[label] = [{"name": e.key[:90], "count": e.count,
                           "self_ms": round(getattr(e, key.replace("cuda", "device"), getattr(e, key, 0)) / 1e3, 3)}
                          for e in events[:12]]
        return out

    bench.section(rec, "knockout_kernel_profile", profile, need_s=20)

    def trace():
        out = {}
        for label, lm in (("bfloat16", lm16),):
            times = []
            bench.peak_reset()
            for fact in facts[: max(1, min(len(facts), 3))]:
                enc = lm.encode(fact)
                times.append(bench.timed(lambda: causal_trace(lm, enc, kind="hidden", samples=10))[0])
            out[label] = {"per_fact_s": [round(x, 3) for x in times], "peak_gib": bench.peak_gib(),
                          "samples": 10, "kind": "hidden"}
        return out

    bench.section(rec, "causal_trace", trace, need_s=30)

    def locate_():
        from locedit.localization.sites import locate, locate_dataset

        out = {}
        lm = lm16
        locate(lm, facts[0])  # warm-up
        bench.peak_reset()
        times, tops = [], []
        for fact in facts:
            t, sites = bench.timed(lambda: locate(lm, fact))
            times.append(t)
            tops.append({"mlp": sites.mlp_layers[0]["layer"], "head": [sites.heads[0]["layer"], sites.heads[0]["head"]],
                         "target_id": sites.target_id})
        out["single_per_fact_s"] = [round(x, 3) for x in times]
        out["single_mean_s"] = round(statistics.mean(times), 3)
        out["peak_gib"] = bench.peak_gib()
        out["top_sites_bf16"] = tops
        with tempfile.TemporaryDirectory() as tmp:
            t, _ = bench.timed(lambda: locate_dataset(lm, facts, Path(tmp) / "s.jsonl", progress=False))
        out["dataset_mode_per_fact_s"] = round(t / len(facts), 3)
        out["facts_per_5min_dataset_mode"] = round(300 / (t / len(facts)), 1)
        # fp32 top sites on the same weights (bf16 vs fp32 agreement of locate's ranking), first 3 facts
        agree = []
        for fact, top in list(zip(facts, tops))[:3]:
            s32 = locate(lm32, fact)
            agree.append({"same_target": s32.target_id == top["target_id"],
                          "mlp": s32.mlp_layers[0]["layer"] == top["mlp"],
                          "head": [s32.heads[0]["layer"], s32.heads[0]["head"]] == top["head"]})
        out["bf16_vs_fp32_top_agreement"] = agree
        return out

    bench.section(rec, "locate", locate_, need_s=40)

    def locate_packed():
        """locate_batch: every fact's rows packed into shared forward passes (what locate_dataset does by default),
        16 facts per call (the given facts repeated), against the single-fact top sites."""
        from locedit.localization.sites import locate, locate_batch

        lm = lm16
        out = {}
        locate_batch(lm, facts[:2])  # warm-up (kernels and masks of packed shapes)
        bench.peak_reset()
        many = (facts * (16 // len(facts) + 1))[:16]
        t, maps = bench.timed(lambda: locate_batch(lm, many))
        out["facts"] = len(many)
        out["packed_per_fact_s"] = round(t / len(many), 3)
        out["facts_per_5min_packed"] = round(300 / (t / len(many)), 1)
        out["peak_gib"] = bench.peak_gib()
        single = rec.get("locate", {}).get("top_sites_bf16") or []
        out["top_sites_equal_single"] = [
            {"mlp": m.mlp_layers[0]["layer"] == top["mlp"],
             "head": [m.heads[0]["layer"], m.heads[0]["head"]] == top["head"]}
            for m, top in zip(maps, single)]
        if not single:  # the single-fact section was skipped: one single locate to compare with
            s1 = locate(lm, facts[0])
            out["top_sites_equal_single"] = [{"mlp": s1.mlp_layers[0]["layer"] == maps[0].mlp_layers[0]["layer"]}]
        return out

    bench.section(rec, "locate_packed", locate_packed, need_s=40)

    stats_holder = {}

    def stats():
        try:
            from locedit.editing.stats import key_statistics
        except (ImportError, AttributeError) as e:
            print(f"  key statistics API not available ({e})", flush=True)
            return {"available": False, "error": str(e)}
        layer = lm16.num_layers // 4
        tokens = 2048 if args.quick else args.stats_tokens
        bench.peak_reset()
        t, st = bench.timed(lambda: key_statistics(lm16, layers=[layer], kinds=("mlp",), tokens=tokens, cache=False,
                                                   progress=False))
        stats_holder["stats"] = st
        return {"available": True, "layer": layer, "tokens": tokens, "seconds": round(t, 3),
                "peak_gib": bench.peak_gib()}

    bench.section(rec, "key_statistics", stats, need_s=30)

    def edits():
        try:
            edit_fn, request = locedit.edit, locedit.EditRequest
        except AttributeError as e:
            print("  edit API not available (locedit.edit / locedit.EditRequest missing)", flush=True)
            return {"available": False, "error": f"edit API not available: {e}"}
        layer = lm16.num_layers // 4
        out = {"available": True, "layer": layer}
        st = stats_holder.get("stats")
        # explicit true targets: a random-init model's own top-1 may be a blank token
        targeted = [Fact(f.subject, f.prompt, " Paris") for f in facts]
        fact = targeted[0]
        for method, call in (
                ("rome", lambda: edit_fn(lm16, request(fact, " Rome"), method="rome", layers=[layer], stats=st)),
                ("memit", lambda: edit_fn(lm16, [request(f, " Rome") for f in targeted], method="memit",
                                               layers=[layer], stats=st))):
            try:
                bench.peak_reset()
                t, e = bench.timed(call)
                out[method] = {"seconds": round(t, 3), "facts": len(getattr(e, "facts", [fact])),
                               "peak_gib": bench.peak_gib()}
                if getattr(e, "is_applied", False):
                    e.revert()
            except (ImportError, AttributeError, NotImplementedError) as err:
                print(f"  edit API not available for {method}: {err}", flush=True)
                out[method] = {"error": f"edit API not available: {type(err).__name__}: {err}"}
            except Exception as err:
                out[method] = {"error": f"{type(err).__name__}: {err}"}
                print(f"  edit {method} failed: {type(err).__name__}: {err}", flush=True)
        return out

    bench.section(rec, "edit", edits, need_s=20)

    del lm16, lm32, m16, m32
    gc.collect()
    if bench.cuda:
        torch.cuda.empty_cache()


def table(results: dict) -> str:
    lines = [f"device {results['device']} ({results.get('gpu')}), torch {results['torch']}"]
    head = f"{'model':16s} {'clean bf16':>10s} {'KO sweep':>9s} {'loop/sweep':>10s} {'KO fwd':>7s} " \
           f"{'bf16-fp32 pp':>12s} {'trace/fact':>10s} {'locate/fact':>11s} {'dataset/fact':>12s} " \
           f"{'packed/fact':>11s} {'peak GiB':>8s}"
    lines.append(head)
    for name, rec in results["models"].items():
        def get(*path, default="-"):
            value = rec
            for p in path:
                if not isinstance(value, (dict, list)):
                    return default
                try:
                    value = value[p]
                except (KeyError, IndexError, TypeError):
                    return default
            return value
        ko = get("knockout", "per_fact", 0, "bfloat16", default={})
        diff = get("knockout", "per_fact", 0, "bf16_vs_fp32", "max_abs_diff_pp")
        trace = get("causal_trace", "bfloat16", "per_fact_s", default=[])
        peak = max([x for x in (get("locate", "peak_gib", default=None), get("causal_trace", "bfloat16", "peak_gib",
                                                                              default=None)) if x] or [0])
        lines.append(f"{name:16s} {str(get('clean_forward', 'bfloat16_ms')) + ' ms':>10s} "
                     f"{str(ko.get('sweep_s', '-')) + ' s':>9s} {str(ko.get('ratio', '-')) + 'x':>10s} "
                     f"{str(ko.get('clean_forwards', '-')):>7s} {str(diff):>12s} "
                     f"{(str(round(statistics.mean(trace), 3)) + ' s') if trace else '-':>10s} "
                     f"{str(get('locate', 'single_mean_s')) + ' s':>11s} "
                     f"{str(get('locate', 'dataset_mode_per_fact_s')) + ' s':>12s} "
                     f"{str(get('locate_packed', 'packed_per_fact_s')) + ' s':>11s} {peak:>8}")
    for name, rec in results["models"].items():
        lines.append(f"{name}: validation {rec.get('validation')}")
        lines.append(f"{name}: SDPA backends (bf16 sweep) {rec.get('knockout_sdpa_backends_bf16')}")
        lines.append(f"{name}: key statistics {rec.get('key_statistics')}; edit {rec.get('edit')}")
    return "\n".join(lines)


def tokenizer_for(args):
    from transformers import AutoTokenizer

    candidates = [args.tokenizer] if args.tokenizer else []
    candidates.append(str(locedit.core.loading.cache_dir() / "smollm2-135m"))
    for path in candidates:
        if path and (Path(path) / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(path)
    if not args.quick:
        raise SystemExit(f"no tokenizer.json under {candidates}; pass --tokenizer DIR")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny

    return tiny.tokenizer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (+ tokenizer_config.json)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny configs (tests the script on a CPU)")
    parser.add_argument("--facts", type=int, default=5)
    parser.add_argument("--models", default=None, help="comma-separated subset of the sizes")
    parser.add_argument("--loop-sample", type=int, default=40, help="configurations timed in the official loop")
    parser.add_argument("--stats-tokens", type=int, default=16384)
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip sections once this is spent")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    parser.add_argument("--sections", default=None, type=lambda v: set(v.split(",")),
                        help="comma-separated subset of the sections (default: all)")
    args = parser.parse_args()
    if args.quick:
        args.facts = min(args.facts, 3)
        args.loop_sample = min(args.loop_sample, 8)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (agreement numbers)
    bench = Bench(args)
    tokenizer = tokenizer_for(args)
    sizes = QUICK_SIZES if args.quick else SIZES
    if args.models:
        sizes = {k: v for k, v in sizes.items() if k in args.models.split(",")}
    for name, (family, shape) in sizes.items():
        try:
            bench_model(bench, name, family, shape, tokenizer)
        except Exception as e:
            bench.results["models"].setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        bench.save()
    bench.results["total_s"] = round(time.perf_counter() - bench.start, 1)
    bench.save()
    print(table(bench.results))
    print(f"total {bench.results['total_s']} s; JSON: {', '.join(map(str, bench.json_paths)) or '(none)'}")


if __name__ == "__main__":
    main()

"""Time `locedit.verify` for one fact on SmolLM2 (CPU): every behaviour metric and every mechanistic check, before
and after, reported as a ratio to a clean forward of the edit prompt measured in the same run.

The fact is the curated set's Eiffel Tower record (3 paraphrases, 5 neighbourhood prompts, 2 generation prompts),
edited to " Rome" with ROME at the layer `locate` recommends (or --layer); editing and locating are not timed.

    python recipes/bench_verify.py [--layer L] [--repeats 2] [--record]

`--record` writes the result to data/results/bench_verify.txt. Goals: <= 60 clean forwards (issue 19), <= 20 s
(issue 17). Each repeat also times verify with the paired generations off, for the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from unittest import mock
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import locedit  # noqa: E402
from locedit.core.datasets import curated_facts  # noqa: E402
from locedit.verification import verify  # noqa: E402
from locedit.verification.paired import UneditedRows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=None, help="edit layer (default: located)")
    parser.add_argument("--repeats", type=int, default=2, help="timed verify runs (the median is reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", action="store_true", help="write data/results/bench_verify.txt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = locedit.load(args.model)
    record = next(f for f in curated_facts() if f.subject == "Eiffel Tower")
    fact = locedit.Fact(record.subject, record.prompt, " Paris", record.relation, dict(record.meta))
    t = time.perf_counter()
    if args.layer is None:  # the located site (SmolLM2's default edit layer is its measured one, not this)
        sites = locedit.locate(lm, fact)
        edit = locedit.edit(lm, locedit.EditRequest(fact, " Rome"),
                            layers=sites.recommendation["rank_one"]["located_layers"],
                            key_position="carrier", sites=sites)
    else:
        edit = locedit.edit(lm, locedit.EditRequest(fact, " Rome"), layers=[args.layer], key_position="subject_last")
    edit_s = time.perf_counter() - t

    ids = torch.tensor([lm.encode(fact).input_ids])
    with torch.no_grad():
        for _ in range(3):
            lm.model(input_ids=ids)
        forwards = []
        for _ in range(10):
            t = time.perf_counter()
            lm.model(input_ids=ids)
            forwards.append(time.perf_counter() - t)
    forward_s = statistics.median(forwards)

    # alternated, so that both see the same machine load: verify as it runs (both states' greedy generations in one
    # decode loop, `verification.paired`) and with that pairing off (one decode loop per state, as before)
    times, apart_times, ver = [], [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        ver = verify(lm, edit)
        times.append(time.perf_counter() - t)
        with mock.patch.object(UneditedRows, "supports", staticmethod(lambda lm, edit: False)):
            t = time.perf_counter()
            apart = verify(lm, edit)
            apart_times.append(time.perf_counter() - t)
        assert apart.behaviour == ver.behaviour, "paired and unpaired verify disagree"
    verify_s, apart_s = statistics.median(times), statistics.median(apart_times)
    edit.revert()
    b = ver.behaviour
    lines = [
        f"model {args.model}, {torch.get_num_threads()} thread(s); fact {fact.prompt!r} -> ' Rome' "
        f"(ROME at layer(s) {edit.sites['layers']}, edit + locate {edit_s:.1f} s, not timed)",
        f"inputs: {len(fact.meta['paraphrases'])} paraphrases, {len(fact.meta['neighborhood'])} neighbourhood prompts, "
        f"{len(fact.meta['generation_prompts'])} generation prompts; generation 10 / fluency 30 tokens",
        f"clean forward of the edit prompt ({ids.shape[1]} tokens): {1000 * forward_s:.1f} ms (median of 10)",
        f"verify (behaviour + mechanism, before and after): {verify_s:.2f} s (median of {args.repeats}: "
        f"{', '.join(f'{x:.2f}' for x in times)}) = {verify_s / forward_s:.0f} clean forwards (issue 19's goal "
        f"<= 60: {'met' if verify_s / forward_s <= 60 else 'NOT met'}; issue 17's <= 20 s: "
        f"{'met' if verify_s <= 20 else 'NOT met'})",
        f"the same with the states' generations made apart (one decode loop each): {apart_s:.2f} s = "
        f"{apart_s / forward_s:.0f} clean forwards; paired / apart = {verify_s / apart_s:.2f}; results identical",
        "parts (last run): " + ", ".join(f"{k} {v:.2f} s" for k, v in ver.timings.items()),
        f"result: ES {b['efficacy_score']}, PS {b['paraphrase_score']:.2f}, NS {b['neighborhood_score']:.2f} "
        f"(before {b['before']['neighborhood_score']:.2f}), generation efficacy {b['generation_efficacy']:.2f}, "
        f"NKL {b['neighborhood_kl']:.4f}, mechanism "
        + ", ".join(f"{k} {v.get('passed')}" for k, v in ver.mechanism.items() if isinstance(v, dict)),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    print(ver.summary())
    if args.record:
        out = ROOT / "data" / "results" / "bench_verify.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n" + ver.summary() + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()

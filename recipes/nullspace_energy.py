"""How much of the preserved keys AlphaEdit's null-space projector leaves exposed, per layer (issue #18).

AlphaEdit projects each update onto the null space of the preserved keys' second moment C = E[kkᵀ] (the same
corpus statistics ROME and MEMIT use), so that Δk₀ ≈ 0 for the knowledge it should keep. The null space is the
eigenvectors with eigenvalue below an absolute threshold (AlphaEdit's 2e-2); this prints, for the model's MLP keys,
how many dimensions each rule keeps and the share of E[‖k‖²] that lies inside that "null" space (AlphaEdit assumes
it is near 0), for thresholds and for the scale-free rule `nullspace_energy` (the smallest eigenvectors holding at
most that share).

    python recipes/nullspace_energy.py [--model smollm2-135m] [--layers 0 1 2 4] [--record]
"""

from __future__ import annotations

import argparse
from pathlib import Path

RESULT = Path(__file__).resolve().parent.parent / "data" / "results" / "long_run" / "nullspace.txt"
THRESHOLDS = (1e-3, 5e-3, 1e-2, 2e-2)
ENERGIES = (0.01, 0.05)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--record", action="store_true", help=f"also write {RESULT.relative_to(RESULT.parents[3])}")
    args = ap.parse_args(argv)
    import locedit
    from locedit.editing.hparams import read_hparams
    from locedit.editing.rank_one import nullspace_projector, nullspace_summary
    from locedit.editing.stats import key_statistics
    from locedit.errors import LoceditError

    lm = locedit.load(args.model)
    hp = read_hparams("memit", {"nullspace": True}).params
    stats = key_statistics(lm, kinds=("mlp",), layers=args.layers, tokens=hp.stats_tokens, progress=False)
    lines = [f"# python recipes/nullspace_energy.py --model {args.model} --layers {' '.join(map(str, args.layers))}",
             f"model {args.model}: MLP keys' E[kkᵀ] from {stats.tokens} corpus tokens (the editing statistics); per "
             "rule, null-space dimensions / key width and the share of E[‖k‖²] inside the null space", "",
             "| layer | " + " | ".join([f"threshold {t:g}" for t in THRESHOLDS] + [f"energy {e:g}" for e in ENERGIES])
             + " |", "|---|" + "---|" * (len(THRESHOLDS) + len(ENERGIES))]
    for layer in args.layers:
        C = stats.get("mlp", layer)
        cells = []
        for rule in [(t, None) for t in THRESHOLDS] + [(0.0, e) for e in ENERGIES]:
            try:
                s = nullspace_summary(C, nullspace_projector(C, *rule))
                cells.append(f"{s['dims']}/{s['of']}, {100 * s['energy_share']:.1f}%")
            except LoceditError as exc:  # an empty null space is a result here, not a failure
                cells.append(f"empty ({type(exc).__name__})")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.record:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Build the ripple knowledge table, `locedit/data/ripple_table.jsonl` (and its README, data/facts/ripple/README.md):
(subject, Wikidata relation, object, prompt) rows that `locedit.verification.ripple` composes into ripple probes.

Sources, in priority order (the first row of a (subject, relation, object) is kept):
  1. the curated set, data/facts/facts.jsonl (its `relation_pid`);
  2. the held-out set, data/facts/heldout/facts.jsonl (`relation_pid`; both splits: the table holds facts, not
     results; an edit's probes are chosen from it, never a default);
  3. ROME's known_1000 and CounterFact train/val from the shared copies (../shared/data), relations as
     recipes/build_heldout_facts.py infers them (known_1000's ids, then the locality-prompt vote);
  4. the country of the curated set's 14 landmark cities, by hand (CITY_COUNTRY; source "locedit:<city>");
  5. derived: (city, P17 country, X) for each (X, P36 capital, city) of 1-3 with X a country of the curated set
     (source "capital of <source>").

Kept: every curated and held-out fact (the facts locedit edits), and the rows whose subject is the object of some
row (a second hop: "Rome" -> country Italy) or has two or more relations (relation specificity); a (subject,
relation) with two different objects (twin cities, several instruments) in the shared sources is dropped, as is a
row whose object is written in its subject; the first row of a (subject, relation) wins. Deterministic: a rerun
rewrites the files byte-for-byte.

Run:  python recipes/build_ripple_table.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT))
import build_heldout_facts as heldout  # noqa: E402  (the relation inference of the held-out set)

from locedit.verification.ripple import subject_key  # noqa: E402

OUT = ROOT / "locedit" / "data" / "ripple_table.jsonl"
README = ROOT / "data" / "facts" / "ripple" / "README.md"
CURATED = ROOT / "data" / "facts" / "facts.jsonl"
HELDOUT = ROOT / "data" / "facts" / "heldout" / "facts.jsonl"


def counterfact_rows(path: Path, name: str) -> list[dict]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        d = json.loads(line)
        rw = d["requested_rewrite"]
        out.append({"subject": rw["subject"], "relation": d["relation_pid"], "object": rw["target_true"]["str"],
                    "prompt": rw["prompt"].replace("{}", rw["subject"]), "source": f"{name}:{d['case_id']}"})
    return out


def shared_rows(data: Path) -> list[dict]:
    cf = (heldout.read_counterfact(data / "counterfact-train.json", "counterfact-train")
          + heldout.read_counterfact(data / "counterfact-val.json", "counterfact-val"))
    known, seeds = heldout.read_known(data / "known_1000.json")
    labels = heldout.infer_relations(cf + known, seeds)
    heldout.assign_relations(cf, labels)
    return [{"subject": r.subject, "relation": r.relation, "object": r.attribute,
             "prompt": heldout.render(r.template, r.subject), "source": f"{r.source}:{r.source_id}"}
            for r in known + cf if r.relation]


def _ours(row: dict) -> bool:
    return row["source"].split(":")[0] in ("curated", "heldout", "locedit")


# The curated set's landmark cities (its `landmark_city` targets), written by hand from general knowledge as the
# curated set is: their country, which the sources above lack for most of them.
CITY_COUNTRY = {"Paris": "France", "London": "United Kingdom", "Rome": "Italy", "New York": "United States",
                "Barcelona": "Spain", "Moscow": "Russia", "Berlin": "Germany", "Washington": "United States",
                "Beijing": "China", "Venice": "Italy", "Istanbul": "Turkey", "Athens": "Greece",
                "San Francisco": "United States", "Amsterdam": "Netherlands"}


def hand_rows() -> list[dict]:
    return [{"subject": city, "relation": "P17", "object": country, "prompt": f"{city} is located in the country of",
             "source": f"locedit:{city}"} for city, country in CITY_COUNTRY.items()]


def capital_rows(rows: list[dict]) -> list[dict]:
    """(city, P17, country) for every (country, P36 capital, city) whose country is one of the curated set's
    (an object of its P17 or P27 facts; the shared sources' P36 subjects include regions and historical states): a
    country's capital lies in it."""
    countries = {subject_key(r["object"]) for r in rows if _ours(r) and r["source"].startswith("curated")
                 and r["relation"] in ("P17", "P27")}
    return [{"subject": r["object"], "relation": "P17", "object": r["subject"],
             "prompt": f"{r['object']} is located in the country of", "source": f"capital of {r['source']}"}
            for r in rows if r["relation"] == "P36" and subject_key(r["subject"]) in countries]


def build(data: Path) -> tuple[list[dict], Counter]:
    rows = counterfact_rows(CURATED, "curated") + counterfact_rows(HELDOUT, "heldout") + shared_rows(data)
    rows += hand_rows() + capital_rows(rows)
    dropped: Counter = Counter()
    objects: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        if not _ours(r):
            objects[subject_key(r["subject"]), r["relation"]].add(r["object"].strip().casefold())
    seen, unique = set(), []
    for r in rows:  # ours first: a curated or held-out fact wins over the shared sources
        key = (subject_key(r["subject"]), r["relation"])
        if key in seen:
            dropped["(subject, relation) already in the table"] += 1
        elif r["object"].strip().casefold() in r["subject"].casefold():
            dropped["object written in the subject"] += 1
        elif not _ours(r) and len(objects[key]) > 1:
            dropped["(subject, relation) with several objects in the shared sources"] += 1
        else:
            seen.add(key)
            unique.append(r)
    as_object = {subject_key(r["object"]) for r in unique}
    relations: dict[str, set[str]] = defaultdict(set)
    for r in unique:
        relations[subject_key(r["subject"])].add(r["relation"])
    out = []
    for r in unique:
        s = subject_key(r["subject"])
        if s in as_object or len(relations[s]) > 1 or _ours(r):
            out.append(r)
        else:
            dropped["neither a second hop nor a subject with other relations"] += 1
    return out, dropped


def readme(rows: list[dict], dropped: Counter) -> str:
    by_relation = Counter(r["relation"] for r in rows)
    by_source = Counter(r["source"].split(":")[0] for r in rows)
    lines = [
        "# ripple_table.jsonl — the knowledge table of ripple probes",
        "",
        f"`locedit/data/ripple_table.jsonl` (packaged with locedit): {len(rows)} facts `(subject, relation, object, "
        "prompt, source)`, one JSON object a line, that `locedit.verification.ripple` composes into ripple probes "
        "(RippleEdits, Cohen et al. 2024): after an edit s: r → o\\*, a fact (o\\*, r', z) of the table gives the "
        "probe \"s's r∘r'\" → z (a template per relation pair in `locedit/data/ripple_relations.json`), and the "
        "other facts about s give the relation-specificity probes.",
        "",
        "Generated by `python recipes/build_ripple_table.py` (deterministic). Edit the recipe, not the JSONL.",
        "",
        "- `subject`, `object`: as the source writes them (no leading space); `relation`: the Wikidata property id;",
        "- `prompt`: the source's prompt for the fact (the subject written in), used for relation-specificity probes;",
        "- `source`: `curated:<case_id>`, `heldout:<case_id>`, `known_1000:<known_id>`, `counterfact-train:<case_id>`,"
        " `counterfact-val:<case_id>`; `locedit:<city>`: the country of a curated landmark city, written by hand "
        "(CITY_COUNTRY in the recipe); `capital of <source>`: (city, P17, country) derived from the fact "
        "(country, P36, city) of that source (a country's capital lies in it).",
        "",
        "Kept: every curated, held-out and hand-written fact, and a row whose subject is some row's object (a second "
        "hop) or has two or more relations. Left out: "
        + ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) + ".",
        "",
        "Rows by source: " + ", ".join(f"{k} {v}" for k, v in sorted(by_source.items())) + ".",
        "",
        "Rows by relation: " + ", ".join(f"{k} {v}" for k, v in sorted(by_relation.items(),
                                                                       key=lambda kv: (-kv[1], kv[0]))) + ".",
        "",
        "## Attribution and licence",
        "",
        "Derived from the locedit curated set (data/facts/facts.jsonl), the locedit held-out set "
        "(data/facts/heldout/facts.jsonl), ROME's known_1000 and CounterFact (Meng et al. 2022, *Locating and "
        "Editing Factual Associations in GPT*, `kmeng01/rome`, MIT licence); the CounterFact records as split and "
        "flattened by EasyEdit/MEND, copied from the public repository `Jometeorie/KnowledgeSpread` "
        "`data/counterfact/` (Apache-2.0). CounterFact's templates come from ParaRel (Elazar et al. 2021). The "
        "relation inference, the filtering and the composition rules are the locedit project's.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=heldout.DEFAULT_DATA)
    args = parser.parse_args(argv)
    rows, dropped = build(args.data)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    README.parent.mkdir(parents=True, exist_ok=True)
    README.write_text(readme(rows, dropped), encoding="utf-8")
    print(f"{len(rows)} rows -> {OUT}; left out: {dict(dropped)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

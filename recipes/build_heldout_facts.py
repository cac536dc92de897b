"""Build data/facts/heldout/facts.jsonl: a fresh held-out fact set, from public data, that SmolLM2-135M knows.

Sources (copies in ../shared/data, see its README): CounterFact train/val in EasyEdit's flattened format and ROME's
known_1000. A row is kept when the model's greedy next token after the prompt is the true attribute's first token.

How each piece is made (all deterministic; rerunning rewrites the file byte-for-byte):
  * relation: known_1000 rows carry a Wikidata id with their template; a CounterFact record's template is its prompt
    with the subject replaced by `{}`. Templates that known_1000 does not name get their relation by majority vote
    over the records' locality prompts (in these files every locality prompt has the record's own true attribute:
    it is one of CounterFact's neighbourhood prompts, so its template belongs to the same relation).
  * paraphrases: the record's own rephrase prompt (CounterFact) plus the subject in other common templates of its
    relation, chosen by hash.
  * neighbourhood: other subjects of the same relation with the same true attribute (model-known ones first), never
    the fact's own subject nor a prompt that contains it.
  * target_new: CounterFact's `target_new`; for known_1000 rows another attribute of the same relation, chosen by
    hash, whose first token differs from the true one.
  * split: within each relation, facts sorted by sha256(subject + "\\x1f" + relation); the first 30% are "tuning",
    the rest "heldout".

Run:  python recipes/build_heldout_facts.py [--data ../shared/data] [--out data/facts/heldout/facts.jsonl]
(writes README.md next to the output; the model's answers are kept in ~/.cache/locedit/heldout_answers.json, so a
rerun only runs new prompts; `--cache ''` runs them all).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent
# the shared copies sit next to the checkout (../shared/data) or next to a worktree's parent (../../shared/data)
DEFAULT_DATA = next((p for p in (ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data")
                     if p.is_dir()), ROOT.parent / "shared" / "data")
DEFAULT_OUT = ROOT / "data" / "facts" / "heldout" / "facts.jsonl"
CURATED = ROOT / "data" / "facts" / "facts.jsonl"
SOURCES = ("counterfact-train.json", "counterfact-val.json", "known_1000.json")
TUNING_FRACTION = 0.3
MAX_NEIGHBOURS = 5
N_PARAPHRASE_TEMPLATES = 2
MIN_TEMPLATE_COUNT = 10  # a CounterFact template used this often is a relation's common (ParaRel) template

logger = logging.getLogger("build_heldout_facts")


@dataclass
class Record:
    """One source row: where it came from, its subject, its prompt as a `{}` template and its true attribute."""

    source: str
    source_id: str
    subject: str
    template: str
    attribute: str
    target_new: str | None = None
    rephrase: str | None = None
    locality: str | None = None
    relation: str | None = None


# --- reading -------------------------------------------------------------------------------------------------------
def template_of(prompt: str, subject: str) -> str | None:
    """The prompt with its first occurrence of the subject replaced by `{}` (None when the subject is absent)."""
    if not subject or subject not in prompt or "{}" in prompt:
        return None
    return prompt.replace(subject, "{}", 1)


def read_counterfact(path: Path, name: str) -> list[Record]:
    """Records of an EasyEdit-flattened CounterFact file."""
    out = []
    for row in json.loads(path.read_text(encoding="utf-8")):
        template = template_of(row["prompt"], row["subject"])
        if template is None:
            continue
        out.append(Record(name, str(row["case_id"]), row["subject"], template, row["ground_truth"].strip(),
                          target_new=row["target_new"].strip(), rephrase=row.get("rephrase_prompt"),
                          locality=row.get("locality_prompt")))
    return out


def read_known(path: Path) -> tuple[list[Record], dict[str, Counter]]:
    """Records of ROME's known_1000 and, for every template it shows, the relation ids it carries."""
    out, seeds = [], defaultdict(Counter)
    for row in json.loads(path.read_text(encoding="utf-8")):
        template = template_of(row["prompt"], row["subject"])
        if template is None:
            continue
        seeds[template][row["relation_id"]] += 1
        seeds[row["template"]][row["relation_id"]] += 1
        out.append(Record("known_1000", str(row["known_id"]), row["subject"], template, row["attribute"].strip(),
                          relation=row["relation_id"]))
    return out, seeds


# --- relations -----------------------------------------------------------------------------------------------------
def match_template(prompt: str, templates: Iterable[str]) -> tuple[str, str] | None:
    """The most specific template (longest fixed text) that `prompt` instantiates, and the subject it fills in."""
    best = None
    for t in templates:
        head, _, tail = t.partition("{}")
        if len(prompt) > len(head) + len(tail) and prompt.startswith(head) and prompt.endswith(tail):
            if best is None or len(head) + len(tail) > len(best[0]) - 2:
                best = (t, prompt[len(head):len(prompt) - len(tail)])
    return best


def infer_relations(records: Sequence[Record], seeds: dict[str, Counter], *, rounds: int = 5,
                    min_share: float = 0.8) -> dict[str, str]:
    """Template -> relation id. Seeds: templates known_1000 names with one relation. Other templates take the
    relation most of their records' locality prompts show (and vice versa), at least `min_share` of the votes."""
    labels = {t: next(iter(c)) for t, c in seeds.items() if len(c) == 1}
    templates = sorted({r.template for r in records if r.template} | set(seeds))
    matched = {}
    for r in records:
        if r.locality:
            m = match_template(r.locality, templates)
            if m is not None:
                matched[id(r)] = m[0]
    for _ in range(rounds):
        votes: dict[str, Counter] = defaultdict(Counter)
        for r in records:
            other = matched.get(id(r))
            if other is None:
                continue
            if r.template not in labels and other in labels:
                votes[r.template][labels[other]] += 1
            if other not in labels and r.template in labels:
                votes[other][labels[r.template]] += 1
        new = {t: c.most_common(1)[0][0] for t, c in votes.items()
               if t not in seeds and c.most_common(1)[0][1] >= min_share * sum(c.values())}
        if not new:
            break
        labels.update(new)
    return labels


def assign_relations(records: Sequence[Record], labels: dict[str, str]) -> None:
    """Give each record without a relation its template's relation, else its locality prompt's."""
    templates = sorted(labels)
    for r in records:
        if r.relation is not None:
            continue
        if r.template in labels:
            r.relation = labels[r.template]
        elif r.locality:
            m = match_template(r.locality, templates)
            if m is not None:
                r.relation = labels[m[0]]


# --- split, neighbours, new targets --------------------------------------------------------------------------------
def fact_hash(subject: str, relation: str) -> str:
    """sha256 of subject + "\\x1f" + relation, hex."""
    return hashlib.sha256(f"{subject}\x1f{relation}".encode("utf-8")).hexdigest()


def split_of(pairs: Iterable[tuple[str, str]], fraction: float = TUNING_FRACTION) -> dict[tuple[str, str], str]:
    """(subject, relation) -> "tuning" | "heldout": within each relation the first round(fraction * n) pairs in
    hash order are tuning. Independent of input order and of other relations."""
    by_relation: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for pair in set(pairs):
        by_relation[pair[1]].append(pair)
    out = {}
    for relation, items in by_relation.items():
        items.sort(key=lambda p: fact_hash(*p))
        n_tuning = math.floor(fraction * len(items) + 0.5)
        for i, pair in enumerate(items):
            out[pair] = "tuning" if i < n_tuning else "heldout"
    return out


def pick_neighbours(record: Record, pool: Sequence[Record], known: set[tuple[str, str]],
                    k: int = MAX_NEIGHBOURS) -> list[Record]:
    """Up to `k` records of `pool` with the record's relation and true attribute and another subject (one that
    neither contains nor is contained in the record's subject); model-known subjects first, then by hash."""
    own = record.subject.casefold()
    seen, found = set(), []
    for r in pool:
        other = r.subject.casefold()
        if (r.relation != record.relation or r.attribute != record.attribute or other in seen
                or own in other or other in own):
            continue
        seen.add(other)
        found.append(r)
    found.sort(key=lambda r: ((r.subject, r.relation) not in known,
                              fact_hash(record.subject + "\x1f" + r.subject, record.relation or "")))
    return found[:k]


def pick_new_target(record: Record, attributes: Sequence[str], first_token, min_count: int = 3) -> str | None:
    """Another attribute of the record's relation whose first token differs from the true one, by hash. Only
    attributes that at least `min_count` of `attributes` (the relation's records) carry are used, so a stray value
    of the source data is never one (all of them when none is that common)."""
    counts = Counter(attributes)
    common = {a for a, n in counts.items() if n >= min_count} or set(counts)
    true_first = first_token(record.attribute)
    options = sorted(a for a in common if a != record.attribute and first_token(a) != true_first)
    if not options:
        return None
    return options[int(fact_hash(record.subject, record.relation or ""), 16) % len(options)]


def render(template: str, subject: str) -> str:
    """The template with the subject in place of `{}`."""
    return template.replace("{}", subject, 1)


def common_templates(records: Sequence[Record], labels: dict[str, str]) -> dict[str, list[str]]:
    """Relation -> its templates used by at least MIN_TEMPLATE_COUNT records, most used first; a relation with
    too few of those (known_1000's capitals) also gets its templates used at least twice."""
    counts = Counter(r.template for r in records)
    out: dict[str, list[str]] = defaultdict(list)
    ranked = [t for t, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0])) if t in labels]
    for t in ranked:
        if counts[t] >= MIN_TEMPLATE_COUNT:
            out[labels[t]].append(t)
    for t in ranked:
        rel = labels[t]
        if 2 <= counts[t] < MIN_TEMPLATE_COUNT and len(out[rel]) <= N_PARAPHRASE_TEMPLATES:
            out[rel].append(t)
    return out


def paraphrases(record: Record, templates: Sequence[str]) -> list[str]:
    """The rephrase prompt (if any) and the subject in N_PARAPHRASE_TEMPLATES other templates, chosen by hash."""
    own = render(record.template, record.subject)
    out = [record.rephrase] if record.rephrase and record.subject in record.rephrase and record.rephrase != own \
        else []
    others = [t for t in templates if t != record.template]
    others.sort(key=lambda t: fact_hash(record.subject + "\x1f" + t, record.relation or ""))
    for t in others[:N_PARAPHRASE_TEMPLATES]:
        p = render(t, record.subject)
        if p not in out and p != own:
            out.append(p)
    return out


def neighbourhood_prompts(record: Record, neighbours: Sequence[Record],
                          templates: Sequence[str]) -> list[tuple[str, Record]]:
    """(prompt, neighbour): each neighbour in the relation's common templates in turn, the record's own first when
    it is a common one (a known_1000 prompt written for its own subject, "... was founded in 1947 and ...", is never
    reused); a prompt that would contain the record's subject is left out."""
    cycle = ([record.template] if record.template in templates else []) + [t for t in templates
                                                                           if t != record.template]
    out = []
    for j, nb in enumerate(neighbours):
        p = render(cycle[j % len(cycle)], nb.subject)
        if record.subject not in p:
            out.append((p, nb))
    return out


# --- the model -----------------------------------------------------------------------------------------------------
def record_key(record: Record, model: str) -> str:
    """What the model's answer for a record depends on: the model, the prompt and the true attribute."""
    text = json.dumps([model, record.subject, record.template, record.attribute], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def known_records(records: Sequence[Record], model: str, batch: int,
                  cache: Path | None = None) -> tuple[set[int], object]:
    """Indices of the records whose true attribute's first token is the model's greedy next token, and the model's
    tokenizer. With `cache`, each record's answer is kept in a JSON file (a rerun runs only new prompts)."""
    import torch

    import locedit
    from locedit.core.datasets import known_facts
    from locedit.core.facts import Fact
    from locedit.core.results import write_atomic

    torch.set_num_threads(1)
    lm = locedit.load(model)
    keys = [record_key(r, model) for r in records]
    answers: dict[str, bool] = {}
    if cache is not None and cache.is_file():
        answers = json.loads(cache.read_text(encoding="utf-8")).get("answers", {})
    todo = [i for i, k in enumerate(keys) if k not in answers]
    if todo:
        facts = [Fact(records[i].subject, records[i].template, records[i].attribute, meta={"i": i}) for i in todo]
        kept = {f.meta["i"] for f in known_facts(lm, facts, batch=batch)}
        answers.update({keys[i]: i in kept for i in todo})
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, json.dumps({"answers": dict(sorted(answers.items()))}))
    logger.info("%d prompts run, %d answers from the cache", len(todo), len(records) - len(todo))
    return {i for i, k in enumerate(keys) if answers[k]}, lm.tokenizer


# --- building ------------------------------------------------------------------------------------------------------
def curated_subjects(path: Path = CURATED) -> set[str]:
    """The curated set's subjects, casefolded."""
    return {json.loads(line)["requested_rewrite"]["subject"].casefold()
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def candidates(data: Path) -> tuple[list[Record], dict[str, str], Counter]:
    """All source records with a relation (CounterFact train, val, then known_1000), minus curated subjects and
    subjects that contain their own attribute; the template labels; and how many were left out, why."""
    cf = read_counterfact(data / SOURCES[0], "counterfact-train") + read_counterfact(data / SOURCES[1],
                                                                                        "counterfact-val")
    known, seeds = read_known(data / SOURCES[2])
    labels = infer_relations(cf + known, seeds)
    assign_relations(cf, labels)
    curated = curated_subjects()
    dropped: Counter = Counter()
    out = []
    for r in cf + known:
        if r.relation is None:
            dropped["no relation inferred"] += 1
        elif r.subject.casefold() in curated:
            dropped["subject in the curated set"] += 1
        elif r.attribute.casefold() in r.subject.casefold():
            dropped["attribute written in the subject"] += 1
        else:
            out.append(r)
    return out, labels, dropped


def build_rows(records: Sequence[Record], labels: dict[str, str], known_ids: set[int],
               first_token) -> tuple[list[dict], Counter]:
    """The JSONL rows of the known records (`known_ids`: indices into `records`), one per (subject, relation): the
    first known one in `records` order (CounterFact schema plus `split` and provenance)."""
    templates = common_templates(records, labels)
    attributes: dict[str, list[str]] = defaultdict(list)
    for r in records:
        attributes[r.relation].append(r.attribute)
    dropped: Counter = Counter()
    known = {(r.subject, r.relation) for i, r in enumerate(records) if i in known_ids}
    kept, seen = [], set()
    for i, r in enumerate(records):
        if i in known_ids:
            if (r.subject, r.relation) in seen:
                dropped["duplicate (subject, relation): an earlier record kept"] += 1
                continue
            seen.add((r.subject, r.relation))
            kept.append(r)
    news = {}
    for r in kept:
        new = r.target_new if r.target_new else pick_new_target(r, attributes[r.relation], first_token)
        if new is None or new == r.attribute or first_token(new) == first_token(r.attribute):
            dropped["no new target with another first token"] += 1
            continue
        news[r.subject, r.relation] = new
    kept = [r for r in kept if (r.subject, r.relation) in news]
    splits = split_of(news)
    rows = []
    for r in sorted(kept, key=lambda r: (r.relation, fact_hash(r.subject, r.relation))):
        neighbours = pick_neighbours(r, records, known)
        prompts = neighbourhood_prompts(r, neighbours, templates.get(r.relation, []))
        rows.append({
            "case_id": len(rows), "relation_id": r.relation, "relation_pid": r.relation,
            "requested_rewrite": {"prompt": r.template, "subject": r.subject, "target_true": {"str": r.attribute},
                                  "target_new": {"str": news[r.subject, r.relation]}, "relation_id": r.relation},
            "paraphrase_prompts": paraphrases(r, templates.get(r.relation, [])),
            "neighborhood_prompts": [p for p, _ in prompts],
            "neighborhood_subjects": [nb.subject for _, nb in prompts],
            "neighborhood_known": [(nb.subject, nb.relation) in known for _, nb in prompts],
            "split": splits[r.subject, r.relation],
            "source": f"{r.source}:{r.source_id}",
            "target_new_source": "counterfact" if r.target_new else "same-relation attribute",
        })
    return rows, dropped


def write_rows(rows: Sequence[dict], out: Path) -> None:
    """Write the rows as JSONL atomically."""
    from locedit.core.results import write_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


RELATION_NAMES = {
    "P17": "country", "P19": "place of birth", "P20": "place of death", "P27": "country of citizenship",
    "P30": "continent", "P36": "capital", "P37": "official language", "P39": "position held",
    "P101": "field of work", "P103": "native language", "P106": "occupation", "P108": "employer",
    "P127": "owned by", "P131": "located in (administrative)", "P136": "genre", "P138": "named after",
    "P140": "religion", "P159": "headquarters location", "P176": "manufacturer", "P178": "developer",
    "P190": "twin city", "P276": "location", "P364": "original language", "P407": "language of work",
    "P413": "position played", "P449": "original broadcaster", "P463": "member of", "P495": "country of origin",
    "P641": "sport", "P740": "location of formation", "P937": "work location", "P1303": "instrument",
    "P1412": "languages spoken or written"}


def readme_text(rows: Sequence[dict], candidates_dropped: Counter, rows_dropped: Counter, n_candidates: int,
                n_known: int, model: str) -> str:
    """data/facts/heldout/README.md: what the file is, how it was built and its counts per relation and split."""
    counts = Counter((r["relation_id"], r["split"]) for r in rows)
    sources = Counter(r["source"].split(":")[0] for r in rows)
    relations = sorted({r["relation_id"] for r in rows}, key=lambda x: int(x[1:]))
    n_tuning = sum(r["split"] == "tuning" for r in rows)
    nb = Counter(min(len(r["neighborhood_prompts"]), MAX_NEIGHBOURS) for r in rows)
    nb_known = sum(sum(r["neighborhood_known"]) for r in rows)
    nb_all = sum(len(r["neighborhood_known"]) for r in rows)
    lines = [
        "# heldout/facts.jsonl — facts SmolLM2-135M knows, new to the project", "",
        f"{len(rows)} facts ({n_tuning} tuning, {len(rows) - n_tuning} held-out) over {len(relations)} Wikidata "
        f"relations, from public data, none with a subject of the curated set (data/facts/facts.jsonl). Built "
        "before any editing result on them was looked at; the held-out split is for final numbers only, tune on "
        "the tuning split.", "",
        f"Generated by `python recipes/build_heldout_facts.py` (model `{model}`, one CPU thread; deterministic: a "
        "rerun on the same sources rewrites this file and facts.jsonl byte-for-byte). Edit the recipe, not the "
        "JSONL.", "",
        "## Schema", "",
        "The curated set's (CounterFact) schema, read unchanged by `locedit.core.datasets.read_facts`, plus:", "",
        "- `split`: `\"tuning\"` or `\"heldout\"`;",
        "- `source`: the source file and its record id (`counterfact-train:2`, `known_1000:17`);",
        "- `neighborhood_subjects` / `neighborhood_known`: the subject of each neighbourhood prompt and whether "
        "the model knows that subject's fact at top-1;",
        "- `target_new_source`: `counterfact` (CounterFact's own `target_new`) or `same-relation attribute`.", "",
        "`relation_id` and `relation_pid` are the Wikidata property id. `prompt` has `{}` for the subject; targets "
        "have no leading space.", "",
        "## How it was built", "",
        f"1. Sources: {', '.join(SOURCES)} from the project's shared copies (11,919 CounterFact records, 1,209 "
        "known_1000 rows). zsRE is not used: its prompts are questions, not prompts the attribute continues.",
        "2. Relation of each record: known_1000 gives a relation id with every template; a CounterFact record's "
        "template is its prompt with the subject replaced by `{}`. A template known_1000 does not name (or names "
        "with two relations, e.g. `{} is developed by`: P176 and P178) takes the relation that at least 80% of "
        "the locality prompts linked to it show: in these files every locality prompt has its record's true "
        "attribute (11,919 of 11,919), so it is one of CounterFact's neighbourhood prompts, of the same relation.",
        f"3. Candidates: {n_candidates} records. Left out: "
        + ", ".join(f"{why} {n}" for why, n in sorted(candidates_dropped.items())) + ".",
        f"4. Known: {n_known} candidate records whose true attribute's first token is `{model}`'s greedy next "
        "token after the prompt (`locedit.core.datasets.known_facts`, top-1); of a (subject, relation) with "
        "several known records the first is kept (CounterFact train, val, known_1000). Left out after that: "
        + (", ".join(f"{why} {n}" for why, n in sorted(rows_dropped.items())) or "none") + ".",
        "5. `paraphrase_prompts`: the CounterFact record's rephrase prompt (as the source gives it) and "
        f"the subject in {N_PARAPHRASE_TEMPLATES} other common templates of the relation (templates of at least "
        f"{MIN_TEMPLATE_COUNT} records; for a relation with too few, of at least 2), chosen by hash.",
        f"6. `neighborhood_prompts`: up to {MAX_NEIGHBOURS} other subjects of the same relation with the same true "
        "attribute, model-known subjects first, then by hash; never the fact's subject, a subject containing it "
        "or contained in it. They are written in the relation's common templates in turn, the fact's own first "
        "when it is a common one (a known_1000 prompt written for its subject is not reused). "
        f"{nb_known} of {nb_all} neighbourhood prompts have a model-known subject. Facts by "
        "number of neighbourhood prompts: " + ", ".join(f"{k}: {nb[k]}" for k in sorted(nb)) + ".",
        "7. `target_new`: CounterFact's own; for known_1000 rows another attribute of the same relation that at "
        "least 3 candidates carry, whose first token differs from the true one, chosen by hash.",
        f"8. `split`: within each relation, facts sorted by sha256(subject + \"\\x1f\" + relation_id); the first "
        f"round({TUNING_FRACTION:g} × n) are tuning. A fact's split depends only on the facts of its relation.", "",
        "## Counts", "",
        f"Facts by source: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())) + ".", "",
        "| relation | name | tuning | heldout | total |", "|---|---|---:|---:|---:|"]
    for rel in relations:
        t, h = counts[rel, "tuning"], counts[rel, "heldout"]
        lines.append(f"| {rel} | {RELATION_NAMES.get(rel, '')} | {t} | {h} | {t + h} |")
    lines += [f"| all | | {n_tuning} | {len(rows) - n_tuning} | {len(rows)} |", "",
              "## Attribution and licence", "",
              "Derived from ROME's CounterFact and known_1000 (Meng et al. 2022, *Locating and Editing Factual "
              "Associations in GPT*, `kmeng01/rome`, MIT licence); the CounterFact records as split and flattened "
              "by EasyEdit/MEND, copied from the public repository `Jometeorie/KnowledgeSpread` `data/counterfact/` "
              "(Apache-2.0). CounterFact's templates come from ParaRel (Elazar et al. 2021). The selection, "
              "neighbourhoods, new targets and split are the locedit project's.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the public source files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "locedit" / "heldout_answers.json"),
                        help="where the model's answers are kept between runs ('' for none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    records, labels, dropped = candidates(args.data)
    logger.info("%d candidate records (%s)", len(records), dict(dropped))
    known, tokenizer = known_records(records, args.model, args.batch, Path(args.cache) if args.cache else None)
    logger.info("%d records known by %s", len(known), args.model)

    def first_token(text: str) -> int:
        return tokenizer(" " + text, add_special_tokens=False)["input_ids"][0]

    rows, dropped_rows = build_rows(records, labels, known, first_token)
    write_rows(rows, args.out)
    from locedit.core.results import write_atomic

    write_atomic(args.out.parent / "README.md",
                 readme_text(rows, dropped, dropped_rows, len(records), len(known), args.model))
    counts = Counter((r["relation_id"], r["split"]) for r in rows)
    for relation in sorted({r for r, _ in counts}, key=lambda x: int(x[1:])):
        logger.info("%-6s tuning %3d  heldout %3d", relation, counts[relation, "tuning"], counts[relation, "heldout"])
    logger.info("wrote %d facts to %s (%s)", len(rows), args.out, dict(dropped_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ripple effects of an edit (RippleEdits, Cohen et al. 2024): do the facts that depend on the edited one follow,
and do the subject's other facts stay?

For an edit s: r -> o* (true object o), the probes come from a knowledge table of (subject, relation, object,
prompt) facts (`locedit/data/ripple_table.jsonl`, built by `recipes/build_ripple_table.py`) and per-relation rules
(`locedit/data/ripple_relations.json`, data, not code):

* **logical generalisation**: a relation of s the edit implies: r = P131 (city) and (o*, P17, z) in the table give
  "The Eiffel Tower is located in the country of" -> z (country(Rome) = Italy), against z0 = country(o) (France);
* **composition** (two hops through o*): "The official language of the country where <s> is located is" -> z;
* **relation specificity**: every other fact (s, r2, o2) of the table, with a relation the edit does not imply,
  should keep o2: "<s>'s prompt for r2" -> o2 against the table's most common other objects of r2.

A probe succeeds when P(expected) > P(each alternative), whole-string (`metrics.target_probs`, as ES and NS are
scored). Rates are the mean success after the edit (and before, on the unedited model); for the first two kinds
also over the probes whose second hop the unedited model knows (its prompt for (o*, r', z) prefers z to z0), as
RippleEdits counts only facts the model knows. Probes given by the
user, `ripple=[(prompt, expected)]`, are of kind "given"; their alternative is the unedited model's top-1 next
token (or give `(prompt, expected, old)`). The rates are **reported, not part of the pass rule**.
"""

from __future__ import annotations

import contextlib
import functools
import html
import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from locedit.core.facts import Fact
from locedit.errors import DatasetError, LoceditError
from locedit.verification.metrics import continuation, next_token_logprobs, target_ids, target_probs

KINDS = ("logical_generalisation", "composition", "relation_specificity", "given")
RULE_KINDS = ("logical_generalisation", "composition")
MAX_PROBES = 5          # per kind and edited fact (the first ones, in table order)
MAX_ALTERNATIVES = 4    # a relation-specificity probe's competitors: the relation's most common other objects
NOTE = "reported, not part of the pass rule"
DATA = Path(__file__).resolve().parent.parent / "data"
TABLE_PATH = DATA / "ripple_table.jsonl"
RULES_PATH = DATA / "ripple_relations.json"


@dataclass(frozen=True)
class TableFact:
    """One fact of the knowledge table: `subject` `relation` (a Wikidata id) `object`, and a prompt for it."""

    subject: str
    relation: str
    object: str
    prompt: str
    source: str = ""


@dataclass(frozen=True)
class Rule:
    """An edit of relation `first` to o* and the table fact (o*, `then`, z) give `template`.format(s) -> z."""

    first: str
    then: str
    kind: str
    template: str
    implies: str | None = None


@dataclass(frozen=True)
class RippleProbe:
    """A prompt, the answer expected after the edit and the answers it must beat."""

    kind: str
    prompt: str
    expected: str
    alternatives: tuple[str, ...] = ()
    because: str = ""
    second_hop: str | None = None  # the table's prompt of (o*, r', z): does the unedited model know z there?


def subject_key(text: str) -> str:
    """How the table matches names: stripped, casefolded, without a leading "the "."""
    key = " ".join(text.split()).casefold()
    return key[4:] if key.startswith("the ") else key


class KnowledgeTable:
    """The facts, indexed by subject, and the rules that compose them."""

    def __init__(self, facts: Sequence[TableFact], rules: Sequence[Rule], names: dict[str, str] | None = None):
        self.facts = list(facts)
        self.rules = list(rules)
        self.names = dict(names or {})
        self._by_key: dict[tuple[str, str], TableFact] = {}
        self._by_subject: dict[str, list[TableFact]] = defaultdict(list)
        counts: dict[str, Counter] = defaultdict(Counter)
        for f in self.facts:
            key = (subject_key(f.subject), f.relation)
            old = self._by_key.get(key)
            if old is not None and subject_key(old.object) != subject_key(f.object):
                raise DatasetError(f"knowledge table: ({f.subject!r}, {f.relation}) has two objects, "
                                   f"{old.object!r} ({old.source}) and {f.object!r} ({f.source})")
            if old is None:
                self._by_key[key] = f
                self._by_subject[key[0]].append(f)
                counts[f.relation][f.object] += 1
        self._objects = {r: [o for o, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))]
                         for r, c in counts.items()}

    def get(self, subject: str, relation: str) -> TableFact | None:
        """The table's fact (subject, relation, ?) or None."""
        return self._by_key.get((subject_key(subject), relation))

    def about(self, subject: str) -> list[TableFact]:
        """Every fact whose subject is `subject`, in table order."""
        return list(self._by_subject.get(subject_key(subject), []))

    def objects(self, relation: str) -> list[str]:
        """The objects of `relation`, most common first."""
        return list(self._objects.get(relation, []))

    def name(self, relation: str) -> str:
        return self.names.get(relation, relation)


# --- reading ----------------------------------------------------------------------------------------------------------
def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def read_rules(path: str | Path = RULES_PATH) -> tuple[list[Rule], dict[str, str]]:
    """The rules and relation names of a ripple_relations.json file (DatasetError naming the bad rule)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"ripple rules file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read ripple rules file {str(path)!r}: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("rules"), list):
        raise DatasetError(f"{str(path)!r}: expected an object with a list 'rules'")
    rules = []
    for i, row in enumerate(d["rules"]):
        where = f"{path.name} rule {i}"
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: must be an object, got {type(row).__name__}")
        kind = _text(row, "kind", where)
        if kind not in RULE_KINDS:
            raise DatasetError(f"{where}: kind {kind!r} is not one of {', '.join(RULE_KINDS)}")
        template = _text(row, "template", where)
        if template.count("{}") != 1:
            raise DatasetError(f"{where}: template {template!r} must contain '{{}}' exactly once")
        implies = row.get("implies")
        if implies is not None and not (isinstance(implies, str) and implies.strip()):
            raise DatasetError(f"{where}: 'implies' must be a relation id, got {implies!r}")
        rules.append(Rule(_text(row, "first", where), _text(row, "then", where), kind, template, implies))
    names = d.get("relations") or {}
    if not isinstance(names, dict):
        raise DatasetError(f"{str(path)!r}: 'relations' must map relation ids to names")
    return rules, {str(k): str(v) for k, v in names.items()}


def read_table(path: str | Path = TABLE_PATH, rules: str | Path = RULES_PATH) -> KnowledgeTable:
    """A knowledge table (JSONL rows `subject, relation, object, prompt[, source]`) with its rules. A malformed row
    raises one DatasetError naming its line and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"knowledge table {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read knowledge table {str(path)!r}: {e}") from None
    facts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: must be a JSON object, got {type(row).__name__}")
        facts.append(TableFact(*(_text(row, k, where) for k in ("subject", "relation", "object", "prompt")),
                               source=str(row.get("source") or f"{path.name}:{number}")))
    if not facts:
        raise DatasetError(f"knowledge table {str(path)!r} has no rows")
    rule_list, names = read_rules(rules)
    return KnowledgeTable(facts, rule_list, names)


@functools.lru_cache(maxsize=1)
def default_table() -> KnowledgeTable:
    """The packaged knowledge table and rules (read once)."""
    return read_table()


# --- building probes --------------------------------------------------------------------------------------------------
def _same(a: str, b: str) -> bool:
    return subject_key(a) == subject_key(b)


def subject_phrase(fact: Fact) -> str:
    """The subject as the edit prompt writes it: with its article ("the Eiffel Tower") when the prompt has one."""
    idx = fact.prompt.find(fact.subject)
    before = fact.prompt[:idx].split()[-1:] if idx > 0 else []
    return f"the {fact.subject}" if before and before[0].casefold() == "the" else fact.subject


def fill(template: str, phrase: str) -> str:
    """The template with the subject written in, capitalised at the start of the prompt."""
    if template.startswith("{}"):
        return template.replace("{}", phrase[:1].upper() + phrase[1:], 1)
    if phrase.startswith("The "):
        phrase = "the " + phrase[4:]
    return template.replace("{}", phrase, 1)


def edited_relation(table: KnowledgeTable, fact: Fact) -> str | None:
    """The edited fact's relation id: `fact.relation` when the rules or table know it, else the relation of the
    table's fact (subject, ?, true target)."""
    if fact.relation and (any(r.first == fact.relation for r in table.rules) or table.objects(fact.relation)):
        return fact.relation
    true = fact.target_text() if fact.target is not None else None
    for f in table.about(fact.subject):
        if true is not None and _same(f.object, true):
            return f.relation
    return None


def probes_for(fact: Fact, new_target: str, table: KnowledgeTable | None = None, *,
               max_probes: int = MAX_PROBES) -> tuple[list[RippleProbe], dict]:
    """The ripple probes of the edit `fact` -> `new_target` that `table` implies (at most `max_probes` per kind),
    and what was found: `{"relation", "skipped": {reason: count}}`."""
    table = table or default_table()
    relation = edited_relation(table, fact)
    info: dict[str, Any] = {"relation": relation, "skipped": {}}
    if relation is None:
        info["skipped"]["edited fact not in the knowledge table"] = 1
        return [], info
    skipped: Counter = Counter()
    true, new = fact.target_text().strip(), new_target.strip()
    phrase = subject_phrase(fact)
    found: dict[str, list[RippleProbe]] = defaultdict(list)
    for rule in table.rules:
        if rule.first != relation:
            continue
        z, z0 = table.get(new, rule.then), table.get(true, rule.then)
        if z is None or z0 is None:
            skipped[f"{'new' if z is None else 'old'} object has no {table.name(rule.then)} in the table"] += 1
        elif _same(z.object, z0.object):
            skipped["same answer before and after"] += 1
        else:
            found[rule.kind].append(RippleProbe(
                rule.kind, fill(rule.template, phrase), z.object, (z0.object,),
                f"{new} {rule.then} {z.object} (before: {true} {rule.then} {z0.object})", z.prompt))
    implied = {relation} | {r.implies for r in table.rules if r.first == relation and r.implies}
    implied |= {r.first for r in table.rules if r.implies == relation}
    for f in table.about(fact.subject):
        if f.relation in implied:
            continue
        alternatives = tuple(o for o in table.objects(f.relation) if not _same(o, f.object))[:MAX_ALTERNATIVES]
        if not alternatives:
            skipped["relation with one object in the table"] += 1
            continue
        found["relation_specificity"].append(RippleProbe("relation_specificity", f.prompt, f.object, alternatives,
                                                         f"{f.subject} {f.relation} {f.object} ({f.source})"))
    probes = []
    for kind in KINDS:
        seen = set()
        for p in found.get(kind, []):
            if p.prompt not in seen and len(seen) < max_probes:
                seen.add(p.prompt)
                probes.append(p)
    info["skipped"] = dict(skipped)
    return probes, info


def given_probes(items: Iterable) -> list[RippleProbe]:
    """User probes: RippleProbe objects, `(prompt, expected)` pairs (the alternative is then the unedited model's
    top-1 token), `(prompt, expected, old)` or `(prompt, expected, [alternatives])`."""
    out = []
    for item in items:
        if isinstance(item, RippleProbe):
            out.append(item)
            continue
        if not isinstance(item, (list, tuple)) or len(item) not in (2, 3) or not all(
                isinstance(x, str) and x.strip() for x in item[:2]):
            raise LoceditError(f"a ripple probe is (prompt, expected) or (prompt, expected, old), not {item!r}")
        alts = item[2] if len(item) == 3 else ()
        alts = (alts,) if isinstance(alts, str) else tuple(alts)
        if not all(isinstance(a, str) and a.strip() for a in alts):
            raise LoceditError(f"a ripple probe's alternatives must be non-empty strings: {item!r}")
        out.append(RippleProbe("given", item[0], item[1].strip(), tuple(a.strip() for a in alts), "given"))
    return out


def verify_probes(facts: Sequence[Fact], new_targets: Sequence[str], ripple) -> tuple[list[RippleProbe], dict]:
    """`verify`'s `ripple=` option: None/True = the packaged table's probes for every edited fact, False = none, a
    list = the user's probes (for the first fact)."""
    if ripple is False:
        return [], {}
    if ripple is None or ripple is True:
        probes, infos = [], []
        for fact, new in zip(facts, new_targets):
            p, info = probes_for(fact, new)
            probes += p
            infos.append(info)
        return probes, {"source": "knowledge table", **(infos[0] if len(infos) == 1 else {"per_fact": infos})}
    return given_probes(ripple), {"source": "given"}


# --- scoring ----------------------------------------------------------------------------------------------------------
def _with_model_alternative(lm, probes: Sequence[RippleProbe], top: int = 5) -> list[RippleProbe]:
    """Probes without alternatives get the model's top-1 next token (not the expected answer's first token)."""
    todo = [i for i, p in enumerate(probes) if not p.alternatives]
    if not todo:
        return list(probes)
    logp = next_token_logprobs(lm, [probes[i].prompt for i in todo])
    out = list(probes)
    for row, i in enumerate(todo):
        p = probes[i]
        first = target_ids(lm, p.prompt, continuation(p.prompt, p.expected))[0]
        for tok in logp[row].topk(top).indices.tolist():
            text = lm.tokenizer.decode([tok]).strip()
            if tok != first and text:
                out[i] = RippleProbe(p.kind, p.prompt, p.expected, (text,), p.because or "given")
                break
    return out


def score(lm, probes: Sequence[RippleProbe]) -> list[dict]:
    """Per probe: P(expected), the best alternative and its P, and success = P(expected) > P(every alternative)."""
    pairs, spans = [], []
    for p in probes:
        start = len(pairs)
        pairs += [(p.prompt, continuation(p.prompt, t)) for t in (p.expected, *p.alternatives)]
        spans.append((start, len(pairs)))
    probs = target_probs(lm, pairs) if pairs else np.zeros(0)
    out = []
    for p, (lo, hi) in zip(probes, spans):
        alt = probs[lo + 1:hi]
        best = int(np.argmax(alt)) if len(alt) else None
        p_alt = float(alt[best]) if best is not None else None
        out.append({"p_expected": float(probs[lo]), "best_alternative": p.alternatives[best] if best is not None
                    else None, "p_alternative": p_alt,
                    "success": bool(p_alt is None or float(probs[lo]) > p_alt)})
    return out


def _rates(rows: Sequence[dict], when: str) -> dict:
    return {k: (float(np.mean([r[f"success_{when}"] for r in rows if r["kind"] == k]))
                if any(r["kind"] == k for r in rows) else None) for k in KINDS}


def measure(lm_before, lm_after, probes: Sequence[RippleProbe], *, before=contextlib.nullcontext,
            info: dict | None = None) -> dict:
    """Score the probes on `lm_before` (inside `before()`: the edit reverted) and on `lm_after`: per kind the
    success rate after (`rates`) and before (`rates_before`), after over the probes whose second hop the unedited
    model knows (`rates_second_hop_known`), and every probe with its numbers."""
    hops = [RippleProbe(p.kind, p.second_hop, p.expected, p.alternatives) for p in probes if p.second_hop]
    with before():
        probes = _with_model_alternative(lm_before, probes)
        both = score(lm_before, list(probes) + hops)  # one batched pass
        b, known = both[:len(probes)], iter(r["success"] for r in both[len(probes):])
    a = score(lm_after, probes)
    rows = []
    for p, sb, sa in zip(probes, b, a):
        row = asdict(p)
        row["alternatives"] = list(p.alternatives)
        row.update({f"{k}_before": v for k, v in sb.items()})
        row.update({f"{k}_after": v for k, v in sa.items()})
        row["second_hop_known"] = next(known) if p.second_hop else None
        rows.append(row)
    hop_known = [r for r in rows if r["second_hop_known"]]
    return {"rates": _rates(rows, "after"), "rates_before": _rates(rows, "before"),
            "rates_second_hop_known": {k: v for k, v in _rates(hop_known, "after").items() if k in RULE_KINDS},
            "counts": {k: sum(r["kind"] == k for r in rows) for k in KINDS}, "in_rule": False, "note": NOTE,
            "rule": "a probe succeeds when P(expected) > P(each alternative), whole-string", "probes": rows,
            **(info or {})}


# --- reporting --------------------------------------------------------------------------------------------------------
def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def ripple_lines(d: dict | None) -> list[str]:
    """The summary's ripple line (nothing without probes)."""
    if not d or not d.get("probes"):
        return []
    parts = [f"{k.replace('_', ' ')} {_pct(d['rates_before'][k])} -> {_pct(d['rates'][k])} (n={d['counts'][k]})"
             for k in KINDS if d["counts"][k]]
    return ["ripple (before -> after): " + "; ".join(parts) + f" ({NOTE})"]


def ripple_html(d: dict | None) -> list[str]:
    """The report's ripple section: the rates, then every probe before and after."""
    if not d or not d.get("probes"):
        return []
    from locedit.core.report import table

    rates = [{"probes": k.replace("_", " "), "n": d["counts"][k], "before": _pct(d["rates_before"][k]),
              "after": _pct(d["rates"][k])} for k in KINDS if d["counts"][k]]
    rows = [{"kind": p["kind"].replace("_", " "), "prompt": p["prompt"], "expected": p["expected"],
             "against": ", ".join(p["alternatives"]), "P before": f"{p['p_expected_before']:.3g}",
             "P after": f"{p['p_expected_after']:.3g}", "before": "yes" if p["success_before"] else "no",
             "after": "yes" if p["success_after"] else "no"} for p in d["probes"]]
    return ["<h2>Ripple effects (RippleEdits)</h2>",
            f"<p class=\"note\">Success = P(expected) &gt; P(each alternative), whole-string; {html.escape(NOTE)}."
            "</p>", table(rates, ["probes", "n", "before", "after"]),
            table(rows, ["kind", "prompt", "expected", "against", "P before", "P after", "before", "after"])]


# evaluate's per-fact metrics: (name, path in a verification dict)
EVALUATE_METRICS: list[tuple[str, tuple[str, ...]]] = (
    [(f"ripple_{k}", ("ripple", "rates", k)) for k in KINDS[:3]]
    + [(f"ripple_{k}_before", ("ripple", "rates_before", k)) for k in KINDS[:3]]
    + [(f"ripple_{k}_second_hop_known", ("ripple", "rates_second_hop_known", k)) for k in RULE_KINDS])

"""Reading fact datasets (ROME's known_1000, CounterFact, EasyEdit rows, the curated set) and keeping the facts a
model knows (the paper's protocol: the true target's first token is the model's top-1 prediction).

`read_facts` never crashes on a bad row: every row becomes a `Fact` or a `RowError` naming the problem. Only a file
that cannot be read at all (missing, not JSON, no rows, unknown format) raises `DatasetError`.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from locedit.errors import DatasetError, FactError, LoceditError
from locedit.core.facts import EditRequest, Fact

logger = logging.getLogger("locedit")

FORMATS = ("known", "counterfact", "easyedit", "zsre", "plain")
_ALIASES = {"known_1000": "known", "rome_known": "known", "known1000": "known", "cf": "counterfact",
            "curated": "counterfact", "easy_edit": "easyedit", "csv": "plain", "simple": "plain"}
# The plainest rows a user writes (JSONL, JSON list or CSV): subject and prompt, optionally the true target and
# a new target. Fields a plain row may have (anything else is ignored).
PLAIN_FIELDS = ("subject", "prompt", "target", "target_true", "target_new", "relation", "relation_id", "id",
                "paraphrases", "neighborhood", "generation_prompts")
_EASYEDIT_ONLY = {"ground_truth", "rephrase_prompt", "rephrase_prompts", "rephrase", "locality_prompt",
                  "locality_prompts", "locality_ground_truth", "portability"}


@dataclass(frozen=True)
class RowError:
    """A row that did not become a fact. `index`: 0-based row index; `line`: 1-based line (JSONL files only)."""

    index: int
    id: str | None
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else f"row {self.index}"
        ident = f" (id {self.id})" if self.id is not None else ""
        return f"{where}{ident}: {self.message}"


@dataclass
class FactFile:
    """The facts of one file, the rows that failed and the detected format."""

    path: Path
    format: str
    facts: list[Fact] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.facts)

    def __iter__(self) -> Iterator[Fact]:
        return iter(self.facts)

    def __getitem__(self, index):
        return self.facts[index]


class _RowProblem(Exception):
    """A row-level problem; becomes a RowError."""


# --- raw rows ------------------------------------------------------------------------------------------------------
@dataclass
class _Raw:
    index: int
    line: int | None
    value: Any = None
    problem: str | None = None


def _raw_rows(path: Path) -> list[_Raw]:
    """Rows of a JSON list or of a JSONL file; JSONL lines that do not parse become problems."""
    if path.suffix.lower() in (".csv", ".tsv"):
        return _csv_rows(path)
    text = _read_text(path, "utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return _jsonl_rows(path, text)
    if isinstance(whole, list):
        return [_Raw(i, None, row) for i, row in enumerate(whole)]
    if isinstance(whole, dict):  # a one-line JSONL file
        return [_Raw(0, 1, whole)]
    raise DatasetError(f"dataset file {str(path)!r} holds a JSON {type(whole).__name__}, not a list of rows")


def _read_text(path: Path, encoding: str) -> str:
    """The file's text; DatasetError if it is missing, unreadable or empty."""
    try:
        text = path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise DatasetError(f"dataset file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read dataset file {str(path)!r}: {e}") from None
    if not text.strip():
        raise DatasetError(f"dataset file {str(path)!r} is empty")
    return text


def _jsonl_rows(path: Path, text: str) -> list[_Raw]:
    rows: list[_Raw] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(_Raw(len(rows), number, json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append(_Raw(len(rows), number, problem=f"not valid JSON ({e.msg} at column {e.colno})"))
    if all(r.problem for r in rows):
        raise DatasetError(f"dataset file {str(path)!r} is neither a JSON list nor JSON lines")
    return rows


def _csv_rows(path: Path) -> list[_Raw]:
    """Rows of a CSV (or TSV) file with a header line; empty cells count as missing. `line` is the row's line."""
    import csv

    text = _read_text(path, "utf-8-sig")  # a BOM some spreadsheet programs write is not a header
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    rows: list[_Raw] = []
    try:
        for record in reader:
            value = {str(k).strip(): (v if v is None or v.strip() else None) for k, v in record.items()
                     if k is not None}
            rows.append(_Raw(len(rows), reader.line_num, value))
    except csv.Error as e:
        raise DatasetError(f"cannot parse CSV file {str(path)!r}: {e}") from None
    if not rows:
        raise DatasetError(f"dataset file {str(path)!r} has a header but no rows")
    return rows


# --- format detection ------------------------------------------------------------------------------------------------
def _format_of(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    keys = set(row)
    if "requested_rewrite" in keys:
        return "counterfact"
    if "known_id" in keys or {"attribute", "subject", "prompt"} <= keys:
        return "known"
    if {"src", "alt"} <= keys:
        return "zsre"
    if keys & _EASYEDIT_ONLY:
        return "easyedit"
    if keys & {"subject", "prompt"}:  # plain rows; a missing subject or prompt is reported per row
        return "plain"
    return None


def _detect(path: Path, rows: list[_Raw]) -> str:
    found = [_format_of(raw.value) if raw.problem is None else None for raw in rows]
    for fmt in found:  # a row with a dataset's own fields decides; plain only when no row has any
        if fmt and fmt != "plain":
            return fmt
    if "plain" in found:
        return "plain"
    first = next((r.value for r in rows if isinstance(r.value, dict)), None)
    keys = sorted(first) if first is not None else "no JSON objects"
    raise DatasetError(f"unknown dataset format in {str(path)!r} (first row keys: {keys}); expected known_1000 "
                       "(known_id, subject, prompt, attribute), CounterFact (case_id, requested_rewrite), EasyEdit "
                       "(prompt, subject, ground_truth, target_new), MEND's zsRE (subject, src, alt, answers) or plain "
                       "rows (subject, prompt[, target][, target_new])")


# --- field helpers --------------------------------------------------------------------------------------------------
def _get(row: dict, key: str, where: str = "") -> Any:
    if key not in row or row[key] is None:
        raise _RowProblem(f"missing field {(where + key)!r}")
    return row[key]


def _string(value: Any, name: str, *, allow_list: bool = False) -> str:
    if allow_list and isinstance(value, list):
        if not value:
            raise _RowProblem(f"field {name!r} is an empty list")
        value = value[0]
    if isinstance(value, dict) and "str" in value:  # CounterFact-style {"str": ...}
        value = value["str"]
    if not isinstance(value, str):
        raise _RowProblem(f"field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowProblem(f"field {name!r} is empty")
    return value


def _optional_string(row: dict, key: str, *, allow_list: bool = False) -> str | None:
    value = row.get(key)
    if value is None or (isinstance(value, list) and not value):
        return None
    return _string(value, key, allow_list=allow_list)


def _prompts(value: Any, name: str) -> list[str]:
    """A list of prompts (strings, or dicts with a "prompt"); a single string is a list of one."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise _RowProblem(f"field {name!r} must be a list of prompts, got {type(value).__name__}")
    out = []
    for item in value:
        if isinstance(item, dict):
            item = item.get("prompt")
        if not isinstance(item, str):
            raise _RowProblem(f"field {name!r} holds a {type(item).__name__}, not a prompt string")
        out.append(item)
    return out


def _id(value: Any, index: int) -> str:
    if value is None:
        return str(index)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _RowProblem(f"id {value!r} must be a string or an integer")
    return str(value)


# --- per-format rows ------------------------------------------------------------------------------------------------
def _known_fact(row: dict, index: int) -> Fact:
    ident = _id(row.get("known_id"), index)
    meta = {"id": ident, "target_new": None, "paraphrases": [], "neighborhood": [], "source_format": "known"}
    return _make(row, ident, meta, prompt=_string(_get(row, "prompt"), "prompt"),
                 subject=_string(_get(row, "subject"), "subject"),
                 target=_string(_get(row, "attribute"), "attribute"),
                 relation=_optional_string(row, "relation_id"))


def _counterfact_fact(row: dict, index: int) -> Fact:
    ident = _id(row.get("case_id"), index)
    rewrite = _get(row, "requested_rewrite")
    if isinstance(rewrite, list) and rewrite:  # MQuAKE-style lists of rewrites: take the first
        rewrite = rewrite[0]
    if not isinstance(rewrite, dict):
        raise _RowProblem(f"field 'requested_rewrite' must be an object, got {type(rewrite).__name__}")
    where = "requested_rewrite."
    relation = rewrite.get("relation_id", row.get("relation_id"))
    meta = {"id": ident,
            "target_new": _string(rewrite["target_new"], "target_new") if rewrite.get("target_new") else None,
            "paraphrases": _prompts(row.get("paraphrase_prompts"), "paraphrase_prompts"),
            "neighborhood": _prompts(row.get("neighborhood_prompts"), "neighborhood_prompts"),
            "source_format": "counterfact"}
    if row.get("generation_prompts") is not None:
        meta["generation_prompts"] = _prompts(row["generation_prompts"], "generation_prompts")
    return _make(row, ident, meta, prompt=_string(_get(rewrite, "prompt", where), where + "prompt"),
                 subject=_string(_get(rewrite, "subject", where), where + "subject"),
                 target=_string(_get(rewrite, "target_true", where), where + "target_true"),
                 relation=_string(relation, "relation_id") if relation is not None else None)


def _easyedit_fact(row: dict, index: int) -> Fact:
    ident = _id(row.get("case_id", row.get("id")), index)
    paraphrases = row.get("rephrase_prompt", row.get("rephrase_prompts", row.get("rephrase")))
    neighborhood = row.get("locality_prompt", row.get("locality_prompts"))
    relation = row.get("relation_id", row.get("relation"))
    meta = {"id": ident, "target_new": _optional_string(row, "target_new", allow_list=True),
            "paraphrases": _prompts(paraphrases, "rephrase_prompt"),
            "neighborhood": _prompts(neighborhood, "locality_prompt"), "source_format": "easyedit"}
    truths = _locality_truths(row.get("locality_ground_truth"), len(meta["neighborhood"]))
    if truths is not None:
        meta["neighborhood_targets"] = truths
    return _make(row, ident, meta, prompt=_string(_get(row, "prompt"), "prompt", allow_list=True),
                 subject=_string(_get(row, "subject"), "subject"),
                 target=_string(_get(row, "ground_truth"), "ground_truth", allow_list=True),
                 relation=_string(relation, "relation_id") if relation is not None else None)


def _zsre_fact(row: dict, index: int) -> Fact:
    """A MEND zsRE row: the question `src` is the prompt, `answers[0]` (else `pred`) the true target, `alt` the new
    target, `rephrase` the paraphrase and `loc` / `loc_ans` the locality prompt and its answer."""
    ident = _id(row.get("case_id", row.get("id")), index)
    answers = row.get("answers")
    truth = answers[0] if isinstance(answers, list) and answers else row.get("pred")
    meta = {"id": ident, "target_new": _string(_get(row, "alt"), "alt"),
            "paraphrases": _prompts(row.get("rephrase"), "rephrase"),
            "neighborhood": _prompts(row.get("loc"), "loc"), "source_format": "zsre"}
    truths = _locality_truths(row.get("loc_ans"), len(meta["neighborhood"]))
    if truths is not None:
        meta["neighborhood_targets"] = truths
    return _make(row, ident, meta, prompt=_string(_get(row, "src"), "src"),
                 subject=_string(_get(row, "subject"), "subject"),
                 target=_string(truth, "answers") if truth is not None else None, relation=None)


def _locality_truths(value: Any, count: int) -> list[str] | None:
    """EasyEdit's `locality_ground_truth` as one true target per locality prompt (a list of aliases: the first),
    or None when absent or when it does not pair with the prompts."""
    if value is None or count == 0:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        return None
    if count == 1 and len(value) != 1:
        value = [value]
    if len(value) != count:
        return None
    out = []
    for item in value:
        if isinstance(item, list):
            item = item[0] if item else None
        if not isinstance(item, str) or not item.strip():
            return None
        out.append(item)
    return out


def _plain_fact(row: dict, index: int) -> Fact:
    """A plain row: `subject`, `prompt` (required), `target` (or `target_true`; absent = the model's top-1),
    `target_new`, `relation`/`relation_id`, `id`, and optional lists `paraphrases`, `neighborhood`,
    `generation_prompts` (JSON rows only)."""
    ident = _id(row.get("id", row.get("case_id")), index)
    relation = row.get("relation_id", row.get("relation"))
    target_key = "target" if row.get("target") is not None else "target_true"
    meta = {"id": ident, "target_new": _optional_string(row, "target_new"),
            "paraphrases": _prompts(row.get("paraphrases"), "paraphrases"),
            "neighborhood": _prompts(row.get("neighborhood"), "neighborhood"), "source_format": "plain"}
    if row.get("generation_prompts") is not None:
        meta["generation_prompts"] = _prompts(row["generation_prompts"], "generation_prompts")
    return _make(row, ident, meta, prompt=_string(_get(row, "prompt"), "prompt"),
                 subject=_string(_get(row, "subject"), "subject"),
                 target=_optional_string(row, target_key),
                 relation=_string(relation, "relation_id") if relation is not None else None)


def _make(row: dict, ident: str, meta: dict, *, prompt: str, subject: str, target: str | None,
          relation: str | None) -> Fact:
    try:
        return Fact(subject=subject, prompt=prompt, target=target, relation=relation, meta=meta)
    except FactError as e:
        raise _RowProblem(str(e)) from None


_PARSERS: dict[str, Callable[[dict, int], Fact]] = {
    "known": _known_fact, "counterfact": _counterfact_fact, "easyedit": _easyedit_fact, "zsre": _zsre_fact,
    "plain": _plain_fact}


def _row_id(raw: _Raw, fmt: str) -> str | None:
    """The row's id for an error report, when one can be read."""
    if not isinstance(raw.value, dict):
        return None
    key = {"known": "known_id", "counterfact": "case_id", "plain": "id"}.get(fmt, "case_id")
    value = raw.value.get(key, raw.value.get("id"))
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else str(raw.index)


# --- public API -----------------------------------------------------------------------------------------------------
def read_facts(path: str | Path, *, format: str = "auto") -> FactFile:
    """Read a known_1000, CounterFact (JSON list or JSONL; also the curated set), EasyEdit, MEND zsRE (a question
    `src` as the prompt, `alt` as target_new) or plain file (JSON,
    JSONL or CSV rows of `subject, prompt[, target][, target_new]`; a missing field names the row and the field).

    `format`: "auto" (detected from the first row that matches one), "known", "counterfact", "easyedit",
    "zsre" or "plain". Every
    fact gets `meta = {"id", "target_new", "paraphrases", "neighborhood", "source_format"}` with a stable string id
    (case_id / known_id / row index); bad rows and duplicate ids are reported in `.errors`, never raised."""
    path = Path(path)
    fmt = _ALIASES.get(format, format)
    if fmt != "auto" and fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}; use 'auto' or one of {', '.join(FORMATS)}")
    rows = _raw_rows(path)
    fmt = _detect(path, rows) if fmt == "auto" else fmt
    out = FactFile(path, fmt)
    seen: dict[str, int] = {}
    for raw in rows:
        try:
            fact = _parse_row(raw, fmt)
        except _RowProblem as e:
            out.errors.append(RowError(raw.index, _row_id(raw, fmt), str(e), raw.line))
            continue
        ident = fact.meta["id"]
        if ident in seen:
            out.errors.append(RowError(raw.index, ident, f"duplicate id {ident!r} (first at row {seen[ident]})",
                                       raw.line))
            continue
        seen[ident] = raw.index
        out.facts.append(fact)
    if out.errors:
        logger.info("%s: %d facts, %d bad rows (first: %s)", path, len(out.facts), len(out.errors), out.errors[0])
    return out


def _parse_row(raw: _Raw, fmt: str) -> Fact:
    if raw.problem is not None:
        raise _RowProblem(raw.problem)
    if not isinstance(raw.value, dict):
        raise _RowProblem(f"row must be a JSON object, got {type(raw.value).__name__}")
    return _PARSERS[fmt](raw.value, raw.index)


def curated_facts_path() -> Path:
    """The curated fact set: the copy packaged with locedit, else the repository's data/facts/facts.jsonl."""
    for candidate in (Path(__file__).parent.parent / "data" / "facts.jsonl",
                      Path(__file__).resolve().parent.parent.parent / "data" / "facts" / "facts.jsonl"):
        if candidate.is_file():
            return candidate
    raise DatasetError("the curated fact set (locedit/data/facts.jsonl) is missing from this installation")


def curated_facts() -> FactFile:
    """The curated fact set, read."""
    return read_facts(curated_facts_path())


def edit_request(fact: Fact) -> EditRequest | None:
    """The edit request a fact-file row carries (its fact and `target_new`), or None when it has no `target_new`."""
    new = fact.meta.get("target_new") if isinstance(fact.meta, dict) else None
    return EditRequest(fact, new) if isinstance(new, str) and new.strip() else None


def known_facts(lm, facts: Iterable[Fact] | FactFile, *, top_k: int = 1, batch: int = 32,
                progress: bool = True) -> list[Fact]:
    """Facts whose true target's first token is among the model's top-`top_k` next tokens (the paper keeps top-1).

    Prompts run in padded batches of `batch`, shortest first. Facts without a target, or whose target cannot be
    encoded, are dropped (and counted in the log). The kept facts come back in their input order."""
    from tqdm.auto import tqdm

    from locedit.core.engine import run_batch

    if top_k < 1 or batch < 1:
        raise LoceditError(f"top_k and batch must be at least 1 (got top_k={top_k}, batch={batch})")
    facts = list(getattr(facts, "facts", facts))
    encoded, dropped = [], 0
    for i, fact in enumerate(facts):
        try:
            enc = lm.encode(fact)
        except FactError:
            dropped += 1
            continue
        if enc.target_id is None:
            dropped += 1
            continue
        encoded.append((i, enc))
    encoded.sort(key=lambda item: len(item[1]))
    keep: set[int] = set()
    bar = tqdm(total=len(encoded), desc="known facts", unit="fact", disable=None if progress else True,
               file=sys.stderr)
    with torch.no_grad(), bar:
        for start in range(0, len(encoded), batch):
            chunk = encoded[start:start + batch]
            logits = run_batch(lm, [enc for _, enc in chunk]).logits.float()
            top = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices.cpu()
            for row, (i, enc) in enumerate(chunk):
                if enc.target_id in top[row].tolist():
                    keep.add(i)
            bar.update(len(chunk))
    if dropped:
        logger.info("known_facts: dropped %d facts without an encodable target", dropped)
    return [fact for i, fact in enumerate(facts) if i in keep]

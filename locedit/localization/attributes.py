"""Attribute sets A_s: the tokens that describe a subject (paper §5, "attribute rate").

The paper builds A_s from Wikipedia paragraphs about the subject (retrieved with BM25; the file was never
released). `load_paragraphs` reads such paragraphs from a JSONL or CSV file; `generate_attribute_text` is an
offline stand-in that asks the model itself; `attribute_set` picks between the two.
"""

from __future__ import annotations

import csv
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from locedit.errors import DatasetError
from locedit.localization.common import clean_token

DEFAULT_PROMPTS: tuple[str, ...] = (
    "{subject} is",
    "Here is what I know about {subject}:",
    "{subject} is known for",
    "The most important facts about {subject} are",
)

_DECODED: "weakref.WeakKeyDictionary[object, dict[int, str]]" = weakref.WeakKeyDictionary()


def decode_ids(tokenizer, ids: Iterable[int]) -> list[str]:
    """Each id decoded on its own (`tokenizer.decode([id])`, as the official code's `decode_tokens`), memoised
    per tokenizer."""
    try:
        memo = _DECODED.setdefault(tokenizer, {})
    except TypeError:  # tokenizer without weak-reference support
        memo = {}
    out = []
    for i in ids:
        i = int(i)
        if i not in memo:
            memo[i] = tokenizer.decode([i])
        out.append(memo[i])
    return out


@dataclass(frozen=True)
class AttributeSet:
    """The attribute tokens A_s of a subject: decoded token strings (leading space kept, e.g. " Apple") that
    pass `clean_token`. `source` says where they came from ("paragraphs", "generated", "text", ...)."""

    subject: str
    tokens: frozenset[str]
    source: str

    def __contains__(self, token: object) -> bool:
        return token in self.tokens

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_text(cls, tokenizer, subject: str, text: str | Sequence[str], source: str = "text") -> AttributeSet:
        """Tokenize `text` (one string or several paragraphs), decode every token id on its own and keep the
        clean ones. Matching is on the exact decoded string, as in the official code (which keeps " Apple" and
        "Apple" apart). The official code filters the paragraph side with a case-sensitive stopword test; here
        both sides use `clean_token` (case-insensitive), which changes nothing in the intersection because
        the projected side is always filtered case-insensitively."""
        paragraphs = [text] if isinstance(text, str) else list(text)
        tokens: set[str] = set()
        for paragraph in paragraphs:
            for line in paragraph.splitlines():  # line by line: no model_max_length warnings on long texts
                if line.strip():
                    ids = tokenizer(line, add_special_tokens=False)["input_ids"]
                    tokens.update(t for t in decode_ids(tokenizer, ids) if clean_token(t))
        return cls(subject, frozenset(tokens), source)


# --------------------------------------------------------------------------------------------------------------
# Paragraph files
# --------------------------------------------------------------------------------------------------------------
TEXT_COLUMNS = ("text", "paragraphs")  # "paragraphs" is the official code's column name


def load_paragraphs(path: str | Path) -> dict[str, str]:
    """Paragraphs per subject from a JSONL file (`{"subject": ..., "text": ...}` per line) or a CSV file
    (columns `subject` and `text`, or the official code's `paragraphs`). Several rows of one subject are joined
    with newlines. A malformed row raises DatasetError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"paragraph file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        pairs = _read_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        pairs = _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise DatasetError(f"{path}: unknown paragraph file format {suffix!r}; use .jsonl or .csv")
    joined: dict[str, list[str]] = {}
    for subject, text in pairs:
        joined.setdefault(subject, []).append(text)
    return {subject: "\n".join(texts) for subject, texts in joined.items()}


def _row(path: Path, line: int, subject: object, text: object) -> tuple[str, str]:
    if not isinstance(subject, str) or not subject.strip():
        raise DatasetError(f"{path}, line {line}: missing or empty 'subject'")
    if not isinstance(text, str):
        raise DatasetError(f"{path}, line {line}: missing 'text' (a string) for subject {subject!r}")
    return subject.strip(), text


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    pairs = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}, line {line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}, line {line_no}: expected a JSON object, got {type(record).__name__}")
            text = next((record[c] for c in TEXT_COLUMNS if c in record), None)
            pairs.append(_row(path, line_no, record.get("subject"), text))
    return pairs


def _read_csv(path: Path, delimiter: str = ",") -> list[tuple[str, str]]:
    pairs = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        header = reader.fieldnames or []
        column = next((c for c in TEXT_COLUMNS if c in header), None)
        if "subject" not in header or column is None:
            raise DatasetError(f"{path}, line 1: the header must name a 'subject' column and a 'text' (or "
                               f"'paragraphs') column; found {header}")
        for record in reader:
            if None in record:
                raise DatasetError(f"{path}, line {reader.line_num}: more fields than the header has")
            pairs.append(_row(path, reader.line_num, record.get("subject"), record.get(column)))
    return pairs


# --------------------------------------------------------------------------------------------------------------
# Generated attribute text
# --------------------------------------------------------------------------------------------------------------
def generate_attribute_text(lm, subject: str, *, prompts: Sequence[str] | None = None, max_new_tokens: int = 48,
                            samples: int = 1, seed: int = 0, temperature: float = 1.0, top_p: float = 0.9) -> str:
    """Offline proxy for the paper's Wikipedia paragraphs: the model's own continuations of a few neutral
    prompts about the subject (one greedy and `samples` sampled continuations per prompt; the prompts
    themselves are not included). Sampling is seeded (`torch.manual_seed(seed)` inside a forked RNG, so the
    caller's random state is untouched); nothing is downloaded.

    Why it is a sound proxy: the attribute rate asks whether the subject's hidden representation encodes
    attributes the model associates with the subject, and the model's own text about the subject measures
    exactly those associations — no retrieval corpus or network needed, and it works for any subject.

    Limits: it is circular (the generated tokens are biased toward what the model readily predicts, which
    tends to inflate the rate compared with an external source); a few short continuations give a much smaller
    attribute vocabulary than several Wikipedia paragraphs (which tends to lower it); and hallucinated
    "attributes" count as attributes. Numbers from generated sets are comparable across layers and positions of
    one model, not with the paper's Wikipedia-based values.
    """
    templates = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    ids, mask = _left_padded(lm.tokenizer, [t.format(subject=subject) for t in templates])
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                  pad_token_id=_pad_id(lm.tokenizer))
    devices = [lm.device] if lm.device.type == "cuda" else []
    outputs = []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        outputs.append(lm.model.generate(**common, do_sample=False))
        if samples > 0:
            outputs.append(lm.model.generate(**common, do_sample=True, temperature=temperature, top_p=top_p,
                                             top_k=0, num_return_sequences=samples))
    texts = [lm.tokenizer.decode(row, skip_special_tokens=True).strip()
             for out in outputs for row in out[:, ids.shape[1]:]]
    return "\n".join(t for t in texts if t)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def _left_padded(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of `prompts`, left-padded into one batch (generation appends on the right)."""
    lists = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in lists)
    ids = torch.full((len(lists), width), _pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(lists), width), dtype=torch.long)
    for row, seq in enumerate(lists):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def attribute_set(lm, subject: str, paragraphs: Mapping[str, str] | None = None, **gen_kwargs) -> AttributeSet:
    """A_s from `paragraphs[subject]` when there is non-empty text for the subject (source "paragraphs"), else
    from the model's own continuations (`generate_attribute_text(**gen_kwargs)`, source "generated").

    Generation costs a few seconds on CPU: build the set once and pass it to every analysis of the subject.
    Generated sets are not cached, since an edit changes what the model generates."""
    text = (paragraphs or {}).get(subject)
    if text and text.strip():
        return AttributeSet.from_text(lm.tokenizer, subject, text, source="paragraphs")
    generated = generate_attribute_text(lm, subject, **gen_kwargs)
    return AttributeSet.from_text(lm.tokenizer, subject, generated, source="generated")

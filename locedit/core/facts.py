"""Facts and their token positions.

A `Fact` is a subject, a prompt that contains the subject, and an optional target. `encode_fact` tokenizes the
prompt and finds the subject's token span; `PositionGroups` names the position groups the paper's analyses use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from locedit.errors import FactError


@dataclass(frozen=True)
class Fact:
    """One factual query: `prompt` must contain `subject`; the model should continue it with `target`.

    `target=None` means "the model's own top-1 prediction" (the paper's convention). A given target is scored by
    its first token as it continues the prompt (a leading space is added when neither the prompt ends with nor
    the target starts with whitespace, as CounterFact targets are stored without one). A prompt may be a template
    with `{}` in place of the subject.
    """

    subject: str
    prompt: str
    target: str | None = None
    relation: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise FactError("empty prompt: a fact needs a prompt that contains its subject")
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise FactError(f"empty subject for prompt {self.prompt!r}")
        if "{}" in self.prompt:
            object.__setattr__(self, "prompt", self.prompt.replace("{}", self.subject, 1))
        if self.subject not in self.prompt:
            raise FactError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}")
        if self.target is not None and (not isinstance(self.target, str) or not self.target.strip()):
            raise FactError(f"target {self.target!r} is empty; give a non-empty string or None for the top-1")

    def target_text(self) -> str | None:
        """The target as it continues the prompt (with a leading space where one is needed)."""
        if self.target is None:
            return None
        if self.prompt[-1].isspace() or self.target[0].isspace():
            return self.target
        return " " + self.target


@dataclass(frozen=True)
class EditRequest:
    """What to edit: a `fact` and the `new_target` the edited model should give instead.

    `fact.target` is the true attribute the edit replaces (None: the model's own top-1). This is the one typed
    home of an edit request: `locedit.edit`, `evaluate`, the CLI and the dataset readers all use it.
    """

    fact: Fact
    new_target: str

    def __post_init__(self) -> None:
        if not isinstance(self.fact, Fact):
            raise FactError(f"an edit request needs a Fact, not {type(self.fact).__name__}")
        if not isinstance(self.new_target, str) or not self.new_target.strip():
            raise FactError(f"new target {self.new_target!r} is empty: give the attribute the edit should produce")
        if self.fact.target is not None and self.fact.target.strip() == self.new_target.strip():
            raise FactError(f"new target {self.new_target!r} is the fact's own target: nothing to edit")

    def new_target_text(self) -> str:
        """The new target as it continues the prompt (with a leading space where one is needed)."""
        return Fact(self.fact.subject, self.fact.prompt, self.new_target).target_text()


@dataclass(frozen=True)
class PositionGroups:
    """Token positions of an encoded prompt of length `n` (0-indexed, absolute).

    `non_subject` leaves out position 0 unless it is part of the subject (the attention-sink fix, see
    docs/analyses.md); `non_subject_paper` is the paper's exact group (every position except subject and last).
    """

    n: int
    subject: tuple[int, ...]
    subject_first: int
    subject_last: int
    after_subject: int
    last: int
    first: tuple[int, ...]
    non_subject: tuple[int, ...]
    non_subject_paper: tuple[int, ...]

    @classmethod
    def from_span(cls, n: int, start: int, end: int) -> PositionGroups:
        subject = tuple(range(start, end))
        last = n - 1
        paper = tuple(p for p in range(n - 1) if p not in subject)
        first = () if 0 in subject or last == 0 else (0,)
        return cls(
            n=n,
            subject=subject,
            subject_first=start,
            subject_last=end - 1,
            after_subject=min(end, last),
            last=last,
            first=first,
            non_subject=tuple(p for p in paper if p not in first),
            non_subject_paper=paper,
        )


@dataclass(frozen=True)
class EncodedFact:
    """A tokenized fact: ids, decoded tokens, the subject span [start, end) and the target's first token id."""

    fact: Fact
    input_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    subject_start: int
    subject_end: int
    target_id: int | None

    @property
    def positions(self) -> PositionGroups:
        return PositionGroups.from_span(len(self.input_ids), self.subject_start, self.subject_end)

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_fact(tokenizer, fact: Fact) -> EncodedFact:
    """Tokenize `fact.prompt` and find the token span of the first occurrence of the subject.

    The span is every token whose characters overlap the subject's characters (so a BPE token carrying the
    leading space, "ĠTower", or a SentencePiece "▁Tower" counts); special tokens such as BOS never do.
    """
    prompt = fact.prompt
    char_start = prompt.index(fact.subject)  # first occurrence, as the paper's find_token_range
    char_end = char_start + len(fact.subject)
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    if not ids:
        raise FactError(f"prompt {prompt!r} tokenizes to nothing")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    inside = [
        i for i, (a, b) in enumerate(offsets)
        if ids[i] not in special and b > a and a < char_end and b > char_start
    ]
    if not inside:
        raise FactError(f"could not map subject {fact.subject!r} to tokens of prompt {prompt!r}")
    start, end = inside[0], inside[-1] + 1
    tokens = tuple(tokenizer.decode([i]) for i in ids)
    target_id = _target_token(tokenizer, fact, ids) if fact.target is not None else None
    return EncodedFact(fact, tuple(ids), tokens, start, end, target_id)


def _target_token(tokenizer, fact: Fact, prompt_ids: list[int]) -> int:
    """First token of the target as it continues the prompt."""
    text = fact.target_text()
    assert text is not None
    joint = tokenizer(fact.prompt + text, add_special_tokens=True)["input_ids"]
    n = len(prompt_ids)
    if len(joint) > n and list(joint[:n]) == list(prompt_ids):
        return int(joint[n])
    alone = tokenizer(text, add_special_tokens=False)["input_ids"]
    alone = [i for i in alone if i not in set(getattr(tokenizer, "all_special_ids", []) or [])]
    if not alone:
        raise FactError(f"target {fact.target!r} tokenizes to nothing")
    return int(alone[0])

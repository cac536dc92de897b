"""Shared pieces of the flow analyses: targets, layer windows, result objects, vocabulary projection and cleaning."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch

from locedit.errors import FactError
from locedit.core.facts import EncodedFact, Fact
from locedit.core.lm import LM, Projection
from locedit.core.results import Result, jsonable

# NLTK's English stopword list (the official code filters with it), inlined so nothing is downloaded.
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom this
that that'll these those am is are was were be been being have has had having do does did doing a an the and but
if or because as until while of at by for with about against between into through during before after above below
to from up down in out on off over under again further then once here there when where why how all any both each
few more most other some such no nor not only own same so than too very s t can will just don don't should
should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't
haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't
weren weren't won won't wouldn wouldn't
""".split())


def clean_token(token: str) -> bool:
    """The paper's token filter: keep tokens whose stripped text is longer than 2 characters and no stopword."""
    stripped = token.strip()
    return len(stripped) > 2 and stripped.lower() not in STOPWORDS


@dataclass
class Target:
    """The token an analysis tracks: the fact's given target (its first token) when it has one, else the model's
    top-1 prediction (the paper's convention). `source` says which ("given" / "top1"); `text` is the given target
    as it continues the prompt, or the top-1 token's text."""

    token_id: int
    token: str
    base_prob: float
    is_top1: bool
    source: str
    text: str

    def fields(self) -> dict:
        """The result fields every analysis records besides `target`/`target_id`: `target_source`, `target_text`."""
        return {"target_source": self.source, "target_text": self.text}


def resolve_target(lm: LM, enc: EncodedFact) -> Target:
    """The fact's given target if it has one, else the model's top-1 prediction. Probabilities in float32.
    Analyses take `target=` to reuse one resolved target (see `locate`)."""
    from locedit.core.engine.run import forward_accepts

    kwargs = {"logits_to_keep": 1} if forward_accepts(lm, "logits_to_keep") else {}
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([enc.input_ids], device=lm.device), **kwargs).logits[0, -1]
    return _target_from_logits(lm, enc, logits)


@dataclass
class CleanRun:
    """The facts' clean forward, shared by the analyses `locate_batch` runs on one model state (the model must not
    change while it is used): right-padded captures of every site, each fact's last-position logits, and the
    clean bases' keys and values `run_packed` keeps (`clean_kv`)."""

    captures: Any  # locedit.core.engine.Captures
    logits: torch.Tensor
    kv: dict = field(default_factory=dict)


def clean_run(lm: LM, encs: Sequence[EncodedFact]) -> CleanRun:
    """One padded forward of the facts capturing the residual stream, MLP and attention outputs and heads."""
    from locedit.core.engine import Capture, run_batch

    with torch.no_grad():
        out = run_batch(lm, list(encs), capture=Capture(residual=True, mlp=True, attn=True, heads=True),
                        padding_side="right")
    return CleanRun(out.captures, out.logits)


def resolve_targets(lm: LM, encs: Sequence[EncodedFact], clean: CleanRun | None = None) -> list[Target]:
    """`resolve_target` for several facts in one padded forward (`run_batch`; padding changes no number), or from
    the `clean` run's logits."""
    from locedit.core.engine import run_batch

    if not encs:
        return []
    if clean is not None:
        logits = clean.logits
    else:
        with torch.no_grad():
            logits = run_batch(lm, list(encs)).logits
    return [_target_from_logits(lm, enc, row) for enc, row in zip(encs, logits)]


def _target_from_logits(lm: LM, enc: EncodedFact, logits: torch.Tensor) -> Target:
    probs = logits.float().softmax(-1)
    top = int(probs.argmax())
    given = enc.target_id is not None
    token_id = int(enc.target_id) if given else top
    token = lm.token_str(token_id)
    text = enc.fact.target_text() if given else token
    return Target(token_id, token, float(probs[token_id]), token_id == top, "given" if given else "top1", text)


def as_encoded(lm: LM, fact: Fact | EncodedFact) -> EncodedFact:
    if not isinstance(fact, (Fact, EncodedFact)):
        raise FactError(f"expected a locedit.Fact, got {type(fact).__name__}")
    return lm.encode(fact)


def window_layers(center: int, window: int, num_layers: int) -> range:
    """Layers of a window of `window` layers centred on `center`, clipped at the ends: with window 9,
    center-4 .. center+4 (the official code's `range(max(0, l - w//2), min(L, l - w//2 + w))`)."""
    start = center - window // 2
    return range(max(0, start), min(num_layers, start + window))


def project_topk(lm: LM, states: torch.Tensor, projection: Projection, k: int) -> torch.Tensor:
    """Top-k token ids of each state's vocabulary projection: (..., d) -> (..., k)."""
    with torch.no_grad():
        return lm.project(states, projection).topk(k, dim=-1).indices


def rank_of(scores: torch.Tensor, token_id: int) -> torch.Tensor:
    """Rank (0 = top) of `token_id` in each row of `scores` (..., vocab)."""
    return (scores > scores[..., token_id: token_id + 1]).sum(-1)


class FlowResult(Result):
    """Base of every analysis result: a dataclass with `to_dict()`, `save(path)`, `plot(ax=None)`, `summary()`
    and `_repr_html_()` (see `locedit.core.results.Result`)."""

    analysis: str = "flow"

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        return {"analysis": self.analysis, **jsonable(data)}

    def target_line(self) -> str:
        """The first line of every summary: the analysis, the prompt and the tracked target."""
        source = getattr(self, "target_source", "top1")
        where = "the given target" if source == "given" else "the model's top-1"
        prompt = self.fact.get("prompt") if isinstance(getattr(self, "fact", None), dict) else None
        p = getattr(self, "base_prob", getattr(self, "high_score", float("nan")))  # a trace's clean p is high_score
        return f"{self.analysis}: {prompt!r} -> {self.target!r} ({where}, p={p:.3f})"

    def summary(self) -> str:
        return self.target_line()


def fact_summary(enc: EncodedFact) -> dict:
    """JSON-ready description of an encoded fact (prompt, subject, tokens, span)."""
    return {"subject": enc.fact.subject, "prompt": enc.fact.prompt, "tokens": list(enc.tokens),
            "subject_span": [enc.subject_start, enc.subject_end], "relation": enc.fact.relation}

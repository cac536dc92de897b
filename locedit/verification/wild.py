"""WILD evaluation of many edits: what the edited model *generates*, against the unedited model (issue #18 §3).

"The Mirage of Model Editing" (ACL 2025) shows that teacher-forced token accuracy, EasyEdit's default, overstates
edits (96.8% where generation gives 38.5%); LocFT-BF (arXiv 2509.22072) reports WILD numbers. Measured here, all by
batched greedy generation (`metrics.greedy_generate_ids`: left padding, KV cache):
- **reliability**: the continuation of each edited prompt contains its new target (whole words, case-insensitive);
- **generalisation**: the same for each request's first paraphrase;
- **locality**: each request's first locality prompt generates the same first k tokens as the unedited model,
  k = the length of its recorded answer (`neighborhood_targets`; 1 without one): its answer is unchanged;
  `locality_strict` asks the same of all `max_new_tokens` tokens;
- **probe retention**: of a fixed probe set of facts the unedited model states (its continuation contains the true
  target), none of them edited, the share the edited model still states;
- **perplexity** of `metrics.PERPLEXITY_TEXT` and its drift against the unedited model;
- beside them, the **teacher-forced token accuracy** EasyEdit reports (`tf_reliability`, `tf_generalisation`): the
  share of the new target's tokens that are the argmax given the prompt and the target's earlier tokens.

The unedited model's generations are computed once (under `editing.edit.unedited`) and cached by prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from locedit.core.facts import EditRequest, Fact
from locedit.errors import LoceditError
from locedit.verification.metrics import continuation, teacher_forced_accuracy


@dataclass
class WildScores:
    """One WILD measurement: rates in [0, 1] (None where nothing was measured) and the counts behind them."""

    edits: int
    reliability: float | None
    generalisation: float | None
    locality: float | None
    locality_strict: float | None
    probe_retention: float | None
    perplexity: float
    perplexity_drift: float
    tf_reliability: float | None
    tf_generalisation: float | None
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def first(items) -> str | None:
    """The first prompt of a list (paraphrases, locality prompts), None when there is none."""
    return items[0] if isinstance(items, (list, tuple)) and items else None


def rate(flags: Sequence[bool]) -> float | None:
    return float(np.mean(flags)) if len(flags) else None


class WildEvaluator:
    """Scores an edited model against the unedited one on the requests edited so far and on `probes` (facts with
    true targets, none edited). `max_new_tokens`: length of every greedy continuation; `batch`: prompts per
    generation batch. `unedited`: prompt -> the unedited model's continuation ids, from an earlier run with the
    same model and `max_new_tokens` (`self.unedited_cache` after a run), so they are not generated again."""

    def __init__(self, lm, probes: Sequence[Fact], *, max_new_tokens: int = 10, batch: int = 32,
                 texts: Sequence[str] | None = None, unedited: dict[str, list[int]] | None = None) -> None:
        from locedit.verification.metrics import PERPLEXITY_TEXT

        for fact in probes:
            if fact.target is None:
                raise LoceditError(f"probe {fact.prompt!r} has no true target to retain")
        self.lm = lm
        self.probes = list(probes)
        self.max_new_tokens = max_new_tokens
        self.batch = batch
        self.texts = list(texts or PERPLEXITY_TEXT)
        self.unedited_cache: dict[str, list[int]] = dict(unedited or {})
        self._ppl0: float | None = None

    def _generate(self, prompts: Sequence[str]) -> list[list[int]]:
        from locedit.verification.metrics import greedy_generate_ids

        return greedy_generate_ids(self.lm, list(prompts), self.max_new_tokens, batch=self.batch)

    def unedited_generations(self, prompts: Sequence[str]) -> list[list[int]]:
        """The unedited model's greedy continuations (token ids), computed once per prompt."""
        from locedit.editing.edit import unedited

        todo = sorted({p for p in prompts if p not in self.unedited_cache})
        if todo:
            with unedited(self.lm):
                for prompt, ids in zip(todo, self._generate(todo)):
                    self.unedited_cache[prompt] = ids
        return [self.unedited_cache[p] for p in prompts]

    def stated(self, facts: Sequence[Fact], generations: Sequence[list[int]]) -> list[bool]:
        from locedit.verification.metrics import contains_target

        tok = self.lm.tokenizer
        return [contains_target(tok.decode(g, skip_special_tokens=True), f.target) for f, g in zip(facts, generations)]

    def known_probes(self, candidates: Sequence[Fact]) -> list[Fact]:
        """The candidates the unedited model states (its continuation contains the true target)."""
        candidates = [f for f in candidates if f.target]
        gens = self.unedited_generations([f.prompt for f in candidates])
        return [f for f, ok in zip(candidates, self.stated(candidates, gens)) if ok]

    def perplexity_before(self) -> float:
        from locedit.editing.edit import unedited
        from locedit.verification.metrics import perplexity

        if self._ppl0 is None:
            with unedited(self.lm):
                self._ppl0 = perplexity(self.lm, self.texts)
        return self._ppl0

    def score(self, requests: Sequence[EditRequest]) -> WildScores:
        """WILD scores of the model as it is now, for `requests` (the edits applied)."""
        import time

        from locedit.verification.metrics import contains_target, perplexity

        start = time.perf_counter()
        tok = self.lm.tokenizer
        requests = list(requests)
        paraphrased = [(first(r.fact.meta.get("paraphrases")), r) for r in requests]
        paraphrased = [(p, r) for p, r in paraphrased if p]
        local, answer_len = [], []
        for r in requests:
            prompt = first(r.fact.meta.get("neighborhood"))
            if prompt:
                local.append(prompt)
                answer_len.append(_answer_tokens(self.lm, prompt, first(r.fact.meta.get("neighborhood_targets"))))
        base_local = self.unedited_generations(local)
        base_probe = self.unedited_generations([f.prompt for f in self.probes])
        prompts = [r.fact.prompt for r in requests] + [p for p, _ in paraphrased] + local + \
            [f.prompt for f in self.probes]
        gens = self._generate(prompts)
        n_r, n_p, n_l = len(requests), len(paraphrased), len(local)
        rel = [contains_target(tok.decode(g, skip_special_tokens=True), r.new_target)
               for g, r in zip(gens[:n_r], requests)]
        gen = [contains_target(tok.decode(g, skip_special_tokens=True), r.new_target)
               for g, (_, r) in zip(gens[n_r:n_r + n_p], paraphrased)]
        loc_gens = gens[n_r + n_p:n_r + n_p + n_l]
        loc = [g[:k] == b[:k] for g, b, k in zip(loc_gens, base_local, answer_len)]
        loc_strict = [g == b for g, b in zip(loc_gens, base_local)]
        probe_gens = gens[n_r + n_p + n_l:]
        was = self.stated(self.probes, base_probe)
        now = self.stated(self.probes, probe_gens)
        kept = [b for a, b in zip(was, now) if a]
        tf_r = teacher_forced_accuracy(self.lm, [(r.fact.prompt, r.new_target_text()) for r in requests])
        tf_g = teacher_forced_accuracy(self.lm, [(p, _continuing(p, r.new_target)) for p, r in paraphrased])
        ppl0 = self.perplexity_before()
        ppl = perplexity(self.lm, self.texts)
        counts = {"requests": n_r, "paraphrases": n_p, "locality": n_l, "probes": int(sum(was))}
        return WildScores(edits=n_r, reliability=rate(rel), generalisation=rate(gen), locality=rate(loc),
                          locality_strict=rate(loc_strict),
                          probe_retention=rate(kept), perplexity=ppl, perplexity_drift=ppl / ppl0 - 1,
                          tf_reliability=rate(tf_r) if tf_r else None, tf_generalisation=rate(tf_g) if tf_g else None,
                          counts=counts, seconds=time.perf_counter() - start)


def _continuing(prompt: str, target: str) -> str:
    return continuation(prompt, target)


def _answer_tokens(lm, prompt: str, answer: str | None) -> int:
    """How many tokens the locality answer takes after its prompt (1 when there is no answer)."""
    from locedit.verification.metrics import target_ids

    if not answer or not answer.strip():
        return 1
    try:
        return len(target_ids(lm, prompt, continuation(prompt, answer)))
    except LoceditError:
        return 1

"""Behaviour metrics of an edit, as ROME's CounterFact evaluation computes them, plus the stricter ones.

* **Whole-string probability.** P(target | prompt) = exp(-mean per-token NLL) of every token of the target as it
  continues the prompt (" New York" is two tokens), as `rome:experiments/py/eval_utils_counterfact.py` scores
  `target_new` and `target_true`. Many (prompt, target) pairs go through one left-padded forward with an attention
  mask, the logits projected only at the scored positions (shortest first, in batches of at most `batch_tokens`
  tokens); log-probabilities are taken in float32.
* **Scores.** Efficacy ES = mean 1[P(new) > P(true)] and EM = mean P(new) - P(true) on the rewrite prompt;
  paraphrase PS/PM the same on paraphrases; neighbourhood NS = mean 1[P(true) > P(new)] and NM = mean
  P(true) - P(new) on neighbourhood prompts (each with its own true attribute); S = harmonic mean of ES, PS, NS.
* **Generation.** Greedy decoding (no sampling, KV cache, left padding) of N new tokens; generation efficacy asks
  whether the continuation contains the new target (not teacher-forced, as WILD/QAEdit argue).
* **Fluency GE.** ROME's n-gram entropy: per text, mean of (2/3 H2, 4/3 H3) with H_n the entropy (bits) of the
  text's n-gram frequency distribution; the metric is the mean over texts. ROME tokenises with nltk's
  `word_tokenize`; here words and punctuation marks are split with the regex `\\w+|[^\\w\\s]` (no nltk). As in ROME,
  the text is the prompt followed by its generation. (ROME samples top-5; generations here are greedy, so the
  number is deterministic.)
* **Neighbourhood KL** (CounterFact+): KL(P_before || P_after) of the next-token distributions on
  "<edit prompt><target_new>. <neighbour prompt>", in nats.
* **Perplexity drift**: perplexity of a fixed text sample (`PERPLEXITY_TEXT`) after / before - 1.

Every function takes an `LM` (or anything with `.model`, `.tokenizer` and `.device`) and runs the model as it is:
the caller decides whether the edit is applied (see `locedit.verification.verify`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from locedit.editing.values import left_padded
from locedit.core.engine import forward, forward_accepts, output_cache
from locedit.errors import FactError

# A fixed, neutral text sample for the perplexity drift (no facts that edits in the curated set touch).
PERPLEXITY_TEXT = [
    "The morning was cold and quiet. She made a cup of tea, opened the window and listened to the birds in the "
    "garden while the kettle cooled on the stove.",
    "To bake simple bread, mix flour, water, salt and yeast, knead the dough for ten minutes, let it rise for an "
    "hour and bake it in a hot oven until the crust is brown.",
    "Children learn to read by listening to stories, recognising letters and sounding out words. Over time they "
    "read longer books on their own and start to write short stories of their own.",
    "A good night of sleep helps the body recover. Most adults need seven to nine hours, and a regular schedule "
    "makes it easier to fall asleep and to wake up feeling rested.",
]

_WORDS = re.compile(r"\w+|[^\w\s]")


# --- tokenisation ------------------------------------------------------------------------------------------------
def _special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def prompt_ids(lm, prompt: str) -> list[int]:
    """The prompt's token ids as locedit encodes facts (with the tokenizer's special tokens, e.g. BOS)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise FactError(f"empty prompt {prompt!r}")
    return list(lm.tokenizer(prompt, add_special_tokens=True)["input_ids"])


def target_ids(lm, prompt: str, target: str, ids: Sequence[int] | None = None) -> list[int]:
    """Token ids of `target` as it continues `prompt` (locedit's convention for a fact's target: the joint
    tokenisation's suffix when the prompt's tokens are its prefix, else the target tokenised alone). Trailing
    special tokens (an EOS some tokenizers append) are dropped."""
    if not isinstance(target, str) or not target.strip():
        raise FactError(f"empty target {target!r}")
    ids = list(ids) if ids is not None else prompt_ids(lm, prompt)
    joint = list(lm.tokenizer(prompt + target, add_special_tokens=True)["input_ids"])
    special = _special_ids(lm.tokenizer)
    if len(joint) > len(ids) and joint[: len(ids)] == ids:
        out = joint[len(ids):]
    else:
        out = [i for i in lm.tokenizer(target, add_special_tokens=False)["input_ids"]]
    while out and out[-1] in special:
        out.pop()
    if not out:
        raise FactError(f"target {target!r} tokenizes to nothing after {prompt!r}")
    return out


def continuation(prompt: str, target: str) -> str:
    """The target as it continues the prompt: a leading space when neither side has whitespace (as `Fact`)."""
    if not target:
        return target
    if prompt[-1:].isspace() or target[0].isspace():
        return target
    return " " + target


# --- batched scoring ---------------------------------------------------------------------------------------------
def _batches(lengths: Sequence[int], batch_tokens: int) -> Iterable[list[int]]:
    """Indices grouped shortest first so that each padded batch holds at most `batch_tokens` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunk: list[int] = []
    for i in order:
        if chunk and (len(chunk) + 1) * lengths[i] > batch_tokens:
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def _last_logits(lm, rows: Sequence[Sequence[int]], counts: Sequence[int]) -> list[torch.Tensor]:
    """Each row's logits at its last `counts[r]` positions, float32 (count, vocab), from one left-padded forward:
    the rows end on the batch's last column, so only the last max(counts) columns are projected to the vocabulary
    (through `logits_to_keep` where the model takes it; the projection dominates short prompts' cost with a large
    vocabulary)."""
    input_ids, mask, position_ids = left_padded(lm, rows)
    keep = max(counts)
    out = forward(lm, input_ids, attention_mask=mask, position_ids=position_ids, logits_at=keep).logits
    return [out[r, keep - n:].float() for r, n in enumerate(counts)]


@torch.no_grad()
def token_nlls(lm, sequences: Sequence[tuple[Sequence[int], int]], *, batch_tokens: int = 2048,
               first_logprobs: dict | None = None) -> list[np.ndarray]:
    """Per-token negative log-likelihoods (nats, float32 log-softmax) of `ids[start:]` given the tokens before,
    for each `(ids, start)` (start >= 1), in left-padded batched forwards. Sequences whose inputs `ids[:-1]`
    coincide (a prompt scored for several one-token targets) share one row. `first_logprobs`: a dict whose keys
    are sequence indices; it is filled with the full next-token log-probabilities after `ids[:start]`."""
    for ids, start in sequences:
        if start < 1 or start >= len(ids):
            raise FactError(f"nothing to score: start {start} of a {len(ids)}-token sequence")
    rows: dict[tuple, int] = {}
    row_of = [rows.setdefault(tuple(ids[:-1]), len(rows)) for ids, _ in sequences]
    inputs = list(rows)
    users: list[list[int]] = [[] for _ in inputs]
    for i, r in enumerate(row_of):
        users[r].append(i)
    out: list[np.ndarray | None] = [None] * len(sequences)
    for chunk in _batches([len(x) for x in inputs], batch_tokens):
        # row r's logits from the position before its earliest scored token on (shared rows: the same length)
        counts = [len(inputs[r]) - min(sequences[i][1] for i in users[r]) + 1 for r in chunk]
        for r, n, logits in zip(chunk, counts, _last_logits(lm, [inputs[r] for r in chunk], counts)):
            for i in users[r]:
                ids, start = sequences[i]
                logp = logits[start - 1 - (len(inputs[r]) - n):].log_softmax(-1)
                if first_logprobs is not None and i in first_logprobs:
                    first_logprobs[i] = logp[0].cpu()
                tgt = torch.tensor(list(ids[start:]), device=logp.device)
                out[i] = (-logp.gather(1, tgt[:, None]).squeeze(1)).cpu().numpy()
    return out  # type: ignore[return-value]


def target_nlls(lm, pairs: Sequence[tuple[str, str]], *, batch_tokens: int = 2048,
                first_logprobs: dict | None = None) -> list[np.ndarray]:
    """Per-token NLL of each target (given with its leading space, as it continues the prompt)."""
    sequences = []
    for prompt, target in pairs:
        ids = prompt_ids(lm, prompt)
        sequences.append((ids + target_ids(lm, prompt, target, ids), len(ids)))
    return token_nlls(lm, sequences, batch_tokens=batch_tokens, first_logprobs=first_logprobs)


def target_probs(lm, pairs: Sequence[tuple[str, str]], *, batch_tokens: int = 2048,
                 first_logprobs: dict | None = None) -> np.ndarray:
    """P(target | prompt) = exp(-mean per-token NLL) of every pair, batched (ROME's whole-string probability).
    `first_logprobs` (pair index -> None) is filled with each listed prompt's next-token log-probabilities."""
    if not pairs:
        return np.zeros(0)
    nlls = target_nlls(lm, pairs, batch_tokens=batch_tokens, first_logprobs=first_logprobs)
    return np.array([math.exp(-float(n.mean())) for n in nlls])


@torch.no_grad()
def next_token_logprobs(lm, prompts: Sequence[str], *, batch_tokens: int = 2048) -> torch.Tensor:
    """(len(prompts), vocab) float32 log-probabilities of the next token after each prompt."""
    id_lists = [prompt_ids(lm, p) for p in prompts]
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for chunk in _batches([len(i) for i in id_lists], batch_tokens):
        for i, logits in zip(chunk, _last_logits(lm, [id_lists[i] for i in chunk], [1] * len(chunk))):
            out[i] = logits[0].log_softmax(-1).cpu()
    return torch.stack(out)  # type: ignore[arg-type]


@torch.no_grad()
def teacher_forced_accuracy(lm, pairs: Sequence[tuple[str, str]], *, batch_tokens: int = 2048) -> list[float]:
    """EasyEdit's token accuracy per (prompt, target): the share of the target's tokens that are the model's
    argmax after the prompt and the target's earlier tokens (teacher forcing)."""
    rows = []
    for prompt, target in pairs:
        ids = prompt_ids(lm, prompt)
        rows.append((ids, target_ids(lm, prompt, target, ids)))
    out = [0.0] * len(rows)
    for chunk in _batches([len(p) + len(t) for p, t in rows], batch_tokens):
        seqs = [(rows[i][0] + rows[i][1])[:-1] for i in chunk]
        for i, logits in zip(chunk, _last_logits(lm, seqs, [len(rows[i][1]) for i in chunk])):
            p, t = rows[i]
            pred = logits.argmax(-1).cpu().tolist()
            out[i] = float(np.mean([a == b for a, b in zip(pred, t)]))
    return out


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> np.ndarray:
    """KL(P || Q) per row, in nats, from log-probabilities (rows, vocab)."""
    logp, logq = logp.double(), logq.double()
    return (logp.exp() * (logp - logq)).sum(-1).clamp(min=0).numpy()


def perplexity(lm, texts: Sequence[str] = PERPLEXITY_TEXT, *, batch_tokens: int = 2048) -> float:
    """exp(mean NLL) over every token of every text after its first."""
    sequences = []
    for text in texts:
        ids = prompt_ids(lm, text)
        if len(ids) >= 2:
            sequences.append((ids, 1))
    nlls = np.concatenate(token_nlls(lm, sequences, batch_tokens=batch_tokens))
    return float(math.exp(float(nlls.mean())))


# --- generation ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_generate_ids(lm, prompts: Sequence[str], max_new_tokens: int | Sequence[int] = 20, *,
                        batch: int = 16, row_flags: Sequence[bool] | None = None,
                        set_rows: Callable[[list[bool]], None] | None = None) -> list[list[int]]:
    """Greedy continuations (new token ids, cut before the first EOS) of each prompt: left-padded batches, KV
    cache, position ids from the attention mask. `max_new_tokens`: one length for every prompt, or one per prompt.
    A row that has its tokens (or an EOS) leaves the batch, so short and long continuations share one prefill
    without the short ones paying for the long ones' steps (where the model's cache can drop rows).
    `row_flags` (one per prompt) and `set_rows`: before every forward, `set_rows` gets the flags of the batch's
    rows in order (`paired.UneditedRows.set_rows`: some rows of the batch run as the unedited model)."""
    if (row_flags is None) != (set_rows is None) or row_flags is not None and len(row_flags) != len(prompts):
        raise ValueError("row_flags (one per prompt) and set_rows go together")
    lengths = ([int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int)
               else [int(n) for n in max_new_tokens])
    if len(lengths) != len(prompts):
        raise ValueError(f"{len(lengths)} lengths for {len(prompts)} prompts")
    result: list[list[int]] = [[] for _ in prompts]
    todo = [i for i, n in enumerate(lengths) if n >= 1]
    id_lists = {i: prompt_ids(lm, prompts[i]) for i in todo}
    for start in range(0, len(todo), batch):
        idx = todo[start:start + batch]
        hook = None if set_rows is None else (lambda rows, idx=idx: set_rows([row_flags[idx[r]] for r in rows]))
        for i, ids in zip(idx, _generate_batch(lm, [id_lists[i] for i in idx], [lengths[i] for i in idx], hook)):
            result[i] = ids
    return result


def can_drop_rows(cache) -> bool:
    """Whether a key/value cache can keep only some of its batch rows (transformers' `batch_select_indices`)."""
    return hasattr(cache, "batch_select_indices")


def _generate_batch(lm, id_lists: list[list[int]], lengths: list[int],
                    before_forward: Callable[[list[int]], None] | None = None) -> list[list[int]]:
    eos = lm.tokenizer.eos_token_id
    input_ids, mask, position_ids = left_padded(lm, id_lists)
    keep = {"logits_to_keep": 1} if forward_accepts(lm, "logits_to_keep") else {}
    if before_forward is not None:
        before_forward(list(range(len(id_lists))))
    out = lm.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **keep)
    cache_kw = "cache" if forward_accepts(lm, "cache") else "past_key_values"
    cache = output_cache(out)
    generated: list[list[int]] = [[] for _ in id_lists]
    rows = list(range(len(id_lists)))  # the batch's rows, as indices into id_lists
    done: set[int] = set()  # rows with their tokens or an EOS (still in the batch where the cache cannot drop rows)
    while True:
        nxt = out.logits[:, -1].float().argmax(-1)
        for r, token in zip(rows, nxt.tolist()):
            if r in done:
                continue
            if token == eos:  # cut before the EOS
                done.add(r)
                continue
            generated[r].append(token)
            if len(generated[r]) >= lengths[r]:
                done.add(r)
        live = [r for r in rows if r not in done]
        if not live:
            break
        if len(live) < len(rows) and can_drop_rows(cache):
            where = torch.tensor([rows.index(r) for r in live], device=mask.device)
            cache.batch_select_indices(where)
            nxt, mask, position_ids = nxt[where], mask[where], position_ids[where]
            rows = live
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position_ids = position_ids[:, -1:] + 1
        if before_forward is not None:
            before_forward(rows)
        out = lm.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=position_ids, use_cache=True,
                       **{cache_kw: cache}, **keep)
        cache = output_cache(out)
    return generated


def greedy_generate(lm, prompts: Sequence[str], max_new_tokens: int = 20, *, batch: int = 16) -> list[str]:
    """Greedy continuations of each prompt, as text (the new tokens only)."""
    return [lm.tokenizer.decode(ids, skip_special_tokens=True)
            for ids in greedy_generate_ids(lm, prompts, max_new_tokens, batch=batch)]


def contains_target(text: str, target: str) -> bool:
    """Does the generated text contain the target (stripped, case-insensitive, on word boundaries)?"""
    target = target.strip()
    if not target:
        return False
    return re.search(r"(?<!\w)" + re.escape(target.lower()) + r"(?!\w)", text.lower()) is not None


# --- fluency -------------------------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Words and punctuation marks (a stand-in for nltk's word_tokenize)."""
    return _WORDS.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's `compute_n_gram_entropy`: the mean over n of weight_n * H_n, H_n = entropy (bits) of the text's
    n-gram frequency distribution (0 when the text has no n-gram)."""
    tokens = words(text)
    values = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        freqs = np.array(list(counts.values()), dtype=float)
        entropy = float(-(freqs / freqs.sum() * np.log2(freqs / freqs.sum())).sum()) if freqs.size else 0.0
        values.append(w * entropy)
    return float(np.mean(values))


def fluency(texts: Sequence[str]) -> float | None:
    """Generation entropy GE: the mean `ngram_entropy` of the texts (ROME's arithmetic aggregation)."""
    return float(np.mean([ngram_entropy(t) for t in texts])) if texts else None


# --- scores --------------------------------------------------------------------------------------------------------
def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return float(np.mean(values)) if values else None


def success_and_magnitude(p_first: Sequence[float], p_second: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean 1[p_first > p_second], mean p_first - p_second); None for no prompts."""
    first, second = np.asarray(p_first, float), np.asarray(p_second, float)
    if first.size == 0:
        return None, None
    return float(np.mean(first > second)), float(np.mean(first - second))


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean of the given values (None ones are left out; 0 if any is 0)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    if any(v <= 0 for v in values):
        return 0.0
    return float(len(values) / sum(1 / v for v in values))

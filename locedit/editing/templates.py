"""Context templates: short text prefixes the model generates once, put in front of the edit prompt so the edit
generalises beyond one exact context (ROME's 5- and 10-token prefixes, MEMIT's starts)."""

from __future__ import annotations

import json
import os
import tempfile

import torch

STARTS = ("The", "Therefore", "Because", "I", "You")  # MEMIT's starts
_MEMORY: dict = {}


def context_templates(lm, length_params, seed: int = 0) -> list[str]:
    """`["{}"]` plus, per (length, count) in `length_params`, `count` prefixes of `length` generated tokens, each
    ending in `". {}"`. Deterministic for a model and seed; cached in memory (per model object, so edits applied
    later reuse them) and under the locedit cache. `locedit.edit` calls it with every applied edit reverted, so
    templates always come from the unedited model."""
    spec = [[int(a), int(b)] for a, b in length_params]
    memory_key = (id(lm.model), json.dumps(spec), seed)  # stable while edits come and go
    if memory_key in _MEMORY:
        return list(_MEMORY[memory_key])
    path = _cache_path(_key(lm, spec, seed))
    templates = _read(path)
    if templates is None:
        templates = ["{}"] + [_clean(text) + ". {}" for length, count in spec
                              for text in _generate(lm, length, count, seed)]
        _write(path, templates)
    _MEMORY[memory_key] = templates
    return list(templates)


def _generate(lm, length: int, count: int, seed: int) -> list[str]:
    """`count` texts of `length` new tokens, top-5 sampling (as ROME's generate_fast), from MEMIT's starts."""
    texts: list[str] = []
    per_start = [count // len(STARTS) + (1 if i < count % len(STARTS) else 0) for i in range(len(STARTS))]
    tok = lm.tokenizer
    with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed + 1000 * length)
        for start, n in zip(STARTS, per_start):
            if n == 0:
                continue
            ids = torch.tensor([tok(start, add_special_tokens=True)["input_ids"]] * n, device=lm.device)
            out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                    max_new_tokens=length, min_new_tokens=length, pad_token_id=tok.pad_token_id)
            for row in out:
                texts.append(tok.decode(row, skip_special_tokens=True))
    return texts


def _clean(text: str) -> str:
    return " ".join(text.replace("{", " ").replace("}", " ").split())


def _key(lm, spec, seed) -> str:
    from locedit.editing.stats import model_fingerprint

    return f"{model_fingerprint(lm)}-{json.dumps(spec)}-{seed}"


def _cache_path(key: str):
    import hashlib

    from locedit.core.loading import cache_dir

    return cache_dir() / "templates" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def _read(path) -> list[str] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, list) and data and data[0] == "{}" and all(isinstance(t, str) and t.endswith("{}")
                                                                 for t in data):
        return data
    return None


def _write(path, templates: list[str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".templates.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(templates, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a regeneration next time

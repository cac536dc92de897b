"""Where was a model edited? Compare two models of one architecture tensor by tensor: which parameters differ, the
numerical rank of each 2-D difference, and what each parameter is, in words, through the architecture adapter
("layer 3 MLP output projection").

Rank: the number of singular values of the difference above `RANK_RTOL` times its largest one (float32 SVD).
A locedit ROME edit is rank 1 at its layer; a fine-tuning step changes many tensors at high rank.
"""

from __future__ import annotations

import torch

from locedit.errors import ModelMismatchError

RANK_RTOL = 1e-3
TOP_SINGULAR_VALUES = 5


def _geometry(lm) -> dict:
    return {"family": lm.adapter.family, "model_type": getattr(lm.model.config, "model_type", None),
            "num_layers": lm.num_layers, "d_model": lm.d_model, "num_heads": lm.num_heads,
            "num_kv_heads": lm.num_kv_heads, "head_dim": lm.head_dim, "vocab_size": lm.vocab_size}


def check_compatible(base, edited) -> None:
    """ModelMismatchError unless the two models share architecture, geometry, parameter names and shapes, and the
    tokenizer vocabulary."""
    gb, ge = _geometry(base), _geometry(edited)
    diffs = [f"{k} {gb[k]} vs {ge[k]}" for k in gb if gb[k] != ge[k]]
    if diffs:
        raise ModelMismatchError(f"the base and edited models differ in architecture: {', '.join(diffs)}")
    pb, pe = dict(base.model.named_parameters()), dict(edited.model.named_parameters())
    if set(pb) != set(pe):
        only = sorted(set(pb) ^ set(pe))
        raise ModelMismatchError(f"the base and edited models have different parameters (e.g. {only[0]!r})")
    shapes = [n for n in pb if pb[n].shape != pe[n].shape]
    if shapes:
        raise ModelMismatchError(f"parameter {shapes[0]!r} has shape {tuple(pb[shapes[0]].shape)} in the base "
                                 f"model and {tuple(pe[shapes[0]].shape)} in the edited one")
    if base.tokenizer.get_vocab() != edited.tokenizer.get_vocab():
        raise ModelMismatchError("the base and edited models' tokenizers have different vocabularies")


def describe_parameter(lm, name: str) -> dict:
    """What a parameter is: {"layer": L or None, "part": "MLP output projection" | ..., "where": words}."""
    a = lm.adapter
    for path, part in ((a.embed, "token embedding"), (a.unembed, "unembedding"), (a.final_norm, "final norm"),
                       (a.extra_embed, "position embedding")):
        if path and name.startswith(path + "."):
            return {"layer": None, "part": part, "where": part}
    prefix = a.layers + "."
    if name.startswith(prefix):
        layer_text, _, rest = name[len(prefix):].partition(".")
        if layer_text.isdigit():
            layer = int(layer_text)
            part = _layer_part(a, rest)
            return {"layer": layer, "part": part, "where": f"layer {layer} {part}"}
    return {"layer": None, "part": name, "where": name}


def _layer_part(a, rest: str) -> str:
    value = "value projection" if a.qkv_layout == "separate" else "query/key/value projection"
    named = [(a.mlp_down, "MLP output projection"), (a.attn_o, "attention output projection"),
             (a.qkv, f"attention {value}"), (a.mlp, "MLP"), (a.attn, "attention")]
    if a.pre_attn_norm:
        named.append((a.pre_attn_norm, "attention input norm"))
    for path, words in named:
        if rest.startswith(path + "."):
            tail = rest[len(path) + 1:]
            kind = tail.rsplit(".", 1)[-1]
            if words in ("MLP", "attention"):
                return f"{words} {tail.rsplit('.', 1)[0]} {kind}" if "." in tail else f"{words} {kind}"
            return words if kind == "weight" else f"{words} {kind}"
    return rest


@torch.no_grad()
def numerical_rank(change: torch.Tensor, rtol: float = RANK_RTOL) -> tuple[int, list[float]]:
    """The rank of a 2-D change (singular values above `rtol` x the largest) and its top singular values."""
    s = torch.linalg.svdvals(change.detach().float().cpu())
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0, []
    return int((s > rtol * s[0]).sum()), [float(x) for x in s[:TOP_SINGULAR_VALUES]]


@torch.no_grad()
def weight_diff(base, edited, *, rtol: float = RANK_RTOL) -> list[dict]:
    """Each parameter that differs between `base` and `edited` (checked compatible first): name, shape, where
    (adapter words, layer), relative Frobenius norm of the change, max |change|, and for 2-D tensors the rank."""
    check_compatible(base, edited)
    pe = dict(edited.model.named_parameters())
    out = []
    for name, wb in base.model.named_parameters():
        we = pe[name]
        a, b = wb.detach().float().cpu(), we.detach().float().cpu()
        if torch.equal(a, b):
            continue
        change = b - a
        row = {"name": name, "shape": list(wb.shape), **describe_parameter(base, name),
               "relative_norm": float(change.norm() / a.norm().clamp_min(1e-30)),
               "max_abs_change": float(change.abs().max()), "rank": None, "singular_values": []}
        if change.dim() == 2:
            row["rank"], row["singular_values"] = numerical_rank(change, rtol)
        out.append(row)
    return out


def edited_mlp_layers(diff: list[dict]) -> list[int]:
    """The layers whose MLP output projection changed (the sites the mechanistic checks read)."""
    return sorted({int(d["layer"]) for d in diff if d["part"] == "MLP output projection"})


def diff_lines(diff: list[dict], limit: int = 8) -> list[str]:
    """'where was it edited', for the terminal."""
    if not diff:
        return ["weights: the two models are identical"]
    lines = [f"weights: {len(diff)} tensor(s) differ"]
    for d in sorted(diff, key=lambda d: -d["relative_norm"])[:limit]:
        rank = f"rank {d['rank']}" if d["rank"] is not None else "1-D"
        lines.append(f"  {d['where']} ({d['name']}, {'x'.join(map(str, d['shape']))}): {rank}, "
                     f"|dW|/|W| {d['relative_norm']:.2e}")
    if len(diff) > limit:
        lines.append(f"  ... and {len(diff) - limit} more (verification.json has them all)")
    return lines

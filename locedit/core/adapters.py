"""Per-family architecture adapters: where each model family keeps its layers, sublayers and weights.

An adapter is data: dotted module paths plus a few layout tags. Analyses only talk to the adapter's
accessors, never to a family by name. Add a family by adding one `Adapter(...)` entry to `ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from locedit.errors import UnsupportedModelError

QKVLayout = Literal["separate", "fused", "gpt2_conv1d", "neox_interleaved"]


@dataclass(frozen=True)
class Adapter:
    """Where one family keeps its parts. Paths are dotted attribute paths.

    `layers`, `embed`, `final_norm` and `unembed` are relative to the top-level `*ForCausalLM` model; the
    others are relative to one decoder layer.

    `attn_out` / `mlp_out` name the module whose *output* is what that sublayer adds to the residual stream
    (the sublayer itself, or its post-norm in Gemma-2/3 and OLMo-2/3). `attn_o` is the attention output
    projection: its input is the concatenation of the per-head outputs. `mlp_down` is the MLP output
    projection: its input is the MLP "key" that rank-one editing (ROME/MEMIT) uses.
    """

    family: str
    model_types: tuple[str, ...]
    layers: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    attn_out: str
    attn_o: str
    mlp: str
    mlp_out: str
    mlp_down: str
    qkv: str  # the projection that produces values: v_proj, qkv_proj, c_attn or query_key_value
    qkv_layout: QKVLayout
    conv1d: bool = False  # GPT-2's Conv1D stores weights as (in, out)
    pre_attn_norm: str | None = "input_layernorm"  # norm in front of attention; None if none
    extra_embed: str | None = None  # GPT-2's learned position embeddings, added to the token embeddings

    # --- module access -------------------------------------------------------------------------------------
    def get_layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers)

    def layer_part(self, model: nn.Module, layer: int, path: str) -> nn.Module:
        return _get(self.get_layers(model)[layer], path)

    def final_norm_module(self, model: nn.Module) -> nn.Module:
        return _get(model, self.final_norm)

    def unembed_module(self, model: nn.Module) -> nn.Module:
        return _get(model, self.unembed)

    def embed_module(self, model: nn.Module) -> nn.Module:
        return _get(model, self.embed)

    # --- per-head weights ------------------------------------------------------------------------------------
    def head_value_weight(self, model: nn.Module, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W_V, b_V) of one query head, W_V of shape (head_dim, d_model): v = W_V @ x + b_V.

        Grouped-query attention maps query head h to kv head h // (n_heads / n_kv_heads)."""
        proj = self.layer_part(model, layer, self.qkv)
        weight = proj.weight.T if self.conv1d else proj.weight  # (out, in)
        rows = self.head_value_rows(model, head)
        return weight[rows], (proj.bias[rows] if proj.bias is not None else None)

    def head_value_rows(self, model: nn.Module, head: int) -> slice:
        """The output rows of the value-producing projection (`qkv`) that hold query head `head`'s values (its kv
        head's, with grouped-query attention)."""
        cfg = text_config(model)
        n_heads, n_kv, head_dim, d = head_geometry(cfg)
        kv_head = head // (n_heads // n_kv)
        if self.qkv_layout == "separate":
            rows = slice(kv_head * head_dim, (kv_head + 1) * head_dim)
        elif self.qkv_layout == "fused":  # [q | k | v] blocks (Phi-3)
            start = n_heads * head_dim + n_kv * head_dim + kv_head * head_dim
            rows = slice(start, start + head_dim)
        elif self.qkv_layout == "gpt2_conv1d":  # [q | k | v], each d_model wide
            start = 2 * n_heads * head_dim + head * head_dim
            rows = slice(start, start + head_dim)
        elif self.qkv_layout == "neox_interleaved":  # per head: [q_h | k_h | v_h]
            start = head * 3 * head_dim + 2 * head_dim
            rows = slice(start, start + head_dim)
        else:  # pragma: no cover - guarded by the Literal
            raise UnsupportedModelError(f"unknown qkv layout {self.qkv_layout!r}")
        return rows

    def head_output_weight(self, model: nn.Module, layer: int, head: int) -> torch.Tensor:
        """W_O slice of one head, shape (d_model, head_dim): the head writes W_O @ z_h to the residual."""
        _, _, head_dim, _ = head_geometry(text_config(model))
        proj = self.layer_part(model, layer, self.attn_o)
        weight = proj.weight.T if self.conv1d else proj.weight  # (out=d_model, in=n_heads*head_dim)
        return weight[:, head * head_dim : (head + 1) * head_dim]

    def attn_output_bias(self, model: nn.Module, layer: int) -> torch.Tensor | None:
        return self.layer_part(model, layer, self.attn_o).bias

    def mlp_output_bias(self, model: nn.Module, layer: int) -> torch.Tensor | None:
        return self.layer_part(model, layer, self.mlp_down).bias

    @property
    def post_norms(self) -> bool:
        """True where sublayer outputs pass through a norm before joining the residual (Gemma-2/3, OLMo-2/3)."""
        return self.attn_out != self.attn


def _get(root: nn.Module, path: str) -> nn.Module:
    obj: nn.Module = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def text_config(model: nn.Module):
    """The decoder's text config (multimodal configs nest it)."""
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def head_geometry(cfg) -> tuple[int, int, int, int]:
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    d = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or d // n_heads
    return n_heads, n_kv, head_dim, d


_LLAMA_LIKE = dict(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    attn_out="self_attn",
    attn_o="self_attn.o_proj",
    mlp="mlp",
    mlp_out="mlp",
    mlp_down="mlp.down_proj",
    qkv="self_attn.v_proj",
    qkv_layout="separate",
)
_POST_NORM = dict(_LLAMA_LIKE, attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm")

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(
        family="gpt2", model_types=("gpt2",), layers="transformer.h", embed="transformer.wte",
        final_norm="transformer.ln_f", unembed="lm_head", attn="attn", attn_out="attn", attn_o="attn.c_proj",
        mlp="mlp", mlp_out="mlp", mlp_down="mlp.c_proj", qkv="attn.c_attn", qkv_layout="gpt2_conv1d",
        conv1d=True, pre_attn_norm="ln_1", extra_embed="transformer.wpe",
    ),
    Adapter(
        family="gptj", model_types=("gptj",), layers="transformer.h", embed="transformer.wte",
        final_norm="transformer.ln_f", unembed="lm_head", attn="attn", attn_out="attn", attn_o="attn.out_proj",
        mlp="mlp", mlp_out="mlp", mlp_down="mlp.fc_out", qkv="attn.v_proj", qkv_layout="separate",
        pre_attn_norm="ln_1",
    ),
    Adapter(
        family="gpt_neox", model_types=("gpt_neox",), layers="gpt_neox.layers", embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm", unembed="lm_head", attn="attention",
        attn_out="attention", attn_o="attention.dense", mlp="mlp", mlp_out="mlp", mlp_down="mlp.dense_4h_to_h",
        qkv="attention.query_key_value", qkv_layout="neox_interleaved",
    ),
    Adapter(family="llama", model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "smollm3"), **_LLAMA_LIKE),
    Adapter(family="olmo", model_types=("olmo",), **_LLAMA_LIKE),
    Adapter(family="phi3", model_types=("phi3",), **dict(_LLAMA_LIKE, qkv="self_attn.qkv_proj", qkv_layout="fused")),
    Adapter(family="gemma2", model_types=("gemma2", "gemma3_text", "gemma3"), **_POST_NORM),
    Adapter(
        family="olmo2", model_types=("olmo2", "olmo3"),
        **dict(_POST_NORM, pre_attn_norm=None),
    ),
    Adapter(
        family="phi", model_types=("phi",), **dict(
            _LLAMA_LIKE, final_norm="model.final_layernorm", attn_o="self_attn.dense", mlp_down="mlp.fc2",
        ),
    ),
    Adapter(
        family="starcoder2", model_types=("starcoder2",), **dict(_LLAMA_LIKE, mlp_down="mlp.c_proj"),
    ),
)

ENCODER_ONLY_TYPES = ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                      "modernbert", "t5", "bart", "mt5", "mbart")


def supported_model_types() -> list[str]:
    return sorted({t for a in ADAPTERS for t in a.model_types})


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of `model`'s family, or UnsupportedModelError naming the supported families."""
    model_type = getattr(text_config(model), "model_type", None) or getattr(model.config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            try:
                adapter.get_layers(model)
                adapter.unembed_module(model)
            except (AttributeError, IndexError) as exc:
                raise UnsupportedModelError(
                    f"model of type {model_type!r} ({type(model).__name__}) does not have the layout of the "
                    f"{adapter.family!r} adapter ({exc}); load it with AutoModelForCausalLM"
                ) from exc
            return adapter
    if model_type in ENCODER_ONLY_TYPES or not getattr(model, "can_generate", lambda: True)():
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model_type!r}) is not a causal decoder-only language model; "
            "locedit needs an auto-regressive LM (e.g. GPT-2, Llama, Qwen, Gemma)"
        )
    raise UnsupportedModelError(
        f"unsupported architecture {model_type!r} ({type(model).__name__}); supported model types: "
        + ", ".join(supported_model_types())
    )

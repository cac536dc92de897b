"""`LM`: a Hugging Face causal LM, its tokenizer and its architecture adapter, with the few helpers every
analysis needs (encoding facts, predicting, projecting hidden states to the vocabulary)."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn

from locedit.core.adapters import Adapter, head_geometry, text_config, adapter_for
from locedit.errors import FactError, LoceditError
from locedit.core.facts import EncodedFact, Fact, encode_fact

Projection = Literal["model", "paper"]


@contextmanager
def materialized(*modules: nn.Module) -> Iterator[None]:
    """Within the block, the parameters of `modules` (and their submodules) that accelerate offloaded (a
    `device_map` with "cpu"/"disk" entries: they sit on the meta device between forwards) are loaded on their
    execution device, so code that reads weights directly (OV circuits, direct logit attribution) sees them. A
    no-op for models without offloading."""
    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:  # pragma: no cover - accelerate is a dependency
        yield
        return
    with ExitStack() as stack:
        for module in modules:
            for sub in module.modules():
                if has_offloaded_params(sub):
                    stack.enter_context(align_module_device(sub))
        yield


@dataclass
class Prediction:
    token_id: int
    token: str
    prob: float


class LM:
    """A causal LM ready for locedit: `.model`, `.tokenizer`, `.adapter` and its geometry."""

    def __init__(self, model: nn.Module, tokenizer, adapter: Adapter | None = None, name: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = adapter or adapter_for(model)
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        cfg = text_config(model)
        self.num_heads, self.num_kv_heads, self.head_dim, self.d_model = head_geometry(cfg)
        self.num_layers = len(self.adapter.get_layers(model))
        self.vocab_size = self.adapter.unembed_module(model).weight.shape[0]
        self.logit_softcap = getattr(cfg, "final_logit_softcapping", None)
        if tokenizer is not None and tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token

    def __repr__(self) -> str:
        return (f"LM({self.name!r}, family={self.adapter.family}, layers={self.num_layers}, heads={self.num_heads}, "
                f"d_model={self.d_model})")

    # --- structure ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def layers(self) -> nn.ModuleList:
        return self.adapter.get_layers(self.model)

    @property
    def embedding_matrix(self) -> torch.Tensor:
        """The input token-embedding matrix E, (vocab, d_model)."""
        return self.adapter.embed_module(self.model).weight

    @property
    def tied_embeddings(self) -> bool:
        unembed = self.adapter.unembed_module(self.model).weight
        embed = self.embedding_matrix
        return unembed is embed or (unembed.shape == embed.shape and unembed.data_ptr() == embed.data_ptr())

    # --- facts ---------------------------------------------------------------------------------------------
    def encode(self, fact: Fact | EncodedFact) -> EncodedFact:
        if isinstance(fact, EncodedFact):
            return fact
        if not isinstance(fact, Fact):
            raise FactError(f"expected a locedit.Fact, got {type(fact).__name__}")
        return encode_fact(self.tokenizer, fact)

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)])

    @torch.no_grad()
    def predict(self, fact: Fact | EncodedFact, k: int = 1) -> list[Prediction]:
        """The model's top-k next tokens after the fact's prompt (no intervention)."""
        enc = self.encode(fact)
        ids = torch.tensor([enc.input_ids], device=self.device)
        logits = self.model(input_ids=ids).logits[0, -1].float()
        probs = logits.softmax(-1)
        values, indices = probs.topk(k)
        return [Prediction(int(i), self.token_str(int(i)), float(v)) for v, i in zip(values, indices)]

    # --- vocabulary projection -------------------------------------------------------------------------------
    def unembed(self, hidden: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """Logits of residual-stream states: final norm (if `normalize`), unembedding (+bias), logit soft-cap.
        Runs in the model's dtype (a float32 state is cast first); see `target_logit` for float32 logits."""
        hidden = hidden.to(self.dtype)
        if normalize:
            hidden = self.adapter.final_norm_module(self.model)(hidden)
        logits = self.adapter.unembed_module(self.model)(hidden.to(self.dtype))
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def apply_norm(self, norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """A norm module of the model applied in float32 whatever the model's dtype (for statistics such as direct
        logit attributions, where half precision would cancel small differences away)."""
        hidden = hidden.float()
        if isinstance(norm, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
            weight = norm.weight.float() if norm.weight is not None else None
            if isinstance(norm, nn.LayerNorm):
                bias = norm.bias.float() if norm.bias is not None else None
                return nn.functional.layer_norm(hidden, norm.normalized_shape, weight, bias, norm.eps)
            return nn.functional.rms_norm(hidden, norm.normalized_shape, weight, norm.eps)
        return norm(hidden).float()  # HF's RMSNorms compute in float32 and keep a float32 input's dtype

    def target_logit(self, hidden: torch.Tensor, token_id: int, *, normalize: bool = True) -> torch.Tensor:
        """The logit of one token for residual states (..., d_model), computed in float32: final norm (if
        `normalize`), that token's unembedding row (+bias), logit soft-cap. Returns (...)."""
        norm, unembed = self.adapter.final_norm_module(self.model), self.adapter.unembed_module(self.model)
        with materialized(norm, unembed):
            if normalize:
                hidden = self.apply_norm(norm, hidden)
            logit = hidden.float() @ unembed.weight[int(token_id)].float()
            if getattr(unembed, "bias", None) is not None:
                logit = logit + unembed.bias[int(token_id)].float()
        if self.logit_softcap:
            logit = torch.tanh(logit / self.logit_softcap) * self.logit_softcap
        return logit

    def project(self, hidden: torch.Tensor, projection: Projection = "model") -> torch.Tensor:
        """Vocabulary scores of a hidden state (or a sublayer output).

        `"paper"`: multiply by the input embedding matrix with no final norm, as the official code does (only
        exact for tied-embedding GPT-2). `"model"`: the model's own final norm and unembedding, the right lens
        for untied models and for models whose norm rescales dimensions.
        """
        if projection == "paper":
            return hidden.to(self.dtype) @ self.embedding_matrix.T
        if projection == "model":
            return self.unembed(hidden)
        raise LoceditError(f"unknown projection {projection!r}; use 'model' or 'paper'")

    def default_projection(self) -> Projection:
        """The paper's projection for tied models, the model's own unembedding for untied ones."""
        return "paper" if self.tied_embeddings and self.adapter.family == "gpt2" else "model"


VALIDATION_PROMPT = "The Eiffel Tower is located in the city of"
# The no-op check's tolerance, in units of the dtype's machine epsilon, relative to the largest logit. Measured
# (docs/gpu.md): changes that only round differently move the logits of the validation prompt by up
# to 3.0 eps in bfloat16 / 3.6 eps in float16 (same weights through SDPA vs eager attention, SmolLM2-135M and tiny
# random models of every family; an explicit mask can switch kernels on a GPU) and 3.6 eps (bfloat16 rotary
# positions shifted by one, tiny Llama). 16 eps leaves a 4x margin; a broken adapter (attention without its causal
# mask) moves them by 30-64% of the largest logit, 40-80 bfloat16 eps (tested in tests/test_scale.py).
VALIDATION_EPS = 16.0


def validation_tolerance(dtype: torch.dtype) -> float:
    """Largest allowed |no-op run - plain forward| relative to the largest logit: max(1e-3, 16 eps(dtype)),
    i.e. 1e-3 in float32, 1.6e-2 in float16 and 0.125 in bfloat16."""
    return max(1e-3, VALIDATION_EPS * torch.finfo(dtype).eps)


def _validation_ids(lm: LM) -> list[int]:
    if lm.tokenizer is not None:
        try:
            ids = [int(i) % lm.vocab_size for i in lm.tokenizer(VALIDATION_PROMPT)["input_ids"]]
            if len(ids) >= 3:
                return ids
        except Exception:  # a tokenizer that cannot encode text: arbitrary ids below
            pass
    return [int(i) % lm.vocab_size for i in (11, 12, 13, 14, 15, 16)]


def validate_adapter(lm: LM, prompt_ids: list[int] | None = None) -> None:
    """Check that the adapter really controls the model: a no-op run equals the plain forward (within
    `validation_tolerance` of the model's dtype), and knocking out every attention edge of the last position (and
    every MLP) changes the output. Raises UnsupportedModelError."""
    from locedit.core.engine import BlockAttention, SetSublayer, run
    from locedit.errors import UnsupportedModelError

    ids = prompt_ids or _validation_ids(lm)
    n = len(ids)
    with torch.no_grad():
        plain = lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0, -1].float()
        out = run(lm, ids, [[], [BlockAttention(range(lm.num_layers), [n - 1], range(n - 1))],
                            [SetSublayer("mlp", range(lm.num_layers), range(n))]], reuse_prefix=False)
    logits = out.logits.float().to(plain.device)
    scale = plain.abs().max().clamp(min=1.0)
    tolerance = validation_tolerance(lm.dtype)
    diff = float((logits[0] - plain).abs().max() / scale)
    if not diff <= tolerance:  # also NaN
        raise UnsupportedModelError(f"adapter {lm.adapter.family!r} changes {lm.name}'s output without any "
                                    f"intervention (by {diff:.3g} of the largest logit; {lm.dtype} allows "
                                    f"{tolerance:.3g}); the model does not match the adapter")
    for row, what in ((1, "an attention knockout"), (2, "an MLP knockout")):
        if (logits[row] - plain).abs().max() <= 1e-6 * scale:
            raise UnsupportedModelError(f"{what} through adapter {lm.adapter.family!r} does not change "
                                        f"{lm.name}'s output; the adapter does not reach the model's modules")

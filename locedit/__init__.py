"""locedit: locate, edit and verify factual knowledge in causal language models."""

from .adapters import Adapter, supported_model_types
from .engine import (
    AddEmbeddingNoise,
    BlockAttention,
    Capture,
    RunResult,
    SetHeads,
    SetResidual,
    SetSublayer,
    UniformAttention,
    intervene,
    run,
    run_batch,
)
from .errors import (
    DatasetError,
    FactError,
    InterventionError,
    LoceditError,
    ModelLoadError,
    UnsupportedModelError,
)
from .facts import EncodedFact, Fact, PositionGroups
from .lm import LM
from .loading import DEFAULT_MODEL, load

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AddEmbeddingNoise", "BlockAttention", "Capture", "DEFAULT_MODEL", "DatasetError", "EncodedFact",
    "Fact", "FactError", "InterventionError", "LM", "LoceditError", "ModelLoadError", "PositionGroups",
    "RunResult", "SetHeads", "SetResidual", "SetSublayer", "UniformAttention", "UnsupportedModelError",
    "intervene", "load", "run", "run_batch", "supported_model_types",
]

"""The batched intervention engine: specify interventions as data, run many of them in one forward pass."""

from .hooks import registered
from .interventions import (
    AddEmbeddingNoise,
    BlockAttention,
    Capture,
    Intervention,
    SetHeads,
    SetResidual,
    SetSublayer,
    UniformAttention,
)
from .run import Captures, RunResult, intervene, run, run_batch, run_packed

__all__ = [
    "AddEmbeddingNoise", "BlockAttention", "Capture", "Captures", "Intervention", "RunResult", "SetHeads",
    "SetResidual", "SetSublayer", "UniformAttention", "intervene", "registered", "run", "run_batch", "run_packed",
]

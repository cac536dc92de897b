"""The batched intervention engine: specify interventions as data, run many of them in one forward pass."""

from locedit.core.engine.hooks import registered
from locedit.core.engine.interventions import (
    AddEmbeddingNoise,
    BlockAttention,
    Capture,
    Intervention,
    SetHeads,
    SetResidual,
    SetSublayer,
    UniformAttention,
)
from locedit.core.engine.run import Captures, RunResult, intervene, run, run_batch, run_packed

__all__ = [
    "AddEmbeddingNoise", "BlockAttention", "Capture", "Captures", "Intervention", "RunResult", "SetHeads",
    "SetResidual", "SetSublayer", "UniformAttention", "intervene", "registered", "run", "run_batch", "run_packed",
]

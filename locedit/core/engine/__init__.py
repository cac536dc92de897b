"""The batched intervention engine: specify interventions as data, run many of them in one forward pass."""

from locedit.core.engine.hooks import registered
from locedit.core.engine.interventions import (
    PROJECTIONS,
    AddEmbeddingNoise,
    AddLinear,
    AddToSublayer,
    BlockAttention,
    Capture,
    Intervention,
    SetHeads,
    SetResidual,
    SetSublayer,
    UniformAttention,
)
from locedit.core.engine.moments import Moments, second_moments
from locedit.core.engine.prefixed import PrefixedBatch, PrefixedResult, prefixed
from locedit.core.engine.run import (
    Captures,
    RunResult,
    forward,
    forward_accepts,
    intervene,
    output_cache,
    run,
    run_batch,
    run_packed,
)

__all__ = [
    "PROJECTIONS", "AddEmbeddingNoise", "AddLinear", "AddToSublayer", "BlockAttention", "Capture", "Captures",
    "Intervention", "Moments", "PrefixedBatch", "PrefixedResult", "RunResult", "SetHeads", "SetResidual",
    "SetSublayer", "UniformAttention", "forward", "forward_accepts", "intervene", "output_cache", "prefixed",
    "registered", "run", "run_batch", "run_packed", "second_moments",
]

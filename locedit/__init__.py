"""locedit: locate, edit and verify factual knowledge in causal language models."""

from locedit.core.adapters import Adapter, supported_model_types
from locedit.core.engine import (
    AddEmbeddingNoise,
    AddLinear,
    AddToSublayer,
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
from locedit.errors import (
    CalibrationError,
    DatasetError,
    EditError,
    FactError,
    InterventionError,
    LoceditError,
    ModelLoadError,
    ModelMismatchError,
    UnsupportedModelError,
)
from locedit.core.facts import EditRequest, EncodedFact, Fact, PositionGroups
from locedit.core.head import Head
from locedit.core.lm import LM
from locedit.core.loading import DEFAULT_MODEL, load
from locedit.localization.sites import SiteMap, locate
from locedit.editing import Calibration, Edit, calibrate, edit, load_calibration, load_edit, save_model
from locedit.verification import Verification, verify, verify_models

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AddEmbeddingNoise", "AddLinear", "AddToSublayer", "Calibration", "EditRequest", "Head", "Edit",
    "EditError", "SiteMap", "calibrate", "edit", "load_calibration", "load_edit", "locate",
    "save_model", "BlockAttention", "CalibrationError", "Capture", "DEFAULT_MODEL", "DatasetError", "EncodedFact",
    "Verification", "verify", "verify_models", "ModelMismatchError",
    "Fact", "FactError", "InterventionError", "LM", "LoceditError", "ModelLoadError", "PositionGroups",
    "RunResult", "SetHeads", "SetResidual", "SetSublayer", "UniformAttention", "UnsupportedModelError",
    "intervene", "load", "run", "run_batch", "supported_model_types",
]

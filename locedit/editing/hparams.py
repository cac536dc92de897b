"""Hyper-parameters of each editing method: one dataclass each, names as in ROME/MEMIT's JSON files (so EasyEdit
users recognise them), defaults from those files (ROME: GPT-2 XL / GPT-J; MEMIT: GPT-J) unless noted.

`hparams=` of `locedit.edit` takes an instance, a dict, or a JSON/YAML file; unknown names are refused."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from locedit.errors import LoceditError


@dataclass
class ValueHyperParams:
    """Optimisation of the target value v* (ROME's compute_v / MEMIT's compute_z)."""

    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    # (length, count) pairs of generated context prefixes; ROME: 10 of 5 tokens and 10 of 10 tokens (+ the bare "{}")
    context_template_length_params: list = field(default_factory=lambda: [[5, 10], [10, 10]])
    kl_prompt: str = "{} is a"
    seed: int = 0


@dataclass
class ROMEHyperParams(ValueHyperParams):
    """ROME with the r-ROME fix (the template-averaged key in the update's numerator and denominator)."""

    mom2_adjustment: bool = True  # False: C = I (what EasyEdit's ROME configs ship); True: the paper's C⁻¹k*
    stats_tokens: int | None = None  # None: ≈ 10 × d_k tokens of the default corpus


@dataclass
class MEMITHyperParams(ValueHyperParams):
    """MEMIT (and AlphaEdit with `nullspace=True`)."""

    v_num_grad_steps: int = 25
    clamp_norm_factor: float = 0.75
    context_template_length_params: list = field(default_factory=lambda: [[10, 5]])
    # λ of λC + KKᵀ. None: MEMIT's GPT-J value scaled to this model's key width, λ = 15000 · d_k / 16384. With
    # keys of similar per-coordinate size, ‖k‖² grows with d_k while E[kkᵀ]'s eigenvalues do not, so a fixed λ
    # would make the update on a small model 10-100× weaker than on GPT-J.
    mom2_update_weight: float | None = None
    stats_tokens: int | None = None
    nullspace: bool = False  # AlphaEdit: project the update onto the null space of the preserved keys
    nullspace_threshold: float = 2e-2  # AlphaEdit: eigenvalues of E[kkᵀ] below this span the null space
    L2: float = 10.0  # AlphaEdit's ridge α
    batch_facts: int = 16  # facts whose z are optimised together in one forward per step (same result, fewer launches)


@dataclass
class HeadHyperParams(ValueHyperParams):
    """Rank-one edits of extraction heads' parameters (locedit's own method).

    `mode="out"`: the head's slice of the attention output projection, keyed on the head's output at the last
    position. `mode="value"`: the head's value projection, keyed on the attention input at the subject/carrier
    position (with grouped-query attention this changes every query head that shares the kv head)."""

    mode: str = "out"
    v_num_grad_steps: int = 25
    mom2_adjustment: bool = True
    stats_tokens: int | None = None


@dataclass
class FTHyperParams:
    """FT-L (ROME paper's constrained fine-tuning baseline): Adam on one layer's MLP output projection, every
    entry of the change clamped to ±`norm_constraint`, NLL of the new target on the prompt."""

    num_steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 5e-4
    early_stop_loss: float = 1e-2


METHOD_HPARAMS = {"rome": ROMEHyperParams, "memit": MEMITHyperParams, "head": HeadHyperParams, "ft": FTHyperParams}


def resolve_hparams(method: str, hparams) -> object:
    """An instance of `method`'s hyper-parameter class from None, an instance, a dict, or a JSON/YAML path."""
    cls = METHOD_HPARAMS[method]
    if hparams is None:
        return cls()
    if isinstance(hparams, cls):
        return hparams
    if isinstance(hparams, (str, os.PathLike)):
        hparams = _read_file(Path(hparams))
    if not isinstance(hparams, dict):
        raise LoceditError(f"hparams must be a dict, a JSON/YAML file or a {cls.__name__}, not "
                           f"{type(hparams).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    ignored = {"alg_name", "model_name", "layers", "device", "stats_dir", "fact_token"}  # EasyEdit/ROME file keys
    unknown = sorted(set(hparams) - names - ignored)
    if unknown:
        raise LoceditError(f"unknown {method} hyper-parameter(s) {unknown}; known: {sorted(names)}")
    return cls(**{k: v for k, v in hparams.items() if k in names})


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise LoceditError(f"hyper-parameter file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise LoceditError("reading YAML hyper-parameters needs PyYAML: pip install pyyaml") from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise LoceditError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LoceditError(f"{path} must hold a mapping of hyper-parameter names to values")
    return data


def as_dict(hparams) -> dict:
    return dataclasses.asdict(hparams)

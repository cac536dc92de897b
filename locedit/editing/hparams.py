"""Hyper-parameters of each editing method: one dataclass each, names as in ROME/MEMIT's JSON files (so EasyEdit
users recognise them), defaults from those files (ROME: GPT-2 XL / GPT-J; MEMIT: GPT-J) unless noted.

`hparams=` of `locedit.edit` takes an instance, a dict, or a JSON/YAML file. ROME/MEMIT's JSON files and EasyEdit's
YAML files are read as they are: what applies is mapped (`alg_name` picks the method, AlphaEdit sets `nullspace`,
`layers` and `fact_token` give the edit's sites), what does not is reported with the reason (`IGNORED_KEYS`);
names neither locedit nor those files know are refused."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from locedit.errors import EditError


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
    # how templated prompts are tokenized (`values.templated_prompts`): "text" (ROME's: the joined text) or
    # "prompt" (the prefix, a newline, then the bare prompt's tokens: the same key token in every template)
    template_tokens: str = "text"


FAST_ROME_SCHEDULE = {"v_lr": 1.0, "v_num_grad_steps": 14, "context_template_length_params": [[5, 5], [10, 5]]}
"""ROME's value optimisation at ≈ 0.46x the cost (issue 19; recipes/bench_rome_speed.py): not the default, see below."""


@dataclass
class ROMEHyperParams(ValueHyperParams):
    """ROME with the r-ROME fix (the template-averaged key in the update's numerator and denominator).

    The value optimisation keeps ROME's schedule (20 Adam steps at lr 0.5 over 20 context templates + the bare
    prompt). `FAST_ROME_SCHEDULE` (14 steps at lr 1.0 over 10 templates) costs 0.46x the CPU time, but on 18 tuning
    facts it raised NKL by 0.26 nats [0.02, 0.57] with ES/PS/NS/S unchanged
    (data/results/rome_speed_19/compare.txt), so it is an option, not the default: `hparams=FAST_ROME_SCHEDULE`.
    Cutting ROME's own schedule to 14 steps (0.70x) trades PS (-0.04) for NKL (-0.11 nats) on the same 18 facts
    (data/results/rome_speed_19/steps.txt), so the 20 steps stay too."""

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
    # instead of the threshold: the null space is the eigenvectors holding at most this share of E[‖k‖²]
    # (scale-free; at 2e-2 SmolLM2's layer-1 null space holds 39% of it: data/results/long_run/nullspace.txt)
    nullspace_energy: float | None = None
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


@dataclass
class LocFTHyperParams:
    """LocFT-BF (arXiv 2509.22072): Adam on one layer's MLP output projection, `num_steps` epochs over the edit set
    in shuffled mini-batches of `batch_size`, NLL of the new target tokens (+ EOS). The paper's files
    (github.com/ICT-STAR/LocFT `hparams/*.yaml`) use lr 5e-4, batch 100, 25 epochs, no weight decay on 7-8B
    models. The defaults here (lr 5e-3, mini-batches of 10, 10 epochs, layer 0.14 of the depth) were chosen for
    SmolLM2 on the tuning stream (data/results/long_run/locft_sweep.md): the highest WILD reliability of 100 edits
    whose perplexity drift stayed within 5%, at about 1 s per edit on this CPU."""

    num_steps: int = 10
    lr: float = 5e-3
    batch_size: int = 10
    weight_decay: float = 0.0
    early_stop_loss: float = 1e-2
    append_eos: bool = True
    seed: int = 0


METHOD_HPARAMS = {"rome": ROMEHyperParams, "memit": MEMITHyperParams, "head": HeadHyperParams, "ft": FTHyperParams,
                  "locft": LocFTHyperParams}

# `alg_name` of ROME/MEMIT/EasyEdit files -> (locedit method, hyper-parameters the name implies)
ALGORITHMS: dict[str, tuple[str, dict]] = {
    "rome": ("rome", {}), "r-rome": ("rome", {}), "memit": ("memit", {}), "alphaedit": ("memit", {"nullspace": True}),
    "ft": ("ft", {}), "ft-l": ("ft", {}), "head": ("head", {}), "locft": ("locft", {}), "locft-bf": ("locft", {}),
}

_STATS = "locedit computes its own key statistics (stats_tokens=, corpus=)"
_MODULES = "locedit reads module paths from its adapter"
_FT = "locedit's FT-L trains on the fact's own prompt"
_RROME = "locedit's ROME is r-ROME (the template-averaged key in numerator and denominator)"

# keys of ROME/MEMIT/EasyEdit files that do not apply to locedit: key -> (why, the values accepted; None: any).
# A value outside the accepted ones would ask for a different computation, so it is refused, not ignored.
IGNORED_KEYS: dict[str, tuple[str, tuple | None]] = {
    "model_name": ("locedit edits the model it is given", None),
    "device": ("locedit edits the model where it is loaded", None),
    "model_parallel": ("locedit edits the model as loaded (device_map)", None),
    "fp16": ("locedit computes in the model's loaded dtype", None),
    "stats_dir": (_STATS, None), "mom2_dataset": (_STATS, None), "mom2_n_samples": (_STATS, None),
    "mom2_dtype": (_STATS, None),
    "P_loc": ("locedit computes AlphaEdit's null-space projection from its own statistics", None),
    "rewrite_module_tmp": (_MODULES, None), "layer_module_tmp": (_MODULES, None), "mlp_module_tmp": (_MODULES, None),
    "attn_module_tmp": (_MODULES, None), "ln_f_module": (_MODULES, None), "lm_head_module": (_MODULES, None),
    "v_loss_layer": ("locedit scores the new target at the model's output (ROME's v_loss_layer: the last layer)",
                     None),
    "layer_selection": ("MEMIT spreads the update over every given layer", ("all",)),
    "batch_size": (_FT, None), "max_length": (_FT, None),
    "objective_optimization": ("locedit's FT is FT-L (EasyEdit's prompt_last)", ("prompt_last",)),
    "weight_decay": ("locedit's FT-L has no weight decay", (0, 0.0, False, None)),
    "wd_power_law": ("locedit's FT-L has no weight decay", None),
    "enable_prompt_keys": (_RROME, None), "enable_random_prefix_keys": (_RROME, None),
    "original_implementation": (_RROME, (False, None)),
}
# keys ignored for one method only (the other methods have them as fields)
METHOD_IGNORED_KEYS: dict[str, dict[str, tuple[str, tuple | None]]] = {
    "memit": {"mom2_adjustment": ("MEMIT always weights its update by the key covariance", (True,))},
    "ft": {"kl_factor": ("locedit's FT-L has no KL term", (0, 0.0, False, None))},
    "locft": {"model_name_or_path": ("locedit edits the model it is given", None),
              "data_path": ("locedit edits the requests it is given", None),
              "save_model_dir": ("locedit writes where --out / --save-model say", None),
              "rewrite_module": ("locedit tunes the MLP output projection its adapter names", None)},
}


@dataclass(frozen=True)
class ResolvedHParams:
    """Hyper-parameters read for an edit: the method's dataclass plus what a ROME/MEMIT/EasyEdit file said.

    `method`: the method the file names (`alg_name`), None when it names none. `layers` / `key_position`: the
    file's `layers` / `fact_token`, used where the caller gives none. `ignored`: key -> why it does not apply."""

    params: object
    method: str | None = None
    layers: list[int] | None = None
    key_position: str | None = None
    ignored: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def resolve_hparams(method: str, hparams) -> object:
    """An instance of `method`'s hyper-parameter class from None, an instance, a dict, or a JSON/YAML path."""
    return read_hparams(method, hparams).params


def read_hparams(method: str | None, hparams, *, default_method: str = "rome", warn: bool = True) -> ResolvedHParams:
    """Read `hparams` (None, a dataclass instance, a dict, or a JSON/YAML path) for `method` (None: the file's
    `alg_name`, else `default_method`). Keys that do not apply are reported in `.ignored` and, when `warn`, in one
    warning line; unknown keys, wrong types and a file made for another method are refused with `EditError`."""
    source = "hparams"
    if isinstance(hparams, (str, os.PathLike)):
        source = str(hparams)
        hparams = read_hparams_file(Path(hparams))
    if hparams is None:
        return ResolvedHParams(METHOD_HPARAMS[_known(method or default_method)]())
    if dataclasses.is_dataclass(hparams) and not isinstance(hparams, type):
        cls = METHOD_HPARAMS[_known(method or default_method)]
        if not isinstance(hparams, cls):
            raise EditError(f"hparams is a {type(hparams).__name__}, but method {method or default_method!r} takes "
                            f"{cls.__name__}")
        return ResolvedHParams(hparams)
    if not isinstance(hparams, dict):
        raise EditError(f"hparams must be a dict, a JSON/YAML file or a hyper-parameter dataclass, not "
                        f"{type(hparams).__name__}")
    data = dict(hparams)
    named, implied = _algorithm(data.pop("alg_name", None), source)
    if method is not None and named is not None and _known(method) != named:
        raise EditError(f"{source} holds {named} hyper-parameters, but method={method!r} was asked for")
    chosen = _known(method or named or default_method)
    cls = METHOD_HPARAMS[chosen]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if chosen == "locft" and "layer" in data and "layers" not in data:  # LocFT's files name one `layer`
        data["layers"] = [data.pop("layer")]
    layers = _layers(data.pop("layers", None), source)
    key_position = _fact_token(data.pop("fact_token", None), source)
    ignored: dict[str, str] = {}
    notes: list[str] = []
    rules = {**IGNORED_KEYS, **METHOD_IGNORED_KEYS.get(chosen, {})}
    values = dict(implied)
    if chosen == "ft" and data.get("norm_constraint") is False:  # EasyEdit's unconstrained fine-tuning
        data["norm_constraint"] = float("inf")
        notes.append("norm_constraint false (unconstrained fine-tuning) is read as no clamp")
    unknown = sorted(k for k in data if k not in fields and k not in rules)
    if unknown:
        raise EditError(f"unknown {chosen} hyper-parameter(s) {unknown} in {source}; known: {sorted(fields)}")
    for key, value in data.items():
        if key in fields:
            values[key] = _coerce(fields[key], value, source)
            continue
        reason, accepted = rules[key]
        if accepted is not None and value not in accepted:
            raise EditError(f"{source}: {key}={value!r} is not supported ({reason}; accepted: "
                            f"{', '.join(repr(a) for a in accepted)})")
        ignored[key] = reason
    params = cls(**values)
    if ignored and warn:
        warnings.warn(ignored_summary(source, ignored), UserWarning, stacklevel=2)
    return ResolvedHParams(params, named, layers, key_position, ignored, notes)


def ignored_summary(source: str, ignored: dict[str, str]) -> str:
    """One line naming the ignored keys, grouped by reason."""
    by_reason: dict[str, list[str]] = {}
    for key, reason in ignored.items():
        by_reason.setdefault(reason, []).append(key)
    parts = [f"{', '.join(keys)} ({reason})" for reason, keys in by_reason.items()]
    return f"{source}: ignored {len(ignored)} key(s) that do not apply to locedit: " + "; ".join(parts)


def read_hparams_file(path: Path) -> dict:
    """The mapping in a JSON or YAML hyper-parameter file."""
    if not path.is_file():
        raise EditError(f"hyper-parameter file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise EditError("reading YAML hyper-parameters needs PyYAML: pip install pyyaml") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise EditError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise EditError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EditError(f"{path} must hold a mapping of hyper-parameter names to values")
    return data


def as_dict(hparams) -> dict:
    return dataclasses.asdict(hparams)


def _known(method: str) -> str:
    if method not in METHOD_HPARAMS:
        raise EditError(f"unknown editing method {method!r}; use one of {', '.join(METHOD_HPARAMS)}")
    return method


def _algorithm(name, source: str) -> tuple[str | None, dict]:
    if name is None:
        return None, {}
    key = str(name).strip().lower()
    if key not in ALGORITHMS:
        raise EditError(f"{source} holds hyper-parameters for {name!r}; locedit implements ROME (R-ROME), MEMIT, "
                        "AlphaEdit, FT, LocFT-BF and head edits")
    return ALGORITHMS[key]


def _layers(value, source: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
        raise EditError(f"{source}: layers must be a non-empty list of layer numbers, not {value!r}")
    return list(value)


def _fact_token(value, source: str) -> str | None:
    if value is None:
        return None
    if value != "subject_last":
        raise EditError(f"{source}: fact_token {value!r} is not supported; locedit reads keys at 'subject_last' "
                        "or at the located carrier token (key_position='carrier')")
    return "subject_last"


def _coerce(f: dataclasses.Field, value, source: str):
    """`value` as field `f`'s type. YAML reads `5e-1` as a string, so numeric strings become numbers."""
    kind = str(f.type).replace(" ", "")
    if value is None and kind.endswith("|None"):
        return None
    base = kind.removesuffix("|None")
    try:
        if base in ("int", "float"):
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if base == "int" and not number.is_integer():
                raise ValueError
            return int(number) if base == "int" else number
        expected = {"bool": bool, "list": list, "str": str}.get(base)
        if expected is not None and not isinstance(value, expected):
            raise ValueError
    except (TypeError, ValueError):
        raise EditError(f"{source}: hyper-parameter {f.name} must be a {base}, not {value!r}") from None
    return value

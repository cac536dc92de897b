"""A model's calibration: where trial edits found each method edits best (layers and key position), with the
sweep behind it, stored by the fingerprint of the weights (`locedit.editing.fingerprint`) in the locedit cache
(`calibrations/<fingerprint>.json`) or shipped with locedit (`locedit/data/calibrations/`). `edit(layers=None)` and
`locate`'s rank-one recommendation use the calibration of the weights they are given, however those were loaded."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from locedit.core.loading import cache_dir, cache_lock
from locedit.core.results import Result, jsonable
from locedit.errors import CalibrationError

FORMAT_VERSION = 1
PACKAGED = Path(__file__).resolve().parent.parent / "data" / "calibrations"
UNCALIBRATED = ("these weights have no calibration: edits default to the located layer (run `locedit calibrate "
                "--model ...` to measure where this model edits best)")
# locedit's hyper-parameter names that EasyEdit's ROME/MEMIT/AlphaEdit YAML files also use
EASYEDIT_KEYS = ("v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "mom2_adjustment",
                 "mom2_update_weight", "context_template_length_params", "L2", "nullspace_threshold")
EASYEDIT_NAMES = {"rome": "ROME", "memit": "MEMIT", "alphaedit": "AlphaEdit"}


@dataclass
class Calibration(Result):
    """Where each method edits these weights best. `chosen[method]`: `{"layers", "key_position", "S": {"mean",
    "low", "high"}, "n", ...}`; `sweep`: one row per candidate tried (method, layers, key position, stage, mean
    scores); `evidence`: what the choice rests on."""

    fingerprint: str
    model: dict
    chosen: dict
    sweep: list = field(default_factory=list)
    facts: list = field(default_factory=list)
    hparams: dict = field(default_factory=dict)
    evidence: str = ""
    complete: bool = True
    seconds: float = 0.0
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return jsonable({"kind": "locedit-calibration", "format_version": self.format_version,
                         "fingerprint": self.fingerprint, "model": self.model, "chosen": self.chosen,
                         "evidence": self.evidence, "complete": self.complete, "seconds": self.seconds,
                         "facts": self.facts, "hparams": self.hparams, "sweep": self.sweep})

    def site(self, method: str) -> dict | None:
        """The chosen `{"layers", "key_position", ...}` of `method`, or None when it was not calibrated."""
        return self.chosen.get(method)

    def summary(self) -> str:
        lines = [f"calibration of {self.model.get('name', '?')} (weights {self.fingerprint[:12]}): "
                 f"{len(self.facts)} facts, {len(self.sweep)} candidates"
                 + ("" if self.complete else " (stopped by the budget)")]
        for method, c in self.chosen.items():
            s = c.get("S") or {}
            ci = f" [{s['low']:.3f}, {s['high']:.3f}]" if s.get("low") is not None else ""
            mean = f"S {s['mean']:.3f}{ci}" if s.get("mean") is not None else "S not measured here"
            lines.append(f"{method}: layers {c['layers']} keyed at {c['key_position']}: {mean}")
        if self.evidence:
            lines.append(f"evidence: {self.evidence}")
        return "\n".join(lines)

    def plot(self, ax=None):
        """Mean S per candidate layer, one line per method and key position."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 3.5))
        else:
            fig = ax.figure
        groups: dict[tuple, list] = {}
        for row in self.sweep:
            groups.setdefault((row["method"], row["key_position"]), []).append(row)
        for (method, key), rows in sorted(groups.items()):
            rows = sorted(rows, key=lambda r: r["layers"][-1])
            ax.plot([r["layers"][-1] for r in rows], [r["S"] for r in rows], marker="o", label=f"{method}, {key}")
        ax.set_xlabel("edit layer (last of the window)")
        ax.set_ylabel("mean S")
        ax.set_title("calibration sweep")
        if groups:
            ax.legend(fontsize=8)
        return fig

    def to_easyedit_yaml(self, method: str = "rome", base: str | os.PathLike | None = None) -> str:
        """An EasyEdit hyper-parameter YAML with the chosen layers of `method` ("rome", "memit" or "alphaedit").
        `base`: an EasyEdit YAML for this model whose `layers` and `fact_token` are replaced (its other keys kept);
        without it, the keys locedit shares with EasyEdit, as calibrated (merge them into EasyEdit's file for the
        model: EasyEdit also needs its module paths). `locedit.editing.read_hparams` reads either back."""
        import yaml

        site = self.site("memit" if method == "alphaedit" else method)
        if method not in EASYEDIT_NAMES or site is None:
            raise CalibrationError(f"no calibrated {method!r} site to export (calibrated: "
                                   f"{', '.join(self.chosen) or 'none'}; EasyEdit exports: rome, memit, alphaedit)")
        if site["key_position"] != "subject_last":
            raise CalibrationError(f"the calibrated {method} key position {site['key_position']!r} has no EasyEdit "
                                   "fact_token (EasyEdit keys at subject_last)")
        if base is not None:
            data = yaml.safe_load(Path(base).read_text())
            if not isinstance(data, dict):
                raise CalibrationError(f"{base} is not an EasyEdit hyper-parameter mapping")
        else:
            hp = self.hparams.get("memit" if method == "alphaedit" else method, {})
            data = {"alg_name": EASYEDIT_NAMES[method], "model_name": self.model.get("name")}
            data.update({k: hp[k] for k in EASYEDIT_KEYS if hp.get(k) is not None})
        data["layers"] = [int(l) for l in site["layers"]]
        data["fact_token"] = "subject_last"
        header = (f"# locedit calibration of weights {self.fingerprint[:16]} ({self.model.get('name')}): {method} "
                  f"layers {data['layers']}\n")
        return header + yaml.safe_dump(jsonable(data), sort_keys=False)


def calibration_dir() -> Path:
    """Where calibrations made on this machine live: `cache_dir()/calibrations`."""
    return cache_dir() / "calibrations"


def calibration_path(fingerprint: str) -> Path:
    return calibration_dir() / f"{fingerprint}.json"


def from_dict(data: dict, source: str = "calibration") -> Calibration:
    """A `Calibration` from its `to_dict()` form; `CalibrationError` naming what is wrong."""
    if not isinstance(data, dict) or data.get("kind") != "locedit-calibration":
        raise CalibrationError(f"{source} is not a locedit calibration (no kind: locedit-calibration)")
    if data.get("format_version") != FORMAT_VERSION:
        raise CalibrationError(f"{source} has calibration format {data.get('format_version')!r}; this locedit "
                               f"reads {FORMAT_VERSION}")
    chosen = data.get("chosen")
    fingerprint = data.get("fingerprint")
    if not isinstance(fingerprint, str) or len(fingerprint) != 64 or not isinstance(chosen, dict) or not all(
            isinstance(c, dict) and isinstance(c.get("layers"), list) and c.get("layers") and
            c.get("key_position") in ("subject_last", "carrier") for c in chosen.values()):
        raise CalibrationError(f"{source} is malformed: it needs a 64-hex fingerprint and per method chosen "
                               "layers and key_position")
    fields = ("sweep", "facts", "hparams", "evidence", "complete", "seconds")
    return Calibration(fingerprint, dict(data.get("model") or {}), chosen,
                       **{k: data[k] for k in fields if k in data})


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Read a calibration JSON file (`Calibration.save`)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise CalibrationError(f"{path} is not valid JSON: {exc}") from None
    return from_dict(data, str(path))


def install_calibration(calibration: Calibration) -> Path:
    """Store `calibration` in the cache as the calibration of its weights (replacing an older one); its path."""
    path = calibration_path(calibration.fingerprint)
    with cache_lock(path, "a calibration"):
        return calibration.save(path)


def calibration_for(lm, *, fingerprint: str | None = None) -> Calibration | None:
    """The calibration of `lm`'s weights: the cache's, else the one shipped with locedit, else None."""
    from locedit.editing.fingerprint import weights_fingerprint

    fingerprint = fingerprint or weights_fingerprint(lm)
    for path in (calibration_path(fingerprint), PACKAGED / f"{fingerprint}.json"):
        if path.is_file():
            return load_calibration(path)
    return None


def calibrated_site(lm, method: str = "rome", *, warn: bool = True) -> tuple[dict | None, Calibration | None]:
    """`(site, calibration)`: `method`'s calibrated site of `lm`'s weights (None when the weights or the method have
    no calibration, with the one-line warning `UNCALIBRATED` when `warn` and the weights have none)."""
    calibration = calibration_for(lm)
    if calibration is None:
        if warn:
            warnings.warn(UNCALIBRATED, UserWarning, stacklevel=3)
        return None, None
    return calibration.site(method), calibration

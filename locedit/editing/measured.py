"""Edit layers measured per model. Where locedit's study (`recipes/study_sites.py`) found that one fixed layer
edits better than `locate`'s per-fact layer on held-out facts, that layer is recorded here and becomes the
rank-one recommendation of `locate` and the default of `locedit.edit` for that model. Models without an entry
keep the located layer: there is no evidence for them either way (docs/study.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MeasuredLayer:
    """The rank-one edit layer and key position chosen for one model on a tuning split, and what showed it wins."""

    layer: int
    key_position: str
    num_layers: int  # the model's depth: a model with another depth never matches
    evidence: str


# model names (locedit's alias and the hub id) -> measured layer
MEASURED_LAYERS: dict[str, MeasuredLayer] = {
    name: MeasuredLayer(
        layer=1, key_position="subject_last", num_layers=30,
        evidence="ROME at layer 1 (best of layers 0-6, 8, 10, 15 on 8 tuning facts) beat locate's layer by 2.8 pp "
                 "of S [0.1, 5.8] on 114 held-out facts: data/results/study/summary.md")
    for name in ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct")
}


def measured_layer(lm) -> MeasuredLayer | None:
    """The measured edit layer of `lm` (matched by its name and depth), or None."""
    entry = MEASURED_LAYERS.get(str(getattr(lm, "name", "")))
    if entry is None or entry.num_layers != lm.num_layers:
        return None
    return entry

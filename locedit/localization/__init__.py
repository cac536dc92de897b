"""Localization: the information-flow analyses of Geva et al. 2023, ROME's causal tracing, and `locate`.

Every analysis follows one naming scheme:

* `analysis(lm, fact, **options) -> result`: one fact (e.g. `attention_knockout`, `causal_trace`, `locate`).
* `analysis_batch(lm, facts, **options) -> [result]`: several facts, their rows packed into shared forward
  passes; each result equals the single-fact one (`attention_knockout_batch`, `causal_trace_batch`,
  `head_effects_batch`, `head_projection_batch`, `locate_batch`). `analysis.batched` names the batched form.
* `run_dataset(lm, analysis, facts, out)` / `locate_dataset(lm, facts, out)`: a resumable run into a JSON Lines
  file, one line per fact.

A fact's given target is the token tracked and scored (its first token); `target=None` tracks the model's top-1.
Every result records which (`target_source`: "given" / "top1", with `target`, `target_id` and `target_text`) and is
a `locedit.core.results.Result`: `to_dict()`, `save(path)`, `plot(ax=None)`, `summary()`, `_repr_html_()`.
"""

from locedit.localization.attribute_rate import attribute_rate
from locedit.localization.attributes import AttributeSet, attribute_set, generate_attribute_text, load_paragraphs
from locedit.localization.causal_trace import causal_trace, causal_trace_batch
from locedit.localization.extraction import extraction_events
from locedit.localization.heads import head_effects, head_effects_batch, head_projection, head_projection_batch
from locedit.localization.knockout import attention_knockout, attention_knockout_batch, knockout_map
from locedit.localization.patching import state_patching
from locedit.localization.runner import ANALYSES, run_dataset
from locedit.localization.sites import SiteMap, locate, locate_batch, locate_dataset
from locedit.localization.sublayer import sublayer_knockout

__all__ = [
    "ANALYSES", "AttributeSet", "SiteMap", "attention_knockout", "attention_knockout_batch", "attribute_rate",
    "attribute_set", "causal_trace", "causal_trace_batch", "extraction_events", "generate_attribute_text",
    "head_effects", "head_effects_batch", "head_projection", "head_projection_batch", "knockout_map",
    "load_paragraphs", "locate", "locate_batch", "locate_dataset", "run_dataset", "state_patching",
    "sublayer_knockout",
]

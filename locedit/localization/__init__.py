"""The information-flow analyses of Geva et al. 2023, plus ROME's causal tracing. Each is a function
`(lm, fact, **options) -> result` with `.to_dict()` and `.plot()`; `run_dataset` applies one to many facts."""

from locedit.localization.attribute_rate import attribute_rate
from locedit.localization.attributes import AttributeSet, attribute_set, generate_attribute_text, load_paragraphs
from locedit.localization.causal_trace import causal_trace
from locedit.localization.extraction import extraction_events
from locedit.localization.heads import head_effects, head_projection
from locedit.localization.knockout import attention_knockout, knockout_map
from locedit.localization.patching import state_patching
from locedit.localization.runner import ANALYSES, run_dataset
from locedit.localization.sublayer import sublayer_knockout

__all__ = [
    "ANALYSES", "AttributeSet", "attention_knockout", "attribute_rate", "attribute_set", "causal_trace",
    "extraction_events", "generate_attribute_text", "head_effects", "head_projection", "knockout_map",
    "load_paragraphs", "run_dataset", "state_patching", "sublayer_knockout",
]

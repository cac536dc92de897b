"""The one registry of analyses: per analysis its name, function, batched form, aggregator, dataset figure and the
CLI options that apply to it. `locedit analyze` and `run_dataset` both read it.

Functions are named as "module:function" strings and imported on first use, so registering an analysis imports
nothing and a missing module only fails when that analysis is asked for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from locedit.errors import LoceditError

# The CLI options of `locedit analyze` that an analysis may accept (each is the analysis function's keyword).
CLI_OPTIONS = ("window", "projection", "groups", "kind", "samples", "mode", "paragraphs")


@dataclass(frozen=True)
class AnalysisRecord:
    """One analysis. `name`: the registry key (the CLI spells it with hyphens); `function` and `batched` (a form
    taking a list of facts, or None): "module:function"; `result_name`: the "analysis" field of its results;
    `aggregator`: "module:function" summarising result lines over facts (None: the result class's `aggregate`,
    else every per-layer series); `figure`: "module:function" drawing the dataset figure, fed the result dicts
    (`figure_input="results"`) or this analysis's aggregate (`"aggregate"`); `cli_options`: the `locedit analyze`
    options it takes; `help`: one line for `--help`."""

    name: str
    function: str
    result_name: str
    batched: str | None = None
    aggregator: str | None = None
    figure: str | None = None
    figure_input: str = "results"
    cli_options: tuple[str, ...] = ()
    help: str = ""

    @property
    def cli_name(self) -> str:
        return self.name.replace("_", "-")

    def load(self) -> Callable:
        """The analysis function."""
        return import_spec(self.function)

    def load_batched(self) -> Callable | None:
        """The batched form, or None."""
        return import_spec(self.batched) if self.batched else None

    def load_aggregator(self) -> Callable | None:
        return import_spec(self.aggregator) if self.aggregator else None

    def draw(self, results: Sequence[dict], aggregate: Mapping[str, dict]):
        """The dataset figure, or None (no figure registered, or nothing to draw)."""
        if not self.figure or not results:
            return None
        if self.figure_input == "aggregate":
            summary = aggregate.get(self.result_name)
            return import_spec(self.figure)(summary) if summary else None
        return import_spec(self.figure)(list(results))


def import_spec(spec: str) -> Callable:
    """The object a "module:function" (or "module:Class.method") string names; LoceditError naming what is missing."""
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise LoceditError(f"analysis {spec!r} is not available: module {e.name!r} cannot be imported") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LoceditError(f"analysis {spec!r} is not available: {module_name} has no {attr!r}") from None
    return obj


_L = "locedit.localization."
_P = "locedit.core.plots:"

RECORDS: tuple[AnalysisRecord, ...] = (
    AnalysisRecord("knockout", _L + "knockout:attention_knockout", "attention_knockout",
                   batched=_L + "knockout:attention_knockout_batch", aggregator=_L + "runner:aggregate_knockout",
                   figure=_P + "knockout_curves", cli_options=("window", "groups"),
                   help="attention knockout: which edges carry the subject to the last position"),
    AnalysisRecord("knockout_map", _L + "knockout:knockout_map", "knockout_map", cli_options=("window",),
                   help="knockout of each (layer, position) edge into the last position"),
    AnalysisRecord("attribute_rate", _L + "attribute_rate:attribute_rate", "attribute_rate",
                   figure=_P + "attribute_rate_curves", cli_options=("projection", "paragraphs"),
                   help="attribute rate of the subject's representation per layer"),
    AnalysisRecord("sublayer", _L + "sublayer:sublayer_knockout", "sublayer_knockout",
                   figure=_P + "sublayer_curves", cli_options=("window", "projection", "mode", "paragraphs"),
                   help="MLP vs attention sublayer knockout of the attribute rate"),
    AnalysisRecord("extraction", _L + "extraction:extraction_events", "extraction_events",
                   figure=_P + "extraction_rates", figure_input="aggregate", cli_options=("projection",),
                   help="extraction events: where the attribute appears at the last position"),
    AnalysisRecord("heads", _L + "heads:head_projection", "head_projection",
                   batched=_L + "heads:head_projection_batch", cli_options=("projection",),
                   help="attention heads' projections onto the vocabulary"),
    AnalysisRecord("head_effects", _L + "heads:head_effects", "head_effects",
                   batched=_L + "heads:head_effects_batch",
                   help="each head's direct effect on the target's probability"),
    AnalysisRecord("patching", _L + "patching:state_patching", "state_patching",
                   figure=_P + "patching_bars", figure_input="aggregate", cli_options=("projection",),
                   help="patching hidden states into another prompt"),
    AnalysisRecord("trace", _L + "causal_trace:causal_trace", "causal_trace",
                   batched=_L + "causal_trace:causal_trace_batch", cli_options=("window", "kind", "samples"),
                   help="ROME's causal trace (noised subject, restored states)"),
)

# name -> record, or (user registrations) a "module:function" string or the callable itself
ANALYSES: dict[str, AnalysisRecord | str | Callable] = {r.name: r for r in RECORDS}


def record(name: str) -> AnalysisRecord:
    """The registered record of `name` (hyphens or underscores); LoceditError for an unknown name."""
    entry = ANALYSES.get(name.replace("-", "_"))
    if not isinstance(entry, AnalysisRecord):
        raise LoceditError(f"unknown analysis {name!r}; known: {', '.join(sorted(ANALYSES))}")
    return entry


def record_for_function(spec: str) -> AnalysisRecord | None:
    """The record whose function is `spec` ("module:function"), if any."""
    return next((r for r in ANALYSES.values() if isinstance(r, AnalysisRecord) and r.function == spec), None)


def record_for_result(result_name: str) -> AnalysisRecord | None:
    """The record whose results carry `"analysis": result_name`, if any."""
    return next((r for r in ANALYSES.values() if isinstance(r, AnalysisRecord) and r.result_name == result_name),
                None)


def cli_records() -> list[AnalysisRecord]:
    """The records `locedit analyze` offers, by name."""
    return sorted((r for r in ANALYSES.values() if isinstance(r, AnalysisRecord)), key=lambda r: r.name)

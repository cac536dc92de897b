"""Run one analysis over a fact set, resumably, into a JSONL file; aggregate the per-fact results.

Each fact becomes one line: `{"id", "analysis_fn", "options", "fact", "result"}` or, when the analysis raised a
`LoceditError` for that fact, `{"id", "analysis_fn", "options", "fact", "error"}`. Lines are written, flushed and
fsync'd whole, so an interruption leaves at most a truncated last line, which the next run removes before it skips
every fact that already has a line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from locedit.errors import DatasetError, LoceditError
from locedit.core.facts import Fact
from locedit.core.results import Result, jsonable
from locedit.core.statistics import mean_ci
from locedit.core.store import RunStore
from locedit.localization.common import FlowResult
from locedit.localization.registry import (ANALYSES, AnalysisRecord, import_spec, record_for_function,
                                           record_for_result)

logger = logging.getLogger("locedit")

Analysis = Callable[..., FlowResult]

# --- resolving analyses ----------------------------------------------------------------------------------------------
def _spec_of(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def resolve_analysis(analysis: str | Analysis) -> tuple[str, Analysis]:
    """`(spec, callable)` of a registry name (see `locedit.localization.registry`), a "module:function" string or a
    callable; `spec` identifies the analysis in the output file ("module:function")."""
    if callable(analysis):
        return _spec_of(analysis), analysis
    if not isinstance(analysis, str):
        raise LoceditError(f"analysis must be a name, 'module:function' or a callable, not {type(analysis).__name__}")
    entry = ANALYSES.get(analysis.replace("-", "_"), analysis if ":" in analysis else None)
    if entry is None:
        raise LoceditError(f"unknown analysis {analysis!r}; known: {', '.join(sorted(ANALYSES))}")
    if isinstance(entry, AnalysisRecord):
        fn = entry.load()
    else:
        fn = import_spec(entry) if isinstance(entry, str) else entry
    return _spec_of(fn), fn


def batched_form(fn: Analysis) -> Callable | None:
    """The registered batched form of `fn` (else its `batched` attribute), or None."""
    found = record_for_function(_spec_of(fn))
    if found is not None and found.batched:
        return found.load_batched()
    return getattr(fn, "batched", None)


# --- fact ids and lines ----------------------------------------------------------------------------------------------
def fact_id(fact: Fact) -> str:
    """The fact's `meta["id"]` (set by `read_facts`), else a hash of its subject, prompt, target and relation."""
    ident = fact.meta.get("id") if isinstance(fact.meta, dict) else None
    if ident is not None:
        return str(ident)
    key = json.dumps([fact.subject, fact.prompt, fact.target, fact.relation])
    return "h" + hashlib.sha1(key.encode()).hexdigest()[:12]


def fact_record(fact: Fact) -> dict:
    return jsonable({"subject": fact.subject, "prompt": fact.prompt, "target": fact.target,
                     "relation": fact.relation, "meta": dict(fact.meta)})


def _option_value(value: Any) -> Any:
    if isinstance(value, (range, set, frozenset)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return repr(value)


def normalize_options(options: Mapping[str, Any]) -> dict:
    """Options as they read back from JSON (tuples and ranges become lists, other objects their repr), for
    recording and comparing runs."""
    return json.loads(json.dumps(jsonable(dict(options)), default=_option_value))


# --- the output file -------------------------------------------------------------------------------------------------
def dataset_store(path: str | Path) -> RunStore:
    """The `RunStore` of a dataset run's output file: rows keyed by "id", shards `<out>.rank<i>`."""
    return RunStore(path, key="id", shard_name="{name}.rank{shard}")


def read_lines(path: str | Path) -> tuple[list[dict], bool]:
    """Parsed lines of an output file, and whether a truncated/corrupt last line was dropped (the file is then
    rewritten without it, atomically). A corrupt line before the last raises `DatasetError`."""
    return dataset_store(path).read()


def read_results(paths: Iterable[str | Path]) -> dict[str, dict]:
    """`{fact id: result dict}` of the successful lines of one or more output files (e.g. the shards of a
    multi-process run)."""
    results: dict[str, dict] = {}
    for path in paths:
        for line in read_lines(Path(path))[0]:
            if "result" in line:
                results[line["id"]] = line["result"]
    return results


def _check_compatible(path: Path, lines: Sequence[dict], spec: str, options: dict) -> None:
    for line in lines:
        if line.get("analysis_fn", spec) != spec or line.get("options", options) != options:
            raise DatasetError(f"{str(path)!r} holds results of {line.get('analysis_fn')} with options "
                               f"{line.get('options')}, not of {spec} with {options}; use another output file")


# --- the run ---------------------------------------------------------------------------------------------------------
@dataclass
class DatasetRun(Result):
    """The lines of `path` for the facts asked for: `.results` (successful lines), `.errors` (error lines),
    `.skipped` (facts already in the file before this run), `.ran` (facts run now), `.repaired` (a truncated last
    line was removed), `.known` (facts kept by `only_known`, else None)."""

    path: Path
    analysis: str
    results: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    skipped: int = 0
    ran: int = 0
    repaired: bool = False
    known: int | None = None
    result_type: type | None = field(default=None, repr=False)

    def aggregate(self) -> dict[str, dict]:
        """Per analysis name (the results' "analysis" field): the registered aggregator's summary, else the result
        class's `aggregate(dicts)`, else `aggregate_all_series`."""
        groups: dict[str, list[dict]] = {}
        for line in self.results:
            groups.setdefault(line["result"].get("analysis", "flow"), []).append(line)
        return {name: _aggregator(name, self.result_type)(rows) for name, rows in groups.items()}

    def counts(self) -> dict[str, int | bool | None]:
        """How many facts succeeded, failed, were skipped (already done) and ran now."""
        return {"results": len(self.results), "errors": len(self.errors), "skipped": self.skipped, "ran": self.ran,
                "repaired": self.repaired, "known": self.known}

    def to_dict(self) -> dict:
        """The run's file, analysis, counts and aggregate (the per-fact lines stay in the file)."""
        return {"analysis": "dataset_run", "path": str(self.path), "analysis_fn": self.analysis,
                "counts": self.counts(), "aggregate": jsonable(self.aggregate()),
                "errors": [{"id": line["id"], "error": line["error"]} for line in self.errors]}

    def summary(self) -> str:
        """Which analysis ran into which file, and how many facts succeeded, failed and were resumed."""
        known = f"; {self.known} facts known to the model" if self.known is not None else ""
        return (f"{self.analysis} over {len(self.results) + len(self.errors)} facts into {self.path}: "
                f"{len(self.results)} results, {len(self.errors)} errors; {self.ran} ran now, {self.skipped} were "
                f"already done{known}" + ("; a truncated last line was repaired" if self.repaired else ""))

    def plot(self, ax=None):
        """The dataset figure (see `figure`); raises when the analysis has none."""
        fig = self.figure()
        if fig is None:
            raise LoceditError(f"{self.analysis} results have no dataset figure")
        return fig

    def figure(self, aggregate: dict[str, dict] | None = None):
        """The paper's figure for the dataset (mean curves with 95% CIs over facts), or None when the analysis has
        no dataset figure (e.g. causal traces of prompts of different lengths)."""
        return dataset_figure([line["result"] for line in self.results],
                              self.aggregate() if aggregate is None else aggregate)


# Facts per packed call when the analysis has a batched form (`fn.batched`, e.g. `locate` -> `locate_batch`,
# `attention_knockout` -> `attention_knockout_batch`) and the model is on an accelerator: enough rows to fill a
# GPU's passes, few enough that a resumed run loses little. On the CPU the default is 1 (one fact at a time), so
# a resumed fact's line is bit-identical to a fresh run's; packed results agree to float rounding (~1e-7).
DEFAULT_BATCH_FACTS = 16


def default_batch_facts(lm) -> int:
    device = getattr(lm, "device", None)
    return DEFAULT_BATCH_FACTS if device is not None and getattr(device, "type", "cpu") != "cpu" else 1


def run_dataset(lm, analysis: str | Analysis, facts: Iterable[Fact], out_path: str | Path, *,
                options: Mapping[str, Any] | None = None, progress: bool = True,
                only_known: bool = False, batch_facts: int | None = None,
                distributed: bool | None = None) -> DatasetRun:
    """Run `analysis(lm, fact, **options)` for every fact without a line in `out_path` yet, appending one JSONL line
    per fact. A `LoceditError` for one fact becomes an error line; any other exception propagates (the lines
    written so far stay, and the next call resumes).

    When the analysis has a batched form (`analysis.batched(lm, facts, **options) -> [result]`), facts run
    `batch_facts` at a time through it (default `default_batch_facts(lm)`: 16 on a GPU, 1 on the CPU): their rows share
    forward passes, and each result equals the single-fact one. A group whose batched call raises a
    `LoceditError` is rerun fact by fact, so the error lands on its own fact's line.

    Several processes (`accelerate launch` / `torchrun`; `distributed=None` detects WORLD_SIZE > 1): each process
    takes its shard of the facts still to do (`accelerate.PartialState().split_between_processes`), appends to its
    own `<out>.rank<i>` file, and the main process merges every shard into `out_path` (in the facts' order) and
    removes them. Resumable like a single run, also with another number of processes: facts with a line in
    `out_path` or in any leftover shard file are skipped. Every process returns the merged run."""
    spec, fn = resolve_analysis(analysis)
    options = dict(options or {})
    recorded = normalize_options(options)
    facts = list(getattr(facts, "facts", facts))
    if only_known:
        facts = _keep_known(lm, facts, progress)
    ids = [fact_id(f) for f in facts]
    _check_unique(ids)
    if distributed is None:
        distributed = _world_size() > 1
    if distributed:
        return _run_sharded(lm, spec, fn, facts, ids, Path(out_path), options, recorded, progress, batch_facts,
                            only_known)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines, repaired = dataset_store(path).read()
    _check_compatible(path, lines, spec, recorded)
    done = {line["id"]: line for line in lines}
    todo = [(i, f) for i, f in zip(ids, facts) if i not in done]
    run = DatasetRun(path, spec, skipped=len(facts) - len(todo), repaired=repaired,
                     known=len(facts) if only_known else None, result_type=_result_type(fn))
    batched = batched_form(fn)
    size = default_batch_facts(lm) if batch_facts is None else int(batch_facts)
    if size < 1:
        raise DatasetError(f"batch_facts must be at least 1, not {batch_facts}")
    if batched is None:
        size = 1
    bar = progress_bar(total=len(todo), desc=spec.rpartition(":")[2], unit="fact", disable=not progress)
    with dataset_store(path).writer() as f, bar:
        for group_start in range(0, len(todo), size):
            group = todo[group_start:group_start + size]
            lines_ = (_run_group(lm, fn, batched, group, spec, options, recorded) if len(group) > 1 else
                      [_run_one(lm, fn, group[0][1], group[0][0], spec, options, recorded)])
            for (ident, _), line in zip(group, lines_):
                done[ident] = line
                f.add(line)
                run.ran += 1
                bar.update(1)
    for ident in ids:
        line = done[ident]
        (run.errors if "error" in line else run.results).append(line)
    return run


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def _run_sharded(lm, spec: str, fn: Analysis, facts: list[Fact], ids: list[str], path: Path, options: dict,
                 recorded: dict, progress: bool, batch_facts: int | None, only_known: bool) -> DatasetRun:
    """`run_dataset` over the processes of `accelerate launch` / `torchrun` (see there)."""
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        raise LoceditError("a multi-process dataset run needs the 'accelerate' package: pip install accelerate")
    import torch

    # without an accelerator, accelerate only forms a CPU process group (gloo) when asked to
    state = PartialState(cpu=lm is not None and getattr(lm, "device", torch.device("cpu")).type == "cpu"
                         and not torch.cuda.is_available())
    if state.num_processes != _world_size():
        raise LoceditError(f"WORLD_SIZE is {_world_size()} but accelerate formed {state.num_processes} process(es); "
                           "launch with `accelerate launch` or `torchrun`")
    if state.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        main = dataset_store(path)
        for part in [main] + main.shards():  # repair truncated last lines once, before anyone reads
            _check_compatible(part.path, part.read()[0], spec, recorded)
    state.wait_for_everyone()
    done = dataset_store(path).keys()
    todo = [f for i, f in zip(ids, facts) if i not in done]
    state.wait_for_everyone()  # every process has read the same files before any writes its shard
    shard = dataset_store(path).shard(state.process_index).path
    with state.split_between_processes(todo) as mine:
        if mine:
            run_dataset(lm, fn, list(mine), shard, options=options, progress=progress and state.is_main_process,
                        batch_facts=batch_facts, distributed=False)
    state.wait_for_everyone()
    if state.is_main_process:
        dataset_store(path).merge(ids)
    state.wait_for_everyone()
    lines = {line["id"]: line for line in dataset_store(path).read()[0]}
    run = DatasetRun(path, spec, skipped=len(facts) - len(todo), ran=len(todo),
                     known=len(facts) if only_known else None, result_type=_result_type(fn))
    for ident in ids:
        line = lines[ident]
        (run.errors if "error" in line else run.results).append(line)
    return run


def progress_bar(*, total: int, desc: str, unit: str, disable: bool = False, log_interval_s: float = 30.0):
    """A tqdm bar on stderr, also when stderr is not a terminal (a log file, a CI job): then it refreshes at most
    every `log_interval_s` seconds, so logs get a line per interval rather than one per fact."""
    from tqdm.auto import tqdm

    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
                mininterval=0.1 if tty else log_interval_s, maxinterval=max(10.0, log_interval_s) if not tty else 10.0,
                dynamic_ncols=tty, ascii=not tty)


def _run_one(lm, fn: Analysis, fact: Fact, ident: str, spec: str, options: dict, recorded: dict) -> dict:
    line = {"id": ident, "analysis_fn": spec, "options": recorded, "fact": fact_record(fact)}
    try:
        result = fn(lm, fact, **options)
    except LoceditError as e:
        return {**line, "error": f"{type(e).__name__}: {e}"}
    return {**line, "result": result.to_dict() if hasattr(result, "to_dict") else jsonable(result)}


def _run_group(lm, fn: Analysis, batched: Callable, group: list, spec: str, options: dict,
               recorded: dict) -> list[dict]:
    """Lines of several facts from one batched call; fact by fact when the batched call raises a LoceditError."""
    try:
        results = batched(lm, [fact for _, fact in group], **options)
    except LoceditError:
        return [_run_one(lm, fn, fact, ident, spec, options, recorded) for ident, fact in group]
    return [{"id": ident, "analysis_fn": spec, "options": recorded, "fact": fact_record(fact),
             "result": result.to_dict() if hasattr(result, "to_dict") else jsonable(result)}
            for (ident, fact), result in zip(group, results)]


def _keep_known(lm, facts: list[Fact], progress: bool) -> list[Fact]:
    from locedit.core.datasets import known_facts

    kept = known_facts(lm, facts, progress=progress)
    message = f"only_known: the model knows {len(kept)} of {len(facts)} facts"
    logger.info(message)
    if progress:
        print(message, file=sys.stderr)
    return kept


def _check_unique(ids: Sequence[str]) -> None:
    seen: set[str] = set()
    for ident in ids:
        if ident in seen:
            raise DatasetError(f"two facts share the id {ident!r}; ids must be unique to resume a run")
        seen.add(ident)


def _result_type(fn: Callable) -> type | None:
    try:
        hint = typing.get_type_hints(fn).get("return")
    except Exception:  # unresolvable annotations: no class-level aggregate
        return None
    return hint if isinstance(hint, type) else None


# --- aggregation -----------------------------------------------------------------------------------------------------
def _at(record: dict, key_path: str | Sequence[str]):
    value = record["result"] if "result" in record else record
    for key in (key_path.split(".") if isinstance(key_path, str) else key_path):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _series_stats(series: list[list]) -> dict:
    lengths = {len(s) for s in series}
    if len(lengths) > 1:
        raise LoceditError(f"cannot average series of different lengths {sorted(lengths)}")
    arr = np.array([[np.nan if v is None else v for v in s] for s in series], dtype=float)
    with warnings.catch_warnings():  # a column with a single value has no CI (NaN), which is expected
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, half = mean_ci(arr, axis=0)
    return {"mean": np.atleast_1d(mean).tolist(), "ci95": np.atleast_1d(half).tolist(), "n": len(series)}


def aggregate_series(dicts: Sequence[dict], key_path: str | Sequence[str]) -> dict:
    """Mean and 95% CI half-width per index of the per-layer list at `key_path` ("a.b" or ("a", "b")) of each
    result (or result line): `{"mean", "ci95", "n"}`; for a dict of lists, that per key. Rows without the key are
    left out; None counts as NaN (ignored)."""
    values = [v for v in (_at(d, key_path) for d in dicts) if v is not None]
    if not values:
        return {"mean": [], "ci95": [], "n": 0}
    if all(isinstance(v, dict) for v in values):
        keys = list(dict.fromkeys(k for v in values for k in v))
        return {k: _series_stats([v[k] for v in values if v.get(k) is not None]) for k in keys}
    if all(isinstance(v, list) for v in values):
        return _series_stats(values)
    raise LoceditError(f"{key_path!r} is not a per-layer list (or a dict of them) in every result")


def _is_series(value: Any) -> bool:
    def numbers(v):
        return isinstance(v, list) and bool(v) and all(x is None or isinstance(x, (int, float)) for x in v)
    return numbers(value) or (isinstance(value, dict) and bool(value) and all(numbers(v) for v in value.values()))


def aggregate_all_series(dicts: Sequence[dict]) -> dict:
    """Generic summary: `aggregate_series` of every top-level per-layer field whose lengths agree across rows."""
    first = _at(dicts[0], ()) if dicts else {}
    out: dict[str, Any] = {"n": len(dicts)}
    for key, value in first.items():
        if _is_series(value):
            try:
                out[key] = aggregate_series(dicts, (key,))
            except LoceditError:
                continue
    return out


def aggregate_knockout(dicts: Sequence[dict]) -> dict:
    """Attention knockout: mean and CI of the relative change (%) per group and layer."""
    windows = sorted({_at(d, ("window",)) for d in dicts} - {None})
    return {"analysis": "attention_knockout", "n": len(dicts), "window": windows,
            "relative_change": aggregate_series(dicts, ("relative_change",))}


def _aggregator(name: str, result_type: type | None) -> Callable[[Sequence[dict]], dict]:
    found = record_for_result(name)
    registered = found.load_aggregator() if found is not None else None
    if registered is not None:
        return registered
    if result_type is not None and getattr(result_type, "analysis", None) == name:
        method = getattr(result_type, "aggregate", None)
        if callable(method):
            return method
    return aggregate_all_series


# --- figures ---------------------------------------------------------------------------------------------------------
def dataset_figure(results: Sequence[dict], aggregate: Mapping[str, dict]):
    """A matplotlib figure summarising results of one analysis over facts (the registry's figure for the results'
    "analysis" name; see `DatasetRun.figure`), or None."""
    if not results:
        return None
    found = record_for_result(results[0].get("analysis"))
    return found.draw(results, aggregate) if found is not None else None

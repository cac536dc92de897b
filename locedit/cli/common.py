"""Helpers every `locedit` verb shares: the user-error type (`UsageError`, defined in locedit.errors), argparse
types and argument groups, input and output checks made before a model loads, the one model loader, fact reading
and figure saving. Imports nothing else of the CLI."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from locedit.errors import UsageError

DEFAULT_MODEL = "smollm2-135m"


# --- argparse types: the message names the flag ----------------------------------------------------------------
def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a {what} integer, not {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be a {what} integer, not {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (argparse prefixes the flag to the message)."""
    return _int_at_least(text, 1, "positive")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer ≥ 0 (a layer index)."""
    return _int_at_least(text, 0, "non-negative")


def device_spec(text: str) -> str:
    """argparse type: a torch device string (cpu, cuda, cuda:1, mps)."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    return text


def head_spec(text: str):
    """argparse type: a head as LAYER.HEAD (23.4) or L23H4."""
    from locedit.core.head import Head
    from locedit.errors import HeadSpecError

    try:
        return Head.parse(text)
    except HeadSpecError:
        raise argparse.ArgumentTypeError(f"takes LAYER.HEAD pairs such as 23.4 (or L23H4), not {text!r}") from None


# --- argument groups ---------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id, local directory, .gguf file or alias (default: {DEFAULT_MODEL}, the built-in model)")
    p.add_argument("--device", type=device_spec, default=None, help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="default float32")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1: fastest measured on a busy 2-core machine, see docs/engine.md, 'Threads')")


def add_fact_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("one fact (or --facts FILE)")
    g.add_argument("--subject", help="the subject, as written in the prompt")
    g.add_argument("--prompt", help="the prompt, containing the subject (or '{}' in its place)")
    g.add_argument("--target", default=None,
                   help="the attribute to track (default: the model's own top-1 prediction)")
    g.add_argument("--facts", type=Path, help="a fact file: ROME known_1000, CounterFact or EasyEdit JSON/JSONL, "
                                             "or 'curated' for locedit's own fact set")
    g.add_argument("--limit", type=positive_int, default=None, help="use only the first N facts of --facts")
    g.add_argument("--only-known", action="store_true",
                   help="keep only the facts whose true target is the model's top-1 (the paper's protocol)")


# --- input checks ------------------------------------------------------------------------------------------------
def check_input_file(path: Path, flag: str) -> Path:
    """`path` exists, is a file and is readable, else UsageError naming `flag`."""
    if not path.exists():
        raise UsageError(f"{flag}: file not found: {path}")
    if not path.is_file():
        raise UsageError(f"{flag}: not a file: {path}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag}: file not readable: {path}")
    return path


def check_input_dir(path: Path, flag: str) -> Path:
    """`path` exists, is a directory and is readable, else UsageError naming `flag`."""
    if not path.exists():
        raise UsageError(f"{flag}: directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise UsageError(f"{flag}: not a directory: {path}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"{flag}: directory not readable: {path}")
    return path


def check_model_spec(spec: str) -> None:
    """A local model path (a .gguf file or a directory given as a path) exists; hub ids and aliases pass."""
    if spec.lower().endswith(".gguf"):
        check_input_file(Path(spec), "--model")
    elif os.path.sep in spec or spec.startswith("."):
        check_input_dir(Path(spec), "--model")


def read_fact_file(path: Path, flag: str = "--facts"):
    """The `FactFile` of `path` ('curated': locedit's set), read before any model loads; skipped rows are reported
    on stderr; UsageError naming `flag` for a missing file, or for one without a usable fact."""
    from locedit.core.datasets import curated_facts_path, read_facts

    path = curated_facts_path() if str(path) == "curated" else check_input_file(path, flag)
    fact_file = read_facts(path)
    for error in fact_file.errors:
        print(f"locedit: skipping {path}: {error}", file=sys.stderr)
    if not fact_file.facts:
        raise UsageError(f"no usable facts in {path}")
    return fact_file


def facts_from_args(args: argparse.Namespace) -> list:
    """The facts of --facts (first --limit) or the one fact of --subject/--prompt/--target, checked before the model
    loads. A given --target is the one tracked; without it the model's top-1 is."""
    from locedit.core.facts import Fact

    if args.facts is not None:
        if args.subject or args.prompt or args.target is not None:
            raise UsageError("give either --facts or --subject/--prompt/--target, not both")
        facts = read_fact_file(args.facts).facts
        return facts[: args.limit] if args.limit else facts
    if not args.subject or not args.prompt:
        raise UsageError("give --subject and --prompt (or --facts FILE)")
    for flag, given in (("--limit", args.limit is not None), ("--only-known", args.only_known)):
        if given:
            raise UsageError(f"{flag} applies with --facts")
    return [Fact(args.subject, args.prompt, args.target)]


def keep_known(lm, facts: list, args: argparse.Namespace) -> list:
    """With --only-known and --facts: the facts whose true target is the model's top-1."""
    if not (getattr(args, "only_known", False) and args.facts is not None):
        return facts
    from locedit.core.datasets import known_facts

    kept = known_facts(lm, facts)
    print(f"{len(kept)} facts the model gets right", file=sys.stderr)
    if not kept:
        raise UsageError(f"the model gets none of the {len(facts)} facts of {args.facts} right")
    return kept


# --- output checks -----------------------------------------------------------------------------------------------
def check_output_dir(path: Path, flag: str) -> Path:
    """`path` can be used as an output directory: an existing writable directory, or creatable (its nearest
    existing ancestor is a writable directory). UsageError naming `flag` otherwise. Creates nothing."""
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag}: {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{flag}: directory {path} is not writable")
        return path
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag}: cannot create {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: cannot create {path}: directory {parent} is not writable")
    return path


def _missing_ancestors(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing, p = [], path.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    return missing


@contextlib.contextmanager
def removed_on_failure(paths: Sequence[Path]) -> Iterator[None]:
    """When the block raises, the directories among `paths` (and their parents) that did not exist on entry and
    are still empty are removed again. Files written stay (a resumable run keeps its lines); existing directories
    are never touched."""
    fresh = sorted({d for p in paths for d in _missing_ancestors(p)}, key=lambda d: len(d.parts), reverse=True)
    try:
        yield
    except BaseException:
        for d in fresh:  # deepest first, so a parent empties before its turn
            with contextlib.suppress(OSError):
                d.rmdir()  # only succeeds when empty
        raise


# --- the model ---------------------------------------------------------------------------------------------------
def load_model(args: argparse.Namespace, *, announce: bool = True):
    """Load --model on --device (under `accelerate launch` / `torchrun` without --device: this process's device)
    with --dtype and --threads."""
    import torch

    from locedit.core.loading import load

    torch.set_num_threads(max(1, args.threads))
    device = args.device
    if device is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under accelerate launch / torchrun
        from accelerate import PartialState

        device = str(PartialState(cpu=not torch.cuda.is_available()).device)
    if announce:
        print(f"loading {args.model} ...", file=sys.stderr)
    return load(args.model, device=device, dtype=args.dtype)


# --- figures -----------------------------------------------------------------------------------------------------
def save_figure(fig, out: Path, name: str) -> None:
    """`fig` as out/figures/<name>.png and .svg."""
    from locedit.core.plots import save_figure as save

    save(fig, out / "figures" / name)


# --- progress ----------------------------------------------------------------------------------------------------
LONG_PROMPT_TOKENS = 256


def warn_if_long(lm, facts: Sequence, what: str) -> None:
    """One stderr line when a prompt is longer than LONG_PROMPT_TOKENS tokens: `what` costs grow with its length."""
    longest = max((len(lm.tokenizer(f.prompt)["input_ids"]), f.prompt) for f in facts)
    if longest[0] > LONG_PROMPT_TOKENS:
        print(f"locedit: warning: a prompt is {longest[0]} tokens long (over {LONG_PROMPT_TOKENS}); {what} runs "
              "interventions at every position and layer, so it may take minutes (progress below)", file=sys.stderr)


@contextlib.contextmanager
def forward_progress(lm, desc: str) -> Iterator[None]:
    """A tqdm counter on stderr of the model's forward passes while the block runs (the hook only counts)."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, unit="pass", file=sys.stderr, mininterval=1.0)
    handle = lm.model.register_forward_hook(lambda module, args, output: bar.update(1))
    try:
        yield
    finally:
        handle.remove()
        bar.close()

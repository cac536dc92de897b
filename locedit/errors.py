"""Error types raised by locedit. Every user mistake maps to one of these, with a message naming the problem."""

from __future__ import annotations


class LoceditError(Exception):
    """Base class of every error locedit raises on purpose."""


class UnsupportedModelError(LoceditError):
    """The model's architecture has no adapter (or is not a causal decoder-only LM)."""


class ModelLoadError(LoceditError):
    """A model spec could not be resolved or loaded (missing file, missing optional package, bad alias)."""


class UsageError(LoceditError):
    """A command line that cannot run as given: a flag that does not apply, a missing input, an unwritable output
    (the CLI prints it as one `locedit: error:` line and exits 2)."""


class FactError(LoceditError):
    """A fact is malformed: empty prompt, subject not in the prompt, a target that tokenizes to nothing."""


class InterventionError(LoceditError):
    """An intervention refers to layers, heads or positions that do not exist, or values of the wrong shape."""


class DatasetError(LoceditError):
    """A dataset file cannot be read at all (missing, not JSON, unknown format). Bad rows are reported per row."""


class HeadSpecError(LoceditError, ValueError):
    """A head written in a form `Head.parse` cannot read (use "L23H4", "23.4", (23, 4) or [23, 4])."""


class EditError(LoceditError):
    """An edit cannot be made, applied, reverted or read (wrong model, applied twice, corrupt file, ...)."""


class ModelMismatchError(LoceditError):
    """Two models that should share an architecture and tokenizer (a base and its edited copy) do not."""


class CalibrationError(LoceditError):
    """A calibration cannot be made, read or used (no usable facts, a corrupt or foreign calibration file)."""


class CheckpointError(EditError):
    """An editing session's checkpoint or log cannot be used: corrupt, from another model or run, or inconsistent."""

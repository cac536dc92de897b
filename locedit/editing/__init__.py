"""Editing facts where they are retrieved: ROME (r-ROME fix), MEMIT, AlphaEdit, head-parameter edits and FT-L, as
reversible, saveable `Edit` objects. `edit(lm, EditRequest(fact, new_target))`; a sequence of requests is one joint
edit."""

from locedit.editing.api import METHODS, edit, save_model
from locedit.editing.calibrate import calibrate
from locedit.editing.calibration import Calibration, load_calibration
from locedit.editing.edit import Edit, WeightDelta, applied_edits
from locedit.editing.edit_file import load_edit
from locedit.editing.session import EditSession, SessionReport
from locedit.editing.hparams import (
    FTHyperParams,
    HeadHyperParams,
    MEMITHyperParams,
    ResolvedHParams,
    ROMEHyperParams,
    read_hparams,
)
from locedit.errors import EditError

__all__ = ["METHODS", "Calibration", "Edit", "EditError", "EditSession", "FTHyperParams", "HeadHyperParams",
           "MEMITHyperParams", "ROMEHyperParams", "ResolvedHParams", "SessionReport", "WeightDelta", "applied_edits",
           "calibrate", "edit", "load_calibration", "load_edit",
           "read_hparams", "save_model"]

"""Editing facts where they are retrieved: ROME (r-ROME fix), MEMIT, AlphaEdit, head-parameter edits and FT-L, as
reversible, saveable `Edit` objects."""

from locedit.editing.api import METHODS, edit, edit_many, save_model
from locedit.editing.edit import Edit, EditError, WeightDelta, applied_edits, load_edit
from locedit.editing.hparams import FTHyperParams, HeadHyperParams, MEMITHyperParams, ROMEHyperParams

__all__ = ["METHODS", "Edit", "EditError", "FTHyperParams", "HeadHyperParams", "MEMITHyperParams", "ROMEHyperParams",
           "WeightDelta", "applied_edits", "edit", "edit_many", "load_edit", "save_model"]

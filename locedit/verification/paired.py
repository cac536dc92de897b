"""The unedited state beside the edited one, in one batch: `UneditedRows`.

While an edit is applied, forward hooks on the projections it changed subtract its change from the outputs of the
batch rows flagged as unedited: a flagged row computes W'x - ΔW x where the reverted model computes W x. The two agree up to float rounding (not bit for bit). verify uses it for its greedy generations, whose
decode steps cost about as much for 12 rows as for 6 (each step reads every weight): one decode loop for both
states instead of two. Edits of anything other than a linear projection's weight (a bias, an embedding, a norm)
are not supported (`supports`), and verify then measures the two states one after the other.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from locedit.errors import LoceditError


def _targets(lm, edit) -> list[tuple[nn.Module, object]] | None:
    """(module, delta) for every delta of `edit`, or None when one is not a linear projection's weight."""
    from transformers.pytorch_utils import Conv1D

    out = []
    for delta in edit.deltas:
        owner, _, attr = delta.name.rpartition(".")
        try:
            module = lm.model.get_submodule(owner)
        except AttributeError:
            return None
        if attr != "weight" or not isinstance(module, (nn.Linear, Conv1D)) or len(delta.shape) != 2:
            return None
        out.append((module, delta))
    return out


class UneditedRows:
    """Context manager, entered while `edit` is applied to `lm`: the batch rows where `flags` (a bool sequence,
    one per row of the next forwards; set it before each) is True run as the model without `edit`.

    `supports(lm, edit)` says whether every change of the edit is one the hooks can subtract."""

    def __init__(self, lm, edit) -> None:
        targets = _targets(lm, edit)
        if targets is None:
            raise LoceditError("this edit changes a parameter that is not a linear projection's weight; "
                               "measure the unedited state with the edit reverted instead")
        self.lm, self.edit, self._targets = lm, edit, targets
        self.flags: torch.Tensor | None = None
        self._handles: list = []

    @staticmethod
    def supports(lm, edit) -> bool:
        return bool(getattr(edit, "deltas", None)) and _targets(lm, edit) is not None

    def set_rows(self, flags: Sequence[bool]) -> None:
        self.flags = torch.tensor([bool(f) for f in flags], dtype=torch.bool, device=self.lm.device)

    def __enter__(self) -> "UneditedRows":
        if not self.edit.is_applied:
            raise LoceditError("UneditedRows needs the edit applied (its rows subtract the applied change)")
        for module, delta in self._targets:
            self._handles.append(module.register_forward_hook(self._hook(delta)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.flags = None

    def _hook(self, delta):
        device = self.lm.device
        left = right = dense = None
        if delta.dense is not None:
            dense = delta.dense.float().to(device)  # (out, in)
        else:
            left, right = delta.left.float().to(device), delta.right.float().to(device)

        def hook(module, args, output):
            flags = self.flags
            if flags is None or not bool(flags.any()):
                return None
            x = args[0]
            if x.shape[0] != flags.shape[0]:
                raise LoceditError(f"UneditedRows: a batch of {x.shape[0]} rows reached {delta.name}, but "
                                   f"{flags.shape[0]} row flags were set")
            xs = x[flags].float()
            change = xs @ dense.T if dense is not None else (xs @ right) @ left.T
            output = output.clone()
            output[flags] = (output[flags].float() - change).to(output.dtype)
            return output

        return hook

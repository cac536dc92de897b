"""`Head`: one attention head, one type. It parses every spelling locedit or its users write, and prints one."""

from __future__ import annotations

import numbers
import re
from typing import NamedTuple

from locedit.errors import HeadSpecError

_PATTERNS = (re.compile(r"^\s*L(\d+)\s*H(\d+)\s*$", re.I), re.compile(r"^\s*(\d+)\s*[.:,/]\s*(\d+)\s*$"))


class Head(NamedTuple):
    """Attention head `head` of layer `layer` (both 0-based). Prints as "L23H4"; JSON as `[23, 4]`."""

    layer: int
    head: int

    @classmethod
    def parse(cls, value: "Head | str | tuple[int, int] | list[int]") -> "Head":
        """A `Head` from `Head`, `(l, h)`, `[l, h]`, "L23H4" or "23.4"; anything else raises `HeadSpecError`."""
        if isinstance(value, Head):
            return value
        if isinstance(value, str):
            for pattern in _PATTERNS:
                m = pattern.match(value)
                if m:
                    return cls(int(m.group(1)), int(m.group(2)))
            raise HeadSpecError(f"cannot read head {value!r}: write it as L<layer>H<head> (e.g. L23H4) or 23.4")
        if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
            return cls(int(value[0]), int(value[1]))
        raise HeadSpecError(f"cannot read head {value!r}: give (layer, head), [layer, head], 'L23H4' or '23.4'")

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)

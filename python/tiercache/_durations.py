"""Durations given as seconds (int/float), ``timedelta``, or strings such as ``"30m"``, ``"1h30m"``,
``"500ms"``, ``"2d"``."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Optional, Union

Duration = Union[int, float, str, timedelta]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def seconds(d: Duration) -> float:
    """The duration in seconds; ``ValueError`` for a malformed or negative one."""
    if isinstance(d, timedelta):
        out = d.total_seconds()
    elif isinstance(d, bool):
        raise ValueError(f"not a duration: {d!r}")
    elif isinstance(d, (int, float)):
        out = float(d)
    elif isinstance(d, str):
        text = d.strip().replace(" ", "")
        pos, out = 0, 0.0
        for m in _PART.finditer(text):
            if m.start() != pos:
                break
            out += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            raise ValueError(f"not a duration: {d!r} (use e.g. 30, '500ms', '30s', '5m', '1h30m', '1d')")
    else:
        raise ValueError(f"not a duration: {d!r}")
    if out < 0:
        raise ValueError(f"negative duration: {d!r}")
    return out


def opt_seconds(d: Optional[Duration]) -> Optional[float]:
    return None if d is None else seconds(d)

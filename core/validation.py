"""The repeated argument checks, written once: each returns the normalised value or raises
`ValueError` with one message shape, ``"<field> must be <what is allowed>, got <value>"``.

The field name is the caller's (``"params.temperature"``, ``"--rtt-ms"``), so the same message
serves a dataclass, a CLI option and a gRPC field (the services map ValueError to
INVALID_ARGUMENT with the field name in a trailer). `bool` is never accepted as a number: True
as a token count is always a bug, never an intent.
"""

from __future__ import annotations

import math
import numbers
from typing import cast

# These checks run on every round's messages (a verdict, a block): a plain int or float, by far
# the usual value, is accepted without the slower abstract-class test.


def is_int(value: object) -> bool:
    """An integral number that is not a bool."""
    if type(value) is int:
        return True
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number (int or float) that is not a bool; may be inf or nan."""
    if type(value) is float or type(value) is int:
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


def check_int(field: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi] (a bound of None is open-ended)."""
    if type(value) is int and (lo is None or value >= lo) and (hi is None or value <= hi):
        return value
    v = int(cast(numbers.Integral, value)) if is_int(value) else None
    if v is None or (lo is not None and v < lo) or (hi is not None and v > hi):
        allowed = _range_text(lo, hi, False, False)
        raise ValueError(f"{field} must be an int {allowed}".rstrip() + f", got {value!r}")
    return v


def check_float(
    field: str,
    value: object,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    unit: str = "",
) -> float:
    """`value` as a finite float within the bounds (closed unless `lo_open` / `hi_open`).

    `unit` is appended to the allowed range in the message (``"(milliseconds)"``).
    """
    if (
        type(value) is float
        and math.isfinite(value)
        and (lo is None or (value > lo if lo_open else value >= lo))
        and (hi is None or (value < hi if hi_open else value <= hi))
    ):
        return value
    v = float(cast(numbers.Real, value)) if is_real(value) else math.nan
    ok = math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo))
    ok = ok and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        allowed = " ".join(p for p in (_range_text(lo, hi, lo_open, hi_open), unit) if p)
        raise ValueError(f"{field} must be a finite number {allowed}".rstrip() + f", got {value!r}")
    return v


def check_ms(field: str, value: object) -> float:
    """A duration in milliseconds, >= 0."""
    return check_float(field, value, 0.0, unit="(milliseconds)")


def check_prob(field: str, value: object) -> float:
    """A probability in [0, 1]."""
    return check_float(field, value, 0.0, 1.0)


def check_positive(field: str, value: object) -> float:
    """A finite number > 0."""
    return check_float(field, value, 0.0, lo_open=True)


def check_port(field: str, value: object, *, allow_zero: bool = True) -> int:
    """A TCP port, [0, 65535] (0: any free port) or [1, 65535]."""
    return check_int(field, value, 0 if allow_zero else 1, 65535)

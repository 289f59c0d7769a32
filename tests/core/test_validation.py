"""edgespec.core.validation: every check accepts what it allows (normalised), rejects bool, nan,
inf and out-of-range values, and says which field and which range in one message shape."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from edgespec.core.validation import (
    check_float,
    check_int,
    check_ms,
    check_port,
    check_positive,
    check_prob,
    is_int,
    is_real,
)

NAN, INF = float("nan"), float("inf")


def test_is_int_and_is_real() -> None:
    for value in (0, -3, 2**70, np.int64(5)):
        assert is_int(value) and is_real(value)
    for value in (1.0, 0.5, NAN, INF, Fraction(1, 3), np.float32(0.25)):
        assert not is_int(value) and is_real(value)
    for value in (True, False, "1", None, [1], 1j):
        assert not is_int(value) and not is_real(value)


def test_check_int_accepts_and_normalises() -> None:
    assert check_int("n", 0) == 0
    assert check_int("n", 5, 1, 5) == 5  # both bounds closed
    assert check_int("n", 1, 1, 5) == 1
    assert check_int("n", -7) == -7  # no bounds
    value = check_int("n", np.int64(3), 0)
    assert value == 3 and type(value) is int


@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, NAN, INF, "3", None])
def test_check_int_rejects_non_ints(value: object) -> None:
    with pytest.raises(ValueError, match=r"^count must be an int >= 0, got "):
        check_int("count", value, 0)


def test_check_int_bounds_and_message() -> None:
    with pytest.raises(ValueError, match=r"^k must be an int in \[1, 16\], got 0$"):
        check_int("k", 0, 1, 16)
    with pytest.raises(ValueError, match=r"^k must be an int in \[1, 16\], got 17$"):
        check_int("k", 17, 1, 16)
    with pytest.raises(ValueError, match=r"^k must be an int >= 1, got -1$"):
        check_int("k", -1, 1)
    with pytest.raises(ValueError, match=r"^k must be an int <= 4, got 5$"):
        check_int("k", 5, hi=4)
    with pytest.raises(ValueError, match=r"^k must be an int, got True$"):
        check_int("k", True)


def test_check_float_accepts_and_normalises() -> None:
    value = check_float("x", 3)
    assert value == 3.0 and type(value) is float
    assert check_float("x", Fraction(1, 2), 0, 1) == 0.5
    assert check_float("x", np.float32(0.25), 0, 1) == 0.25
    assert check_float("x", 0.0, 0.0, 1.0) == 0.0  # closed bounds include both ends
    assert check_float("x", 1.0, 0.0, 1.0) == 1.0
    assert check_float("x", -1e300) == -1e300  # no bounds


@pytest.mark.parametrize("value", [True, False, NAN, INF, -INF, "0.5", None, 1j])
def test_check_float_rejects_non_finite_and_non_numbers(value: object) -> None:
    with pytest.raises(ValueError, match=r"^ratio must be a finite number in \[0, 1\], got "):
        check_float("ratio", value, 0, 1)
    with pytest.raises(ValueError, match=r"^ratio must be a finite number, got "):
        check_float("ratio", value)


def test_check_float_open_and_closed_bounds() -> None:
    with pytest.raises(ValueError, match=r"^p must be a finite number in \(0, 1\], got 0$"):
        check_float("p", 0, 0, 1, lo_open=True)
    assert check_float("p", 1, 0, 1, lo_open=True) == 1.0
    with pytest.raises(ValueError, match=r"^p must be a finite number in \[0, 1\), got 1$"):
        check_float("p", 1, 0, 1, hi_open=True)
    assert check_float("p", 0, 0, 1, hi_open=True) == 0.0
    with pytest.raises(ValueError, match=r"^p must be a finite number in \(0, 1\), got 1.0$"):
        check_float("p", 1.0, 0, 1, lo_open=True, hi_open=True)
    assert check_float("p", 1e-320, 0, 1, lo_open=True, hi_open=True) == 1e-320
    with pytest.raises(ValueError, match=r"^g must be a finite number > 0, got 0$"):
        check_float("g", 0, 0, lo_open=True)
    with pytest.raises(ValueError, match=r"^g must be a finite number >= 2, got 1.5$"):
        check_float("g", 1.5, 2)
    with pytest.raises(ValueError, match=r"^g must be a finite number < 2, got 2$"):
        check_float("g", 2, hi=2, hi_open=True)
    with pytest.raises(ValueError, match=r"^g must be a finite number <= 2, got 3$"):
        check_float("g", 3, hi=2)


def test_check_float_unit_in_message() -> None:
    with pytest.raises(ValueError, match=r"^t must be a finite number > 0 \(s\), got -1$"):
        check_float("t", -1, 0, lo_open=True, unit="(s)")


def test_check_ms() -> None:
    assert check_ms("rtt_ms", 0) == 0.0
    assert check_ms("rtt_ms", 12.5) == 12.5
    for value in (-0.1, NAN, INF, True, "5"):
        with pytest.raises(
            ValueError, match=r"^rtt_ms must be a finite number >= 0.* \(milliseconds\)"
        ):
            check_ms("rtt_ms", value)


def test_check_prob() -> None:
    assert check_prob("alpha", 0) == 0.0
    assert check_prob("alpha", 1) == 1.0
    assert check_prob("alpha", 0.3) == 0.3
    for value in (-1e-9, 1.0000001, NAN, INF, False):
        with pytest.raises(
            ValueError, match=r"^alpha must be a finite number in \[0(\.0)?, 1(\.0)?\]"
        ):
            check_prob("alpha", value)


def test_check_positive() -> None:
    assert check_positive("scale", 1e-12) == 1e-12
    assert check_positive("scale", 7) == 7.0
    for value in (0, 0.0, -1, NAN, INF, True):
        with pytest.raises(ValueError, match=r"^scale must be a finite number > 0"):
            check_positive("scale", value)


def test_check_port() -> None:
    assert check_port("--port", 0) == 0
    assert check_port("--port", 65535) == 65535
    assert check_port("--port", 1, allow_zero=False) == 1
    with pytest.raises(ValueError, match=r"^--port must be an int in \[1, 65535\], got 0$"):
        check_port("--port", 0, allow_zero=False)
    for value in (-1, 65536, True, 80.0, "80"):
        with pytest.raises(ValueError, match=r"^--port must be an int in \[0, 65535\], got "):
            check_port("--port", value)


def test_message_repr_of_the_value() -> None:
    # the value is shown with repr, so a string is told apart from a number
    with pytest.raises(ValueError, match=r"got '3'$"):
        check_int("n", "3")
    with pytest.raises(ValueError, match=r"got nan$"):
        check_float("x", math.nan)

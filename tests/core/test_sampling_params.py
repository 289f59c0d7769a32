"""SamplingParams: validation of every field, and the dict form used on the wire."""

import json
import math

import pytest

from edgespec.core.params import SamplingParams

INVALID = [
    # (field, bad value)
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", -math.inf),
    ("temperature", -0.1),
    ("temperature", True),
    ("temperature", "1.0"),
    ("temperature", None),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.5),
    ("top_p", math.nan),
    ("top_p", math.inf),
    ("top_p", True),
    ("top_p", "0.9"),
    ("top_k", -1),
    ("top_k", 2.0),
    ("top_k", 1.5),
    ("top_k", True),
    ("top_k", "5"),
    ("top_k", None),
    ("max_new_tokens", 0),
    ("max_new_tokens", -3),
    ("max_new_tokens", 1_000_001),
    ("max_new_tokens", 10.0),
    ("max_new_tokens", False),
    ("max_new_tokens", math.nan),
    ("seed", -1),
    ("seed", 2**64),
    ("seed", 1.0),
    ("seed", True),
    ("seed", "7"),
    ("stop_token_ids", (-1,)),
    ("stop_token_ids", [1, -2]),
    ("stop_token_ids", (1.0,)),
    ("stop_token_ids", (True,)),
    ("stop_token_ids", ("3",)),
    ("stop_token_ids", 3),
    ("stop_token_ids", "12"),
    ("stop_token_ids", None),
]


@pytest.mark.parametrize(("field", "value"), INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_is_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_error_states_value_and_allowed_range():
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0, got nan"):
        SamplingParams(temperature=math.nan)
    with pytest.raises(ValueError, match=r"top_p .* in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match=r"max_new_tokens .* \[1, 1000000\], got 0"):
        SamplingParams(max_new_tokens=0)


VALID = [
    SamplingParams(),
    SamplingParams(temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=1, seed=0),
    SamplingParams(temperature=2.0, top_p=1.0, max_new_tokens=1_000_000, seed=2**63 - 1),
    SamplingParams(temperature=1.0, stop_token_ids=(0, 2, 50256)),
    SamplingParams(temperature=0.5, seed=2**64 - 1),
]


@pytest.mark.parametrize("params", VALID)
def test_round_trip_through_dict_and_json(params):
    d = params.to_dict()
    assert SamplingParams.from_dict(d) == params
    assert SamplingParams.from_dict(json.loads(json.dumps(d))) == params


def test_boundaries_and_normalisation():
    p = SamplingParams(temperature=1, top_p=1, stop_token_ids=[3, 1])
    assert p.temperature == 1.0 and isinstance(p.temperature, float)
    assert isinstance(p.top_p, float)
    assert p.stop_token_ids == (3, 1)
    assert p == SamplingParams(temperature=1.0, stop_token_ids=(3, 1))
    assert SamplingParams(top_p=1e-9).top_p == 1e-9  # top_p just above 0 is allowed


def test_is_greedy():
    assert SamplingParams().is_greedy
    assert SamplingParams(temperature=0.0, top_k=5).is_greedy
    assert not SamplingParams(temperature=0.5).is_greedy


def test_frozen():
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 1.0  # type: ignore[misc]


def test_from_dict_missing_keys_take_defaults():
    assert SamplingParams.from_dict({"temperature": 0.5}) == SamplingParams(temperature=0.5)


def test_from_dict_rejects_unknown_keys_naming_them():
    with pytest.raises(ValueError, match=r"bogus.*temprature|temprature.*bogus"):
        SamplingParams.from_dict({"temprature": 1.0, "bogus": 2, "top_k": 3})


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams.from_dict({"top_k": -5})


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ValueError, match="mapping"):
        SamplingParams.from_dict([("temperature", 1.0)])  # type: ignore[arg-type]

"""``KEY=VALUE`` parsing shared by ``--set``, ``--grid`` and bracketed zoo names."""

import pytest

from unifieddelta.errors import InvalidParameterError
from unifieddelta.settings import parse_settings, parse_value


@pytest.mark.parametrize(
    "text,value",
    [
        ("3", 3),
        ("-2", -2),
        ("0.5", 0.5),
        ("5e-5", 5e-5),
        ("true", True),
        ("False", False),
        ("none", None),
        ("normal", "normal"),
        ("", ""),
    ],
)
def test_values_are_typed(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_settings_and_their_errors():
    assert parse_settings(["p=0.9", " k = -1 ", "magnitudes=uniform"]) == {"p": 0.9, "k": -1, "magnitudes": "uniform"}
    assert parse_settings(None) == {}
    for bad in ("p", "=3"):
        with pytest.raises(InvalidParameterError, match="--grid expects KEY=VALUE"):
            parse_settings([bad], what="--grid")

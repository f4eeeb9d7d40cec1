"""Layer specs as operators type them."""

from __future__ import annotations

import pytest

from eplbctl.layerspec import LayerSpecError, format_layers, parse_layers


@pytest.mark.parametrize(("spec", "layers"), [
    ("3,7-9", [3, 7, 8, 9]),
    (" 3 , 7 - 9 ", [3, 7, 8, 9]),
    ("9,3,3,8-9", [3, 8, 9]),
    ("5-5", [5]),
    ("0", [0]),
    ("57", [57]),
    ("all", list(range(58))),
    (" ALL ", list(range(58))),
])
def test_parse_layers(spec: str, layers: list[int]) -> None:
    assert parse_layers(spec, 58) == layers


@pytest.mark.parametrize(("spec", "message"), [
    ("", "empty layer spec"),
    ("   ", "empty layer spec"),
    ("99", "layer 99 out of range 0-57"),
    ("3,50-60", "layer 60 out of range 0-57"),
    ("9-7", "bad range '9-7'"),
    ("x", "bad layer 'x' (expected a number, a range like 7-9, or 'all')"),
    ("-3", "bad layer '-3' (expected a number, a range like 7-9, or 'all')"),
    ("1-2-3", "bad layer '1-2-3' (expected a number, a range like 7-9, or 'all')"),
    ("3,,4", "empty item in layer spec '3,,4'"),
    ("3,", "empty item in layer spec '3,'"),
    ("1.5", "bad layer '1.5'"),
])
def test_bad_specs_have_one_line_messages(spec: str, message: str) -> None:
    with pytest.raises(LayerSpecError) as info:
        parse_layers(spec, 58)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_layer_spec_error_is_value_error() -> None:
    with pytest.raises(ValueError, match="no layers to choose from"):
        parse_layers("all", 0)


@pytest.mark.parametrize(("layers", "spec"), [
    ([3, 7, 8, 9], "3,7-9"),
    ([9, 8, 7, 3, 3], "3,7-9"),
    ([1, 2], "1-2"),
    ([0], "0"),
    ([], ""),
    (list(range(58)), "0-57"),
])
def test_format_layers(layers: list[int], spec: str) -> None:
    assert format_layers(layers) == spec


def test_round_trip() -> None:
    layers = [0, 2, 3, 4, 10, 12, 13, 57]
    assert parse_layers(format_layers(layers), 58) == layers

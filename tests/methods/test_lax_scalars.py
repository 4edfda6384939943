"""A parameter's scalars are read as mergekit 0.1.5 reads them: pydantic's lax mode for the
parameter's type. The reference is pydantic itself (the version mergekit's environment holds),
over a table of the forms YAML configs hold."""

from __future__ import annotations

import math

import pytest
from pydantic import TypeAdapter, ValidationError

from distmerge.errors import ConfigError
from distmerge.methods.base import ParamSpec
from distmerge.methods.lax_scalars import lax_scalar
from distmerge.parameters import resolve_value

INPUTS = [
    True, False, 0, 1, 2, -1, 5, 2**70, 0.0, -0.0, 0.5, 1.0, 2.0, 2.5, 1e20, 9007199254740992.0, math.inf, -math.inf,
    math.nan, "0.05", " 0.05 ", "1e-3", "1E3", "inf", "-inf", "nan", "NaN", "Infinity", "-Infinity", "1e400", "+1",
    "-0", "1.", ".5", "  .5", "1.0", "-1.0", "0.0", "5.0", "1.5", "1_000", "1__000", "1_000.0", "0x10", "1 000",
    "", " ", "abc", "true", "True", "TRUE", "false", "yes", " yes ", "no", "on", "OFF", "t", "f", "y", "N", "0", "1",
    "2", " 1 ", "١", "٣.٥", None, [0.5], {"a": 1},
    # whitespace as pydantic strips it (Unicode's, not Python's separators), underscores as it drops them
    "\u20030.5", "0.5\u3000", "0.5\xa0", "\x850.5", "\x1c0.5", "\x1f5", "\u200b5", "\ufeff5", "\x0b5", "\u20035",
    "5\u3000", " \t1\n", "0_.5", "1._5", "1_.5", "5_.0", "1__0", "_1", "1_", "in_f", "-_1", "_-1", "1e_10", "1_e5",
    "1_000.000_1", "nan_", 10**400, -(10**400),
]


def _pydantic(kind: type, value: object) -> object:
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError:
        return "refused"


def _ours(kind: type, value: object) -> object:
    try:
        return lax_scalar(kind, value)
    except ValueError:
        return "refused"


@pytest.mark.parametrize("kind", [float, int, bool, str])
def test_every_form_reads_as_pydantic_reads_it(kind):
    for value in INPUTS:
        expected, got = _pydantic(kind, value), _ours(kind, value)
        assert type(got) is type(expected), (kind, value, got, expected)
        if isinstance(got, float) and math.isnan(got):
            assert math.isnan(expected)
        else:
            assert got == expected, (kind, value, got, expected)


def test_a_spec_takes_what_mergekit_runs_and_refuses_what_would_poison_the_merge():
    number, count, switch = ParamSpec(None), ParamSpec(10, int), ParamSpec(False, bool)
    assert number.validate(True, "t") == 1.0  # slerp's t: true
    assert number.validate("0.05", "density") == 0.05
    assert count.validate("5", "max_iter") == 5
    assert count.validate(7.0, "max_iter") == 7
    assert switch.validate("yes", "normalize") is True
    assert switch.validate(0, "int8_mask") is False
    for poison in ("inf", "nan", "-Infinity", math.inf):  # mergekit runs these; every weight would be inf or NaN
        with pytest.raises(ConfigError, match="poison every merged weight"):
            number.validate(poison, "weight")
    with pytest.raises(ConfigError, match=r"max_iter: expected a whole number, got 2\.5"):
        count.validate(2.5, "max_iter")  # mergekit refuses it too; distmerge used to truncate it to 2
    with pytest.raises(ConfigError, match="normalize: expected true or false, got 'maybe'"):
        switch.validate("maybe", "normalize")
    with pytest.raises(ConfigError, match="expected one of l1, inverse_density, got 1"):
        ParamSpec("l1", str, choices=("l1", "inverse_density")).validate(1, "rescale_mode")


def test_a_list_is_read_before_it_is_told_a_gradient_from_labels():
    number, switch = ParamSpec(None), ParamSpec(None, bool)
    layer = "model.layers.1.mlp.up_proj.weight"
    assert resolve_value(["0.2", "0.8"], layer, 0.5, "w", number.read) == pytest.approx(0.5)  # quoted: a gradient
    assert resolve_value([True, False], layer, 0.25, "t", number.read) == pytest.approx(0.75)  # 1.0 -> 0.0
    assert resolve_value(["yes", "no"], layer, 0.6, "n", switch.read) is True  # a switch's list selects
    assert resolve_value([0, 1], layer, 1.0, "n", switch.read) is True
    filtered = [{"filter": "mlp", "value": ["0", "1"]}, {"value": "0.5"}]
    assert resolve_value(filtered, layer, 0.25, "w", number.read) == pytest.approx(0.25)
    assert resolve_value(filtered, "model.norm.weight", 0.25, "w", number.read) == 0.5
    assert resolve_value([], layer, 0.5, "w", number.read) is None  # mergekit: not set here, the next scope applies
    assert resolve_value([{"filter": "mlp", "value": []}, {"value": 1}], layer, 0.5, "w", number.read) is None
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.weight\[1\]: expected a number, got 'abc'"):
        resolve_value([0.1, "abc"], layer, 0.5, "models[0].parameters.weight", number.read)

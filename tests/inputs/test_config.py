"""Config parsing: mergekit schema, sizes, parameter forms and errors that name the key."""

from __future__ import annotations

import pytest

from distmerge.config import load_config, parse_config
from distmerge.errors import ConfigError
from distmerge.methods.base import ParamSpec
from distmerge.parameters import resolve_value
from distmerge.sizes import parse_size

NUMBER, SWITCH = ParamSpec(None), ParamSpec(None, bool)

BASE = {"merge_method": "ties", "base_model": "b", "models": [{"model": "m", "parameters": {"weight": 1}}]}


@pytest.mark.parametrize("text,value", [("512B", 512), ("64KB", 64_000), ("8MB", 8_000_000), ("5GB", 5 * 10**9),
                                        ("1GiB", 2**30), (4096, 4096), ("1.5MB", 1_500_000), (" 7 ", 7)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["5XB", "-1MB", "MB", "0", True, ""])
def test_bad_sizes_name_the_field(bad):
    with pytest.raises(ConfigError, match="shard"):
        parse_size(bad, "execution.shard_size")


def test_gradient_interpolates_like_mergekit():
    # 5 layers: layer i takes t = i / 4; a 3-entry gradient is sampled at t * 2.
    values = [0.0, 1.0, 0.5]
    got = [resolve_value(values, f"model.layers.{i}.mlp.up_proj.weight", i / 4, "w", NUMBER.read) for i in range(5)]
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5])
    assert resolve_value([True, False], "x", 0.6, "w", SWITCH.read) is True  # booleans select: entry int(t * (len - 1))
    assert resolve_value([True, False], "x", 1.0, "w", SWITCH.read) is False


def test_filters_first_match_wins_and_fallback():
    value = [{"filter": "self_attn", "value": 0.1}, {"filter": "attn", "value": 0.2}, {"value": 0.9}]
    assert resolve_value(value, "model.layers.0.self_attn.q_proj.weight", 0.0, "w", NUMBER.read) == 0.1
    assert resolve_value(value, "x.cross_attn.weight", 0.0, "w", NUMBER.read) == 0.2
    assert resolve_value(value, "model.norm.weight", 0.0, "w", NUMBER.read) == 0.9
    nested = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 3}]
    assert resolve_value(nested, "model.layers.3.mlp.up_proj.weight", 0.5, "w", NUMBER.read) == 0.5
    assert resolve_value([{"filter": "mlp", "value": 1}], "model.norm.weight", 0.0, "w", NUMBER.read) is None


def test_a_filter_entry_with_a_number_key_is_a_config_error():
    """YAML keys need not be strings (``{value: .nan, 1: .nan}``): the message lists them all
    (found by the fuzz test: sorting int and str keys raised a TypeError, a traceback)."""
    with pytest.raises(ConfigError, match=r"filter entries take keys 'filter' and 'value', got \['1', 'value'\]"):
        resolve_value([{"value": 0.5, 1: 0.5}], "model.norm.weight", 0.0, "w", NUMBER.read)
    with pytest.raises(ConfigError, match=r"a mapping with keys \['1', 'filter'\]"):
        resolve_value({"filter": 0.5, 1: 0.5}, "model.norm.weight", 0.0, "w", NUMBER.read)


def test_filters_as_mergekit_unfiltered_first_and_star_match_everything():
    """mergekit 0.1.5: an entry without a filter, or with filter "*", matches every tensor, so
    placed first it wins; a single {filter, value} mapping is a one-entry list."""
    first = [{"value": 0.9}, {"filter": "mlp", "value": 0.1}]
    assert resolve_value(first, "model.layers.0.mlp.up_proj.weight", 0.0, "w", NUMBER.read) == 0.9
    star = [{"filter": "*", "value": 0.25}, {"value": 0.9}]
    assert resolve_value(star, "model.norm.weight", 0.0, "w", NUMBER.read) == 0.25
    single = {"filter": "embed", "value": [1.0, 3.0]}
    assert resolve_value(single, "model.embed_tokens.weight", 0.5, "w", NUMBER.read) == 2.0
    assert resolve_value(single, "model.norm.weight", 0.0, "w", NUMBER.read) is None


def test_one_problem_is_one_line_and_several_are_listed():
    """One problem: one line, keys named as every other message names them (``models[0].x``);
    several: a count, then a line each."""
    with pytest.raises(ConfigError) as one:
        parse_config({**BASE, "models": [{"model": "m", "parameters": [1, 2]}]}, source="m.yml")
    assert str(one.value) == ("m.yml: invalid merge config: models[0].parameters: Input should be a valid "
                              "dictionary (got [1, 2])")
    with pytest.raises(ConfigError) as several:
        parse_config({**BASE, "models": [{"model": "m", "paramters": {}, "foo": 1}]}, source="m.yml")
    assert str(several.value).splitlines() == [
        "m.yml: invalid merge config (2 problems)",
        "  models[0].paramters: unknown key; allowed keys here: model, parameters",
        "  models[0].foo: unknown key; allowed keys here: model, parameters",
    ]


def test_unknown_key_lists_allowed():
    with pytest.raises(ConfigError, match=r"invalid merge config: models\[0\]\.paramters: unknown key; allowed keys here: model, parameters"):
        parse_config({**BASE, "models": [{"model": "m", "paramters": {}}]})
    with pytest.raises(ConfigError, match=r"execution\.shard_sise: unknown key.*shard_size"):
        parse_config({**BASE, "execution": {"shard_sise": "1MB"}})


def test_wrong_types_and_ranges():
    with pytest.raises(ConfigError, match=r"aim\.omega"):
        parse_config({**BASE, "aim": {"omega": 1.5}})
    with pytest.raises(ConfigError, match=r"dtype.*allowed"):
        parse_config({**BASE, "dtype": "float8"})
    with pytest.raises(ConfigError, match="exactly one of 'models'.*or 'slices'"):
        parse_config({"merge_method": "linear"})
    with pytest.raises(ConfigError, match="tokenizer_source or a tokenizer: block, not both"):
        parse_config({**BASE, "tokenizer_source": "union", "tokenizer": {"source": "base"}})


@pytest.mark.parametrize(("aim", "message"), [
    ({"stages": True}, r"aim\.stages: must be 'auto' or an integer from 1 to 4096 \(got true\)$"),
    ({"stages": 2.0}, r"aim\.stages: must be .* \(got 2\.0\)$"),
    ({"stages": "2"}, r"aim\.stages: must be .* \(got '2'\)$"),
    ({"stages": 0}, r"aim\.stages: must be .* \(got 0\)$"),
    ({"micro_batch_size": True}, r"aim\.micro_batch_size: Input should be a valid integer \(got true\)$"),
    ({"calibration": {"n_samples": 8.0}}, r"aim\.calibration\.n_samples: Input should be a valid integer"),
    ({"calibration": {"block_size": False}}, r"aim\.calibration\.block_size: Input should be a valid integer"),
])
def test_aim_counts_are_integers_not_booleans_or_floats(aim, message):
    """A YAML ``true`` or ``2.0`` where a count belongs is a mistake to point at (pydantic's lax
    int would read them as 1 and 2)."""
    with pytest.raises(ConfigError, match=message):
        parse_config({**BASE, "aim": aim})
    assert parse_config({**BASE, "aim": {"stages": 2, "micro_batch_size": 1}}).aim.stages == 2


def test_yaml_syntax_error_has_line(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yml: YAML syntax error at line \d+, column \d+"):
        load_config(path)


def test_mergekit_file_runs_unchanged(tmp_path):
    path = tmp_path / "mk.yml"
    path.write_text(
        "models:\n  - model: a\n    parameters:\n      density: 0.5\n      weight: 0.5\n"
        "  - model: b\n    parameters:\n      density: 0.5\n      weight: [0, 0.3, 0.7, 1]\n"
        "merge_method: ties\nbase_model: base\nparameters:\n  normalize: true\n  int8_mask: true\n"
        "dtype: bfloat16\ntokenizer_source: base\n"
    )
    cfg = load_config(path)
    # no out_dtype: the output takes what the method returns (TIES: the compute dtype)
    assert cfg.merge_method == "ties" and cfg.compute_dtype == "BF16" and cfg.out_dtype is None
    assert cfg.out_dtype_code(cfg.compute_dtype) == "BF16"

"""Fuzzing: whatever configs and safetensors headers look like, the answer is a
DistmergeError with a message (never another exception, never a hang)."""

from __future__ import annotations

import json
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distmerge.config import load_config, parse_config
from distmerge.errors import CheckpointError, ConfigError, DistmergeError
from distmerge.io.safetensors import parse_safetensors_header, read_rows
from distmerge.plan import build_plan

FAST = settings(max_examples=150, deadline=2000, derandomize=bool(os.environ.get("CI")), suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(["filter", "value", "x"]), inner, max_size=3)), max_leaves=8)
param_names = st.sampled_from(["weight", "density", "lambda", "normalize", "gamma", "epsilon", "t", "int8_mask", "bogus"])
params = st.dictionaries(param_names, values, max_size=4)
methods = st.sampled_from(["linear", "task_arithmetic", "ties", "dare_ties", "slerp", "model_stock", "nope", 3])


@FAST
@given(data=st.data())
def test_configs_never_crash(llama_family, data):
    base, experts = llama_family
    paths = st.sampled_from([str(base), str(experts[0]), str(experts[1]), "/does/not/exist"])
    config = data.draw(st.fixed_dictionaries(
        {"merge_method": methods},
        optional={
            "base_model": st.one_of(paths, scalars),
            "models": st.lists(st.fixed_dictionaries({"model": paths}, optional={"parameters": params}), max_size=3),
            "parameters": params,
            "dtype": st.sampled_from(["float32", "bfloat16", "fp16", "int8", 5]),
            "out_dtype": st.sampled_from(["float32", "bfloat16", None]),
            "execution": st.dictionaries(st.sampled_from(["shard_size", "max_file_size", "workers", "seed", "x"]),
                                         st.one_of(st.integers(-3, 10**7), st.text(max_size=6)), max_size=3),
            "aim": st.one_of(st.none(), st.dictionaries(st.sampled_from(["omega", "stages", "stats"]), scalars, max_size=2)),
            "junk": scalars,
        }))
    try:
        build_plan(parse_config(config))
    except DistmergeError as e:
        assert str(e)


@FAST
@given(text=st.text(max_size=200))
def test_yaml_text_never_crashes(tmp_path, text):
    path = tmp_path / "c.yml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e)


@FAST
@given(raw=st.binary(max_size=300))
def test_random_bytes_are_rejected_cleanly(tmp_path, raw):
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw)
    try:
        parse_safetensors_header(path)
    except CheckpointError as e:
        assert "x.safetensors" in str(e)


dims = st.lists(st.integers(0, 6), max_size=3)
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "F33", "", 7]),
    "shape": st.one_of(dims, st.just([-1]), st.just("3"), st.lists(st.floats(0, 3), max_size=2)),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 400), min_size=2, max_size=2), st.lists(st.integers(0, 40), max_size=3)),
})


@FAST
@given(header=st.dictionaries(st.text(min_size=1, max_size=6), entries, max_size=4), data_len=st.integers(0, 400),
       meta=st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), st.integers()))
def test_structured_headers_are_validated(tmp_path, header, data_len, meta):
    obj = dict(header)
    if meta is not None:
        obj["__metadata__"] = meta
    raw = json.dumps(obj).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
    try:
        tensors, _ = parse_safetensors_header(path)
    except CheckpointError:
        return
    for info in tensors.values():  # a header that validates can be read in full
        rows = read_rows(info, 0, info.rows)
        assert rows.numel() == info.numel

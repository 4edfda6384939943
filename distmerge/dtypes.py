"""Dtype names: safetensors' codes, config spellings and torch dtypes in one table."""

from __future__ import annotations

import torch

from distmerge.errors import ConfigError

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}
ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in SAFETENSORS_TO_TORCH.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}

# The spellings a merge config may use for `dtype` / `out_dtype` (mergekit's plus short forms).
CONFIG_DTYPES: dict[str, str] = {
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
}
TORCH_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def promoted(codes: list[str]) -> str:
    """Safetensors code of the dtype torch promotes these to (bf16 with bf16: bf16; bf16 with
    fp16: fp32; anything with fp64: fp64): where mergekit merges a tensor without ``dtype``."""
    dtype = SAFETENSORS_TO_TORCH[codes[0]]
    for code in codes[1:]:
        dtype = torch.promote_types(dtype, SAFETENSORS_TO_TORCH[code])
    return TORCH_TO_SAFETENSORS[dtype]


def config_dtype(name: str, field: str) -> str:
    """Return the safetensors code for a config dtype spelling, or a ConfigError naming the field."""
    code = CONFIG_DTYPES.get(str(name).lower())
    if code is None:
        allowed = ", ".join(sorted({"float32", "float16", "bfloat16", "float64"}))
        raise ConfigError(f"{field}: unknown dtype {name!r}; allowed: {allowed}")
    return code


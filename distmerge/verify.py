"""``distmerge verify``: is a merged checkpoint complete, consistent and intact?

Checks the index against the files, every safetensors header, every checksum in the merge
journal against the bytes on disk, that the architecture named by ``config.json`` finds every
tensor it expects with the right shape and dtype, and that no tensor holds NaN or Inf. The merge
runs the same checks before it writes the index.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distmerge.checkpoint import TensorInfo, parse_safetensors_header, read_rows
from distmerge.dtypes import ITEMSIZE, SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS
from distmerge.errors import CheckpointError
from distmerge.journal import CRC_CHUNK, JOURNAL_NAME, read_journal
from distmerge.writer import INDEX_NAME, PARTIAL_SUFFIX

log = logging.getLogger(__name__)
SCAN_BLOCK_BYTES = 64 * 1000**2


@dataclass
class VerifyResult:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tensors: int = 0
    checksums_verified: int = 0
    bytes_scanned: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "warnings": self.warnings, "tensors": self.tensors,
                "checksums_verified": self.checksums_verified, "bytes_scanned": self.bytes_scanned}


def expected_architecture(config: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Tensor names and shapes the config's architecture has (built on the meta device)."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(**config)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot check", reported as a warning
        log.debug("cannot build the architecture of config.json: %r", e)
        return None
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False) or getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        for name in [n for n in shapes if n.endswith("lm_head.weight")]:
            shapes.pop(name)
    return shapes


def _scan_finite(info: TensorInfo) -> int:
    """Number of NaN/Inf values in a float tensor, read in row blocks."""
    if info.dtype not in ("F64", "F32", "F16", "BF16"):
        return 0
    row_bytes = max(1, info.row_numel * ITEMSIZE[info.dtype])
    step = max(1, SCAN_BLOCK_BYTES // row_bytes)
    bad = 0
    for r0 in range(0, info.rows, step):
        rows = read_rows(info, r0, min(info.rows, r0 + step)).float()
        if not bool(torch.isfinite(rows.sum())):
            bad += int((~torch.isfinite(rows)).sum())
    return bad


def verify_output(out_dir: str | Path, *, weight_map: dict[str, str] | None = None, deep: bool = True,
                  allow_nonfinite: bool = False) -> VerifyResult:
    """Verify a merged checkpoint; ``weight_map`` stands in for the index before it is written."""
    out = Path(out_dir)
    result = VerifyResult()
    if weight_map is None:
        index = out / INDEX_NAME
        if not index.is_file():
            result.problems.append(f"{index}: missing; the merge did not finish (rerun it to resume)")
            return result
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            result.problems.append(f"{index}: not a valid index ({e!r})")
            return result
    assert weight_map is not None
    for p in sorted(out.glob("*" + PARTIAL_SUFFIX)):
        result.problems.append(f"{p}: unfinished temporary file")
    infos: dict[str, TensorInfo] = {}
    for file in sorted(set(weight_map.values())):
        path = out / file
        if not path.is_file():
            result.problems.append(f"{path}: listed in the index but missing")
            continue
        try:
            tensors, _ = parse_safetensors_header(path)
        except CheckpointError as e:
            result.problems.append(str(e))
            continue
        for name in sorted(set(tensors) - {n for n, f in weight_map.items() if f == file}):
            result.problems.append(f"{path}: tensor {name!r} is in the file but not in the index")
        infos.update({n: t for n, t in tensors.items() if weight_map.get(n) == file})
    for name in sorted(set(weight_map) - set(infos)):
        if (out / weight_map[name]).is_file():
            result.problems.append(f"{out / weight_map[name]}: tensor {name!r} is in the index but not in the file")
    result.tensors = len(infos)
    _check_architecture(out, infos, result)
    if deep:
        nonfinite = _check_journal(out, infos, result)
        for name, info in sorted(infos.items()):
            if name not in nonfinite:  # not covered by journaled units: scan on its own
                nonfinite[name] = _scan_finite(info)
                result.bytes_scanned += info.nbytes
        for name, bad in sorted(nonfinite.items()):
            if bad:
                message = f"{infos[name].file}: tensor {name!r} has {bad} NaN/Inf values"
                (result.warnings if allow_nonfinite else result.problems).append(message)
    return result


def _check_architecture(out: Path, infos: dict[str, TensorInfo], result: VerifyResult) -> None:
    config_path = out / "config.json"
    if not config_path.is_file():
        result.problems.append(f"{config_path}: missing")
        return
    config = json.loads(config_path.read_text())
    expected = expected_architecture(config)
    if expected is None:
        result.warnings.append(f"{config_path}: transformers cannot build model_type "
                               f"{config.get('model_type')!r}; tensor names were not checked against it")
        return
    for name, shape in sorted(expected.items()):
        info = infos.get(name)
        if info is None:
            result.problems.append(f"tensor {name!r} of {config.get('model_type')} (shape {list(shape)}) is missing")
        elif info.shape != shape:
            result.problems.append(f"tensor {name!r} has shape {list(info.shape)}, the architecture expects {list(shape)}")
    for name in sorted(set(infos) - set(expected)):
        result.warnings.append(f"tensor {name!r} is not part of the {config.get('model_type')} architecture")
    dtype_name = config.get("dtype") or config.get("torch_dtype")
    want = TORCH_TO_SAFETENSORS.get(getattr(torch, str(dtype_name), None)) if dtype_name else None
    if want:
        for name, info in sorted(infos.items()):
            if info.dtype in ("F64", "F32", "F16", "BF16") and info.dtype != want:
                result.problems.append(f"tensor {name!r} is {info.dtype} but config.json says {dtype_name}")


def _check_journal(out: Path, infos: dict[str, TensorInfo], result: VerifyResult) -> dict[str, int]:
    """Check every journaled unit's CRC, counting NaN/Inf in the same read of its bytes.

    Returns NaN/Inf counts of the tensors whose rows the journal covers completely, so the
    caller scans only the others: the output is read once, not twice.
    """
    journal = read_journal(out / JOURNAL_NAME)
    if journal is None:
        result.warnings.append(f"{out / JOURNAL_NAME}: no journal; checksums not verified")
        return {}
    names = journal.header.get("tensors", [])
    nonfinite: dict[str, int] = {}
    covered: dict[str, int] = {}
    for (t, r0, r1), crc in sorted(journal.units.items()):
        info = infos.get(names[t]) if t < len(names) else None
        if info is None:
            result.problems.append(f"journal unit of tensor #{t} names no tensor of the output")
            continue
        row_bytes = info.row_numel * ITEMSIZE[info.dtype]
        got, bad = _crc_and_nonfinite(info, info.offset + r0 * row_bytes, (r1 - r0) * row_bytes)
        result.bytes_scanned += (r1 - r0) * row_bytes
        nonfinite[info.name] = nonfinite.get(info.name, 0) + bad
        covered[info.name] = covered.get(info.name, 0) + (r1 - r0)
        if got != crc:
            result.problems.append(f"{info.file}: tensor {info.name!r} rows {r0}:{r1} fail their checksum "
                                   "(the file changed or was damaged after the merge)")
        else:
            result.checksums_verified += 1
    return {name: bad for name, bad in nonfinite.items() if covered[name] >= infos[name].rows}


def _crc_and_nonfinite(info: TensorInfo, offset: int, length: int) -> tuple[int | None, int]:
    """CRC-32 of a byte range and the NaN/Inf count of the values in it, from one read."""
    crc, bad, done = 0, 0, 0
    is_float = info.dtype in ("F64", "F32", "F16", "BF16")
    dtype = SAFETENSORS_TO_TORCH[info.dtype]
    with open(info.file, "rb", buffering=0) as f:
        while done < length:
            f.seek(offset + done)
            chunk = f.read(min(CRC_CHUNK, length - done))
            if not chunk:
                return None, bad
            crc = zlib.crc32(chunk, crc)
            if is_float:
                values = torch.frombuffer(bytearray(chunk), dtype=dtype)
                if not bool(torch.isfinite(values.float().sum())):
                    bad += int((~torch.isfinite(values)).sum())
            done += len(chunk)
    return crc, bad

"""``distmerge verify``: is a merged checkpoint complete, consistent and intact?

Checks the index against the files, every safetensors header, every checksum of the output's
own manifest (:mod:`distmerge.output.manifest`) against the bytes on disk, that the manifest
covers every byte of every model file, that the architecture named by ``config.json`` (its sizes
first checked against the tensors) finds every tensor it expects with the right shape and dtype,
and that no tensor holds NaN or Inf. A journal left in the output is compared with the manifest,
never relied on. The merge runs the same checks before it writes the index.

Longer than 300 lines because it holds every check of one report in the order they are made;
the bytes themselves are read through :mod:`distmerge.io`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distmerge.aim.stats_file import SAVED_NAME
from distmerge.dtypes import FLOAT_CODES, TORCH_TO_SAFETENSORS
from distmerge.errors import CheckpointError, DistmergeError, OutputError
from distmerge.io.safetensors import INDEX_NAME, TensorInfo, parse_safetensors_header
from distmerge.io.scan import count_nonfinite_in_tensor, crc_and_nonfinite
from distmerge.io.storage import storage_for
from distmerge.io.structured import read_json
from distmerge.io.writes import PARTIAL_SUFFIX
from distmerge.model_config import check_config_against_tensors
from distmerge.output.architecture import expected_architecture
from distmerge.output.journal import JOURNAL_NAME, read_journal
from distmerge.output.lock import LOCK_NAME
from distmerge.output.manifest import INDEX_KEY, MANIFEST_NAME, load_manifest, sha256_of
from distmerge.output.verify_sample import sampled_ranges

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredOutput:
    """Where an output's model files are read back, and what names it holds.

    For a local output both are its directory; for an object-store output the model files are
    objects (read by ranges) and the listing is the prefix's, while the small files are checked
    in the local folder they were written (or downloaded) to.
    """

    location: str
    weights_at: Callable[[str], Path | str]
    listing: Callable[[], list[str]]


def local_output(out: Path) -> StoredOutput:
    return StoredOutput(str(out), lambda name: out / name, lambda: sorted(os.listdir(out)))


def _stored_size(where: Path | str) -> int | None:
    """The size of a model file, or None when it is missing (or, locally, not a regular file)."""
    if isinstance(where, Path):
        return where.stat().st_size if where.is_file() and not where.is_symlink() else None
    try:
        with storage_for(where).open_reader(where, "an output file", OutputError) as reader:
            return reader.size()
    except DistmergeError:
        return None


@dataclass
class VerifyResult:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tensors: int = 0
    checksums_verified: int = 0
    bytes_scanned: int = 0
    ranges_total: int = 0  # checksummed ranges the manifest holds
    read_back: str = "none"  # how many of them were read back: "all", "sample" or "none"

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "warnings": self.warnings, "tensors": self.tensors,
                "checksums_verified": self.checksums_verified, "checksums_total": self.ranges_total,
                "read_back": self.read_back, "bytes_scanned": self.bytes_scanned}


# Settings of config.json that change no tensor's name or shape (the merge may rewrite them).
def _read_index(out: Path, result: VerifyResult) -> tuple[dict[str, str] | None, str | None]:
    """The index's weight map (names checked to be plain file names) and the manifest hash it records."""
    index = out / INDEX_NAME
    if not index.exists():
        result.problems.append(f"{index}: missing; the merge did not finish (rerun it to resume)")
        return None, None
    try:
        data = read_json(index, "the index", OutputError)
    except OutputError as e:
        result.problems.append(str(e))
        return None, None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and f and "/" not in f and f not in (".", "..") for f in weight_map.values()):
        result.problems.append(f"{index}: not a valid index (weight_map must map tensors to file names in {out})")
        return None, None
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    digest = metadata.get(INDEX_KEY)
    return weight_map, digest if isinstance(digest, str) else None


def verify_output(out_dir: str | Path, *, weight_map: dict[str, str] | None = None,
                  manifest: dict[str, Any] | None = None, deep: bool = True,
                  allow_nonfinite: bool = False, stored: StoredOutput | None = None,
                  sample_every: int | None = None, nonfinite: dict[str, int] | None = None) -> VerifyResult:
    """Verify a merged checkpoint.

    ``weight_map`` and ``manifest`` stand in for the index and the manifest file while the
    merge is finishing (it verifies before it writes them). ``deep=False`` checks the layout
    (index, headers, sizes, header checksums, manifest coverage, architecture) without
    reading tensor data; with ``sample_every`` it also reads back a sample of the checksummed
    ranges (:mod:`~distmerge.output.verify_sample`), and ``nonfinite`` (tensor -> NaN/Inf count,
    as the workers counted them) stands in for the count a full read makes. ``stored`` says
    where the model files are (default: in ``out_dir``).
    """
    out = Path(out_dir)
    result = VerifyResult()
    manifest_digest = None
    if not out.is_dir():
        result.problems.append(f"{out}: {'is not a directory' if out.exists() else 'does not exist'}; "
                               "give the output directory of a merge")
        return result
    if weight_map is None:
        weight_map, manifest_digest = _read_index(out, result)
        if weight_map is None:
            return result
    stored = stored or local_output(out)
    names = stored.listing()
    for name in names:
        if name.endswith(PARTIAL_SUFFIX):
            result.problems.append(f"{stored.weights_at(name)}: unfinished temporary file")
    infos: dict[str, TensorInfo] = {}
    sizes = {file: _stored_size(stored.weights_at(file)) for file in set(weight_map.values())}
    for file in sorted(sizes):
        path = stored.weights_at(file)
        if sizes[file] is None:
            result.problems.append(f"{path}: listed in the index but missing (or not a regular file)")
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
        if sizes[weight_map[name]] is not None:
            result.problems.append(f"{stored.weights_at(weight_map[name])}: tensor {name!r} is in the index but not "
                                   "in the file")
    result.tensors = len(infos)
    _check_architecture(out, infos, result)
    if manifest is None:
        manifest = _load_manifest(out, manifest_digest, result)
    covered = _check_manifest_layout(stored, sizes, manifest, weight_map, infos, result) if manifest is not None else {}
    if manifest is not None:
        _check_other_files(out, manifest, result)
        _check_nothing_added(stored, names, manifest, result)
    result.ranges_total = sum(len(r) for r in covered.values())
    if deep:
        nonfinite = _check_ranges(infos, covered, result)
        for name, info in sorted(infos.items()):
            if name not in nonfinite:  # not covered by the manifest: scan on its own
                nonfinite[name] = count_nonfinite_in_tensor(info)
                result.bytes_scanned += info.nbytes
        result.read_back = "all"
    elif sample_every is not None:
        _check_ranges(infos, sampled_ranges(covered, infos, sample_every), result)
        result.read_back = "sample"
    for name, bad in sorted((nonfinite or {}).items()):
        if bad and name in infos:
            message = f"{infos[name].file}: tensor {name!r} has {bad} NaN/Inf values"
            (result.warnings if allow_nonfinite else result.problems).append(message)
    if deep and manifest is not None:
        _compare_journal(out, infos, covered, result)
    return result


def _load_manifest(out: Path, digest: str | None, result: VerifyResult) -> dict[str, Any] | None:
    path = out / MANIFEST_NAME
    if not path.exists():
        result.problems.append(f"{path}: missing; the output's checksums cannot be verified"
                               + (" (the index says it had one)" if digest else ""))
        return None
    try:
        manifest = load_manifest(path)
    except OutputError as e:
        result.problems.append(str(e))
        return None
    if digest is None:
        result.problems.append(f"{out / INDEX_NAME}: records no manifest checksum; the manifest cannot be trusted")
    elif sha256_of(path) != digest:
        result.problems.append(f"{path}: does not match the checksum the index records (edited or replaced)")
    return manifest


def _check_manifest_layout(stored: StoredOutput, sizes: dict[str, int | None], manifest: dict[str, Any],
                           weight_map: dict[str, str], infos: dict[str, TensorInfo],
                           result: VerifyResult) -> dict[str, list[list[int]]]:
    """Sizes, header checksums and that the manifest's ranges tile every tensor; returns the ranges."""
    files = manifest["files"]
    for name in sorted(set(weight_map.values()) ^ set(files)):
        where = "the index" if name in set(weight_map.values()) else "the manifest"
        result.problems.append(f"{stored.weights_at(name)}: listed only in {where}; the manifest does not describe "
                               "this output")
    covered: dict[str, list[list[int]]] = {}
    for name, entry in sorted(files.items()):
        path = stored.weights_at(name)
        size = sizes.get(name)
        if size is None:
            continue
        if size != entry["size"]:
            result.problems.append(f"{path}: {size} bytes, the manifest says {entry['size']}")
            continue
        got = _crc_of(path, 0, entry["header_bytes"])
        if got != entry["header_crc32"]:
            result.problems.append(f"{path}: its header fails its checksum (the file changed or was replaced)")
        in_file = {n for n, f in weight_map.items() if f == name}
        for tensor in sorted(in_file ^ set(entry["tensors"])):
            result.problems.append(f"{path}: tensor {tensor!r} is not covered by the manifest")
        for tensor, ranges in entry["tensors"].items():
            info = infos.get(tensor)
            if info is None:
                continue
            position = 0
            for r0, r1, _ in sorted(ranges):
                if r0 != position or r1 <= r0:
                    break
                position = r1
            if position != info.rows:
                result.problems.append(f"{path}: the manifest's checksums of tensor {tensor!r} do not cover "
                                       f"its {info.rows} rows")
                continue
            covered[tensor] = sorted(ranges)
    return covered


def _check_other_files(out: Path, manifest: dict[str, Any], result: VerifyResult) -> None:
    for name, digest in sorted(manifest["other_files"].items()):
        path = out / name
        if path.is_symlink():
            result.problems.append(f"{path}: is a symbolic link, not the file the merge wrote")
        elif not path.is_file():
            result.problems.append(f"{path}: listed in the manifest but missing")
        elif sha256_of(path) != digest:
            result.problems.append(f"{path}: fails its checksum (changed after the merge)")


def _check_nothing_added(stored: StoredOutput, names: list[str], manifest: dict[str, Any],
                         result: VerifyResult) -> None:
    """A file the merge did not write (a chat template, a stray shard) changes what loads: a problem."""
    known = {*manifest["files"], *manifest["other_files"], INDEX_NAME, MANIFEST_NAME, JOURNAL_NAME, LOCK_NAME,
             SAVED_NAME}
    for name in sorted(set(names) - known):
        if not name.endswith(PARTIAL_SUFFIX):  # reported as unfinished already
            result.problems.append(f"{stored.weights_at(name)}: not written by the merge (added afterwards?)")


def _check_ranges(infos: dict[str, TensorInfo], covered: dict[str, list[list[int]]],
                  result: VerifyResult) -> dict[str, int]:
    """Check every range's CRC, counting NaN/Inf in the same read: the output is read once."""
    nonfinite: dict[str, int] = {}
    for name, ranges in sorted(covered.items()):
        info = infos[name]
        bad_total = 0
        for r0, r1, crc in ranges:
            offset, length = info.span(r0, r1)
            got, bad = crc_and_nonfinite(info.file, offset, length, info.dtype, "an output file", OutputError)
            result.bytes_scanned += length
            bad_total += bad
            if got != crc:
                result.problems.append(f"{info.file}: tensor {info.name!r} rows {r0}:{r1} fail their checksum "
                                       "(the file changed or was damaged after the merge)")
            else:
                result.checksums_verified += 1
        nonfinite[name] = bad_total
    return nonfinite


def _compare_journal(out: Path, infos: dict[str, TensorInfo], covered: dict[str, list[list[int]]],
                     result: VerifyResult) -> None:
    """The journal, where one is left, must agree with the manifest; it is never relied on."""
    try:
        journal = read_journal(out / JOURNAL_NAME)
    except OutputError as e:
        result.warnings.append(f"{e} (not used: the manifest is what verify trusts)")
        return
    if journal is None:
        return
    names = journal.header.get("tensors", [])
    expected = {(name, r0, r1): crc for name, ranges in covered.items() for r0, r1, crc in ranges}
    seen = 0
    for (t, r0, r1), crc in sorted(journal.units.items()):
        key = (names[t] if t < len(names) else None, r0, r1)
        if key in expected:
            seen += 1
            if expected[key] != crc:
                result.problems.append(f"{out / JOURNAL_NAME}: tensor {key[0]!r} rows {r0}:{r1} has another "
                                       "checksum in the journal than in the manifest")
    if seen < len(expected):
        result.warnings.append(f"{out / JOURNAL_NAME}: covers {seen} of the output's {len(expected)} checksummed "
                               "ranges (edited, or left by another run); not used")


def _crc_of(path: Path | str, offset: int, length: int) -> int | None:
    return storage_for(path).crc32(path, offset, length, "an output file", OutputError)


def _check_architecture(out: Path, infos: dict[str, TensorInfo], result: VerifyResult) -> None:
    config_path = out / "config.json"
    if not os.path.lexists(config_path):
        result.problems.append(f"{config_path}: missing")
        return
    try:
        config = read_json(config_path, "config.json", CheckpointError)
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object of settings")
        check_config_against_tensors(config, infos, config_path)
    except CheckpointError as e:
        result.problems.append(str(e))
        return
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
    named = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    want = TORCH_TO_SAFETENSORS.get(named) if isinstance(named, torch.dtype) else None
    if dtype_name and not isinstance(named, torch.dtype):
        result.problems.append(f"{config_path}: dtype {dtype_name!r} is not a dtype transformers can load")
    if want:
        for name, info in sorted(infos.items()):
            if info.dtype in FLOAT_CODES and info.dtype != want:
                result.problems.append(f"tensor {name!r} is {info.dtype} but config.json says {dtype_name}")

"""Reading calibration datasets into a pyarrow Table, offline, in the formats people have.

Accepted: Parquet (``.parquet``), Arrow IPC files or streams (``.arrow``, ``.feather``,
``.ipc``), folders written by ``datasets``' ``save_to_disk`` (``data-*.arrow`` Arrow *streams*
plus ``state.json``/``dataset_info.json``; a ``DatasetDict`` folder uses its ``train`` split),
JSON lines (``.jsonl``, ``.json``: one object per line, or a JSON array of objects), CSV, plain
text (``.txt``: documents separated by blank lines), a folder of any of these, and ``builtin``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pyarrow as pa

from distmerge.errors import ConfigError
from distmerge.io.files import check_inside, require_regular
from distmerge.io.locations import is_remote
from distmerge.io.remote_files import fetch_file
from distmerge.io.structured import parse_json, read_json

log = logging.getLogger(__name__)

FIELD = "aim.calibration.dataset"
MAX_REMOTE_DATASET_BYTES = 16 << 30
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
FILE_SUFFIXES = (".parquet", *ARROW_SUFFIXES, ".jsonl", ".json", ".csv", ".txt")
FORMATS = "parquet, arrow, a datasets save_to_disk folder, jsonl, csv, txt, or 'builtin'"


def read_dataset(dataset: str, text_field: str = "text") -> pa.Table:
    """The dataset named by ``aim.calibration.dataset`` as a table.

    ``text_field`` names the column a ``.txt`` file's documents go into.
    """
    if dataset == "builtin":
        from distmerge.aim.builtin import builtin_table

        return builtin_table()
    if is_remote(dataset):  # one file in S3 or a Hub repository, fetched whole once
        return read_file(fetch_file(dataset, FIELD, ConfigError, MAX_REMOTE_DATASET_BYTES).path, text_field)
    path = Path(dataset).expanduser()
    if not path.exists():
        raise ConfigError(
            f"{FIELD}: {dataset!r} does not exist; give a local file or folder ({FORMATS}), or one file at "
            "s3:// or gs://bucket/key or hf://org/name/path. Hub dataset names are not fetched: save the data first"
        )
    if path.is_dir():
        return _read_folder(path, text_field)
    return read_file(path, text_field)


def read_file(path: Path, text_field: str = "text") -> pa.Table:
    """One data file, by its suffix (a FIFO, device or socket is refused before it is opened)."""
    suffix = path.suffix.lower()
    require_regular(path, "calibration data file", ConfigError)
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix in ARROW_SUFFIXES:
            return read_arrow(path)
        if suffix in (".jsonl", ".json"):
            return _read_json(path)
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path)
        if suffix == ".txt":
            return read_text(path, text_field)
    except (pa.ArrowException, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{FIELD}: cannot read {path} as {suffix[1:]} ({e})") from e
    raise ConfigError(f"{FIELD}: {path} has an unknown format {suffix!r}; accepted: {FORMATS}")


def read_arrow(path: Path) -> pa.Table:
    """An Arrow IPC file (random-access format) or stream (what ``datasets`` writes)."""
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


def read_text(path: Path, text_field: str = "text") -> pa.Table:
    """A plain text file: documents separated by one or more blank lines."""
    text = path.read_text(encoding="utf-8")
    docs = [d.strip() for d in re.split(r"\n[ \t\r\f\v]*\n", text)]
    return pa.table({text_field: [d for d in docs if d]})


def _read_json(path: Path) -> pa.Table:
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        rows = parse_json(path.read_bytes(), str(path), ConfigError, max_depth=None)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ConfigError(f"{FIELD}: {path}: a JSON array must hold objects (one per sample)")
        return pa.Table.from_pylist(rows)
    import pyarrow.json as pjson

    return pjson.read_json(path)


def _read_folder(path: Path, text_field: str) -> pa.Table:
    dict_file = path / "dataset_dict.json"
    if dict_file.is_file():
        splits = read_json(dict_file, "the dataset dict file", ConfigError, limit=1 << 20)
        splits = (splits.get("splits") if isinstance(splits, dict) else None) or []
        if not splits:
            raise ConfigError(f"{FIELD}: {dict_file} lists no splits")
        split = "train" if "train" in splits else splits[0]
        if not isinstance(split, str) or Path(split).name != split or split in (".", ".."):
            raise ConfigError(f"{FIELD}: {dict_file} names split {str(split)[:40]!r}, not a folder name")
        log.info("calibration data: using split %r of %s (splits: %s)", split, path, ", ".join(splits))
        return _read_folder(path / split, text_field)
    state = path / "state.json"
    arrow_files = sorted(path.glob("data-*.arrow"))
    if state.is_file():
        try:
            names = [entry["filename"] for entry in read_json(state, "the state file", ConfigError,
                                                              limit=16 << 20)["_data_files"]]
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{FIELD}: {state} is not a datasets state file ({e!r})") from e
        arrow_files = [check_inside(path / str(n), path, "a data file of the state file", ConfigError,
                                    "dataset folder") for n in names]
        missing = [str(f) for f in arrow_files if not f.is_file()]
        if missing:
            raise ConfigError(f"{FIELD}: {state} lists missing files: {', '.join(missing)}")
    if arrow_files:
        for f in arrow_files:
            inside = check_inside(f, path, "calibration data file", ConfigError, "dataset folder")
            require_regular(inside, "calibration data file", ConfigError)
        return _concat([_read(read_arrow, f) for f in arrow_files], path)
    files = sorted(check_inside(f, path, "calibration data file", ConfigError, "dataset folder")
                   for f in path.iterdir() if f.suffix.lower() in FILE_SUFFIXES and not f.is_dir())
    if not files:
        raise ConfigError(f"{FIELD}: folder {path} holds no data files ({FORMATS})")
    return _concat([read_file(f, text_field) for f in files], path)


def _read(reader, path: Path) -> pa.Table:  # type: ignore[no-untyped-def]
    try:
        return reader(path)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{FIELD}: cannot read {path} ({e})") from e


def _concat(tables: list[pa.Table], where: Path) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as e:
        raise ConfigError(f"{FIELD}: the files in {where} have incompatible columns ({e})") from e

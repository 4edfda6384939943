"""The ``builtin`` calibration set shipped with distmerge, so calibration works offline.

English prose from CPython standard-library docstrings (PSF license); see
``distmerge/data/README.md`` for its source and :mod:`distmerge.aim.make_builtin` for how it was
made. One JSON object per line with a ``text`` field.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

BUILTIN_PATH = Path(__file__).resolve().parent.parent / "data" / "calibration_builtin.jsonl"


def builtin_table() -> pa.Table:
    """The builtin set as a table with a ``text`` column."""
    import pyarrow.json as pjson

    if not BUILTIN_PATH.is_file():
        raise FileNotFoundError(f"the builtin calibration set {BUILTIN_PATH} is missing from the installation")
    return pjson.read_json(BUILTIN_PATH)

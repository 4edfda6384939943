"""An output is never an input, never inside one and never around one.

Why: ``distmerge merge cfg.yml /models --overwrite``, with the models under ``/models``, once
deleted the inputs. Every path the run reads (the models, the tokenizer source, AIM
statistics, calibration data, the config file) is compared with OUT before OUT is touched,
by real path (links resolved) and by device and inode of every ancestor (so bind mounts and
other aliases of the same folder are caught too). This holds with or without ``--overwrite``:
an output written inside an input folder would mix the run's files with a model's.
"""

from __future__ import annotations

import os
from pathlib import Path

from distmerge.errors import OutputError


def _identities(path: Path) -> dict[tuple[int, int], Path]:
    """(device, inode) of ``path`` and of each existing ancestor."""
    found: dict[tuple[int, int], Path] = {}
    for p in (path, *path.parents):
        try:
            st = os.stat(p)
        except OSError:
            continue
        found.setdefault((st.st_dev, st.st_ino), p)
    return found


def check_output_location(out: Path, inputs: dict[str, Path | str], what: str = "the output directory",
                          advice: str = "writing (or --overwrite) there could destroy an input. Choose an "
                                        "OUT_DIR outside every input") -> None:
    """Refuse ``out`` when it is, is inside, or contains any of ``inputs`` (role -> path; the
    URLs of remote inputs, given as text, cannot be a local OUT and are passed over).

    ``what`` names ``out`` in the message and ``advice`` says why and what to do instead: for a
    merge's OUT_DIR by default, or for a file a command writes (``calibrate --out``, ``--plot``)."""
    out_real = Path(os.path.realpath(out))
    out_ids = _identities(out_real)
    try:
        st = os.stat(out_real)
        out_id: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        out_id = None
    for role, path in inputs.items():
        if not isinstance(path, Path):
            continue
        real = Path(os.path.realpath(path))
        try:
            st = os.stat(real)
        except OSError:
            continue  # a path that does not exist is not data the output could destroy
        input_id = (st.st_dev, st.st_ino)
        relation = None
        if real == out_real or input_id == out_id:
            relation = "is"
        elif out_real.is_relative_to(real) or input_id in out_ids:
            relation = "is inside"
        elif real.is_relative_to(out_real) or (out_id is not None and out_id in _identities(real)):
            relation = "contains"
        if relation:
            raise OutputError(
                f"{out}: {what} {relation} {role} {path}; refused, since {advice}"
            )

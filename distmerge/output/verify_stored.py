"""``distmerge verify OUT`` wherever OUT is: a local directory, or an object-store prefix.

Why a module of its own: verifying an object-store output reads its model files by ranges where
they are (never downloading one whole) and its small files (index, manifest, config, tokenizer)
from a temporary folder they are copied to, then runs the same checks as for a local directory;
messages name the output's URL, never the temporary folder.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from distmerge.io.locations import url_scheme
from distmerge.io.object_stores import object_store
from distmerge.output.target import output_target
from distmerge.output.verify import StoredOutput, VerifyResult, verify_output

MAX_SMALL_FILE = 1 << 30


def verify_location(location: str, *, deep: bool = True) -> VerifyResult:
    """Verify the merged checkpoint at ``location`` (a directory, ``s3://`` or ``gs://bucket/prefix``)."""
    if url_scheme(location) is None:
        return verify_output(Path(location), deep=deep)
    target = output_target(location)
    names = target.listing()
    result = VerifyResult()
    if not names:
        result.problems.append(f"{target.location}: holds no objects; give the output location of a merge")
        return result
    with tempfile.TemporaryDirectory(prefix="distmerge-verify-") as folder:
        for name in names:
            if not name.endswith(".safetensors"):
                got = object_store(target.location).get_object(target.weights_at(name), f"{name} of the output")  # type: ignore[arg-type]
                if got is not None and len(got.data) <= MAX_SMALL_FILE:
                    (Path(folder) / name).write_bytes(got.data)
        stored = StoredOutput(target.location, target.weights_at, lambda: names)
        result = verify_output(Path(folder), deep=deep, stored=stored)
        for messages in (result.problems, result.warnings):
            messages[:] = [m.replace(folder, target.location) for m in messages]
    return result


"""distmerge's numba decorators, and the guard that keeps numba's on-disk cache honest.

Why: numba keys a cached kernel on its own source file only. distmerge's kernels compile in
helpers from other files (``rounding``'s rounding and widening, ``philox``'s draws,
``stack_order``'s sum orders ...). So an update that changes a helper but not the file of a
kernel that uses it (a ``git pull`` in a clone, a partial copy) leaves numba loading the old
machine code: merges would compute with the old helper and nothing would say so.

Before anything compiles or loads, :func:`drop_stale_cache` fingerprints every distmerge file
that holds compiled code (:data:`COMPILED_SOURCES`). It compares the fingerprint with the one
recorded in each folder where numba may keep their cache. Where they differ, it removes that
folder's numba cache files (``*.nbi``, ``*.nbc``; the kernels compile again on first use, about
a minute) and records the new fingerprint. It runs once per process, on import of this
module, which every compiled module imports for its decorators.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import cache
from pathlib import Path

import numba
from numba.core import caching

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent
# distmerge's files (or folders of them) that hold numba-compiled code, relative to the package.
COMPILED_SOURCES = ("aim/relax_kernel.py", "lora/rows.py", "methods/philox.py", "methods/random_stream.py",
                    "methods/kernels")
STAMP = "distmerge-numba.stamp"

jit = numba.njit(cache=True, nogil=True)
inline = numba.njit(cache=True, nogil=True, inline="always")


def compiled_files() -> list[Path]:
    """The source files of :data:`COMPILED_SOURCES`, sorted."""
    files: list[Path] = []
    for entry in COMPILED_SOURCES:
        path = PACKAGE / entry
        files += sorted(path.glob("*.py")) if path.is_dir() else [path]
    return sorted(files)


def fingerprint(files: list[Path], root: Path = PACKAGE) -> str:
    """sha256 over the files' names relative to ``root`` and their contents."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def _a_function() -> None:
    """Stands in for a kernel when asking numba's locators where a file's cache goes."""


def cache_dirs(files: list[Path]) -> set[Path]:
    """The folders where numba may keep these files' cache: under ``NUMBA_CACHE_DIR`` when set,
    the ``__pycache__`` beside the file, and numba's user-wide cache."""
    dirs = {f.parent / "__pycache__" for f in files}
    locators = [caching.UserWideCacheLocator] + ([caching.UserProvidedCacheLocator] if numba.config.CACHE_DIR else [])
    for locator in locators:
        for f in files:
            try:
                dirs.add(Path(locator(_a_function, str(f)).get_cache_path()))
            except Exception as e:  # noqa: BLE001 - another numba's internals: keep the folders known so far
                log.debug("numba cache folder of %s by %s not found: %s", f, locator.__name__, e)
    return dirs


def used_cache_dirs(files: list[Path]) -> set[Path]:
    """The folder numba will cache each file's kernels in, created now.

    Why created: numba makes its cache folder on the first compile, after this guard ran. A
    folder without a stamp is cleared as untrusted, so the next process would throw away the
    kernels the first one had just compiled, and compile them all again. That happened under
    ``NUMBA_CACHE_DIR`` and wherever the package's own ``__pycache__`` is not writable (numba's
    user-wide cache). numba's own locators choose the folder, in numba's order, and create it."""
    used: set[Path] = set()
    locators = (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator, caching.UserWideCacheLocator)
    for f in files:
        for locator in locators:
            try:
                found = locator.from_function(_a_function, str(f))
            except Exception as e:  # noqa: BLE001 - another numba's internals: try the next locator
                log.debug("numba cache folder of %s by %s not found: %s", f, locator.__name__, e)
                continue
            if found is not None:
                used.add(Path(found.get_cache_path()))
                break
    return used


def drop_stale(dirs: set[Path], stamp: str) -> list[Path]:
    """Remove the numba cache files of each existing folder in ``dirs`` whose recorded
    fingerprint is not ``stamp``, and record ``stamp`` there; returns the folders cleared."""
    cleared = []
    for folder in sorted(dirs):
        record = folder / STAMP
        try:
            if not folder.is_dir() or (record.is_file() and record.read_text() == stamp):
                continue
            stale = [p for p in folder.iterdir() if p.suffix in (".nbi", ".nbc")]
            for p in stale:
                p.unlink(missing_ok=True)
            partial = folder / f".{STAMP}.{os.getpid()}"
            partial.write_text(stamp)
            partial.replace(record)
            if stale:
                cleared.append(folder)
        except OSError as e:  # a folder this process cannot write: numba cannot cache there either
            log.debug("numba cache folder %s left as it is: %s", folder, e)
    return cleared


@cache
def drop_stale_cache() -> None:
    """:func:`drop_stale` for distmerge's compiled files, once per process."""
    files = compiled_files()
    cleared = drop_stale(cache_dirs(files) | used_cache_dirs(files), fingerprint(files))
    if cleared:
        log.info("distmerge's kernels changed since they were cached: they compile again on first use (%s)",
                 ", ".join(str(c) for c in cleared))


drop_stale_cache()

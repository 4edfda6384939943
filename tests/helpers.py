"""Independent helpers for tests: read checkpoints with the safetensors library itself."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.io_baseline import evict as evict_files
from distmerge.config import MergeConfig, parse_config


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF folder, read with safetensors (not with distmerge's reader)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        p.name for p in folder.glob("*.safetensors")]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    return state


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every safetensors file's bytes, for bit-identity checks."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("model-*.safetensors"))}


def make_config(method: str, base: Path | None, experts: list[Path], weights: list, **extra) -> MergeConfig:
    data = {
        "merge_method": method,
        "models": [{"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, weights, strict=True)],
        **extra,
    }
    if base is not None:
        data["base_model"] = str(base)
    return parse_config(data)


# ---- observing what a process reads (for "reads no tensor data" tests) ----------------------

PAGE = os.sysconf("SC_PAGE_SIZE")
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_chars() -> int:
    """Bytes this process has read through read()/pread() so far (``rchar`` of /proc/self/io).

    Counts every read syscall, whatever the file; a reader through mmap does not show up here,
    which is why :func:`resident_bytes` exists too.
    """
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no rchar line")


def safetensors_header(path: Path) -> tuple[int, dict]:
    """``(data start, header entries)`` of a safetensors file, parsed here (not by distmerge)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def header_fetch(f: Path) -> int:
    """Bytes distmerge's planner fetches of a remote weight file: its first 64 KiB (or all of a
    smaller file), and the rest of the header when that is longer."""
    from distmerge.io.remote import HEAD_BYTES

    return max(min(HEAD_BYTES, f.stat().st_size), safetensors_header(f)[0])


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (written back first: dirty pages are not dropped)."""
    evict_files([path])


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_bytes(path: Path, start: int = 0, end: int | None = None) -> int:
    """Bytes of the pages overlapping ``[start, end)`` of a file that are in the page cache.

    mincore(2) on a mapping that is never touched: it reports the page cache, so it sees a
    reader that went through mmap (safetensors' safe_open) as well as one that used read().
    """
    size = path.stat().st_size
    end = size if end is None else end
    if size == 0 or end <= start:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
    finally:
        os.close(fd)
    try:
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
    finally:
        _libc.munmap(addr, size)
    return sum(PAGE for p in range(start // PAGE, (end + PAGE - 1) // PAGE) if vec[p] & 1)

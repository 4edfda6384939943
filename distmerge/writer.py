"""Writing the merged checkpoint: preallocated safetensors files, row writes at offsets, finalize.

Each output file's header is computed ahead from names, shapes and dtypes (see
:func:`distmerge.plan.layout_files`), so the file is created once at its final size under a
temporary name (``*.partial``) and any worker can write any tensor's rows at their byte offset
without holding the whole tensor. Space is reserved up front with ``posix_fallocate``, so a full
disk is reported before hours of work, not after. A file is fsynced and renamed when all its
rows are written; ``model.safetensors.index.json`` is written last, so a checkpoint without an
index is visibly unfinished.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from distmerge.errors import OutputError
from distmerge.io.files import is_within, model_roots, read_limited

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_COPY_NAME = "distmerge_config.yml"  # the resolved merge config, kept beside the output
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "vocab.txt", "spiece.model",
)
# The files that make a tokenizer loadable on their own (special_tokens_map.json does not).
TOKENIZER_CORE_FILES = tuple(n for n in TOKENIZER_FILES if n.startswith(("tokenizer", "vocab", "spiece")))
SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")
MAX_SIDE_FILE_BYTES = 1 << 30


def _os_error(e: OSError, path: Path | str, action: str) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"{path}: no space left on the device while {action}; free space or choose another OUT_DIR")
    if e.errno == errno.ENXIO:
        return OutputError(f"{path}: is a FIFO or socket, not a file distmerge wrote; refused (remove it)")
    if e.errno == errno.ELOOP:
        return OutputError(f"{path}: is a symbolic link; refused (distmerge writes only its own files in OUT_DIR)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{path}: permission denied while {action} ({e.strerror}); choose a writable OUT_DIR")
    return OutputError(f"{path}: {e.strerror or e} while {action}")


def partial_path(out_dir: Path, name: str) -> Path:
    return out_dir / (name + PARTIAL_SUFFIX)


def create_file(path: Path, header: bytes, size: int) -> None:
    """Create ``path`` at its full size with its header written and the space reserved."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise _os_error(e, path, "creating the output file") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{path}: is not a regular file (planted in OUT_DIR?); refused: remove it and rerun")
    try:
        os.ftruncate(fd, 0)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                os.ftruncate(fd, size)
            else:
                raise
        os.pwrite(fd, header, 0)
    except OSError as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise _os_error(e, path, f"reserving {size} bytes") from e
    os.close(fd)


def write_at(path: Path, offset: int, tensor: torch.Tensor) -> int:
    """Write a contiguous tensor's bytes at ``offset`` of an existing file; returns bytes written."""
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    view = memoryview(data)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _os_error(e, path, "opening for writing") from e
    try:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
        start_writeback(fd, offset, len(view))
    except OSError as e:
        raise _os_error(e, path, f"writing at offset {offset + done}") from e
    finally:
        os.close(fd)
    return len(view)


def _libc_sync_file_range() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return fn
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _libc_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these pages now (Linux), without waiting for it.

    Otherwise dirty pages pile up until the final fsync, which then stalls for the whole file.
    """
    if _SYNC_FILE_RANGE is not None and length:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (which makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finalize_file(out_dir: Path, name: str) -> None:
    """fsync a completed ``*.partial`` file and give it its final name."""
    tmp = partial_path(out_dir, name)
    fsync_path(tmp)
    os.replace(tmp, out_dir / name)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file under a temporary name, fsync it, then rename it into place."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a small file under a temporary name, fsync it, then rename it into place.

    The temporary name is created exclusively and never through a link, so a link planted
    at ``NAME.partial`` in a shared output directory cannot redirect the write elsewhere.
    """
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        tmp.unlink(missing_ok=True)  # removes a planted link itself, never its target
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise _os_error(e, path, "writing") from e


def write_index(out_dir: Path, files: Iterable[tuple[str, tuple[str, ...], int]], total_size: int,
                metadata: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors.index.json`` (last: it marks the checkpoint complete)."""
    weight_map = {t: name for name, tensors, _ in files for t in tensors}
    index = {"metadata": {"total_size": total_size, **(metadata or {})}, "weight_map": dict(sorted(weight_map.items()))}
    write_text_atomic(out_dir / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    fsync_path(out_dir)


def write_model_config(out_dir: Path, config: dict, out_dtype_name: str | None) -> None:
    """config.json of the template with the output dtype recorded."""
    config = dict(config)
    if out_dtype_name:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = out_dtype_name
    write_text_atomic(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(source: Path, out_dir: Path, record: Callable[[str], None]) -> tuple[list[str], list[str]]:
    """Copy tokenizer and generation files from the model folder ``source``.

    Only regular files are copied, and only when they really live in the model folder (or
    its Hugging Face cache blob store): a ``tokenizer.json`` that links to ``/etc/passwd`` is
    skipped, not copied, and so is a FIFO or device. ``record(name)`` is called before each
    file is created (the journal's write-ahead record of what this run owns). Returns the
    names copied and the reasons for those skipped (also logged).
    """
    copied, skipped = [], []
    roots = model_roots(source)
    for name in SIDE_FILES:
        src = source / name
        if not os.path.lexists(src):
            continue
        real = src.resolve()
        if not is_within(real, roots):
            skipped.append(f"{name}: a link to a location outside {source}")
            continue
        try:
            data = read_limited(real, name, MAX_SIDE_FILE_BYTES, OutputError)
        except OutputError as e:
            skipped.append(f"{name}: {str(e).split(': ', 1)[-1]}")
            continue
        record(name)
        write_bytes_atomic(out_dir / name, data)
        copied.append(name)
    for reason in skipped:
        log.warning("tokenizer_source: skipped %s", reason)
    if not any(n in TOKENIZER_CORE_FILES for n in copied):
        log.warning("tokenizer_source %s has no tokenizer files; the output has none either", source)
    return copied, skipped

"""Local files as a :class:`~distmerge.io.storage.Storage`: pread/pwrite at offsets, nothing mapped.

Reads open each file with :func:`~distmerge.io.files.open_regular` (regular files only, so a
FIFO or device cannot make a reader hang) and fill the caller's buffer with ``preadv``: the
rows of a tensor land in their final tensor's memory without an intermediate copy. Writes open
with ``O_NOFOLLOW`` (a link planted in OUT is refused, never followed), reserve space up front
with ``posix_fallocate`` (a full disk is reported before hours of work) and ask the kernel to
start writeback of each span at once (otherwise the final fsync stalls for the whole file).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Callable
from typing import Any

from distmerge.errors import DistmergeError, OutputError
from distmerge.io.checksums import crc32
from distmerge.io.files import open_regular, pread_all

# How much a checksum or scan reads at once: large enough that syscalls cost nothing, small
# enough that verifying a 100 GB shard holds only this much.
CHUNK_BYTES = 16 * 1024 * 1024
_WRITE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _os_error(e: OSError, path: object, action: str) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"{path}: no space left on the device while {action}; free space or choose another OUT_DIR")
    if e.errno == errno.ENXIO:
        return OutputError(f"{path}: is a FIFO or socket, not a file distmerge wrote; refused (remove it)")
    if e.errno == errno.ELOOP:
        return OutputError(f"{path}: is a symbolic link; refused (distmerge writes only its own files in OUT_DIR)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{path}: permission denied while {action} ({e.strerror}); choose a writable OUT_DIR")
    return OutputError(f"{path}: {e.strerror or e} while {action}")


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


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file, or a directory (which makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalReader:
    """One open regular file; every read names its offset, so readers share nothing."""

    __slots__ = ("_fd", "location")

    def __init__(self, location: str, fd: int) -> None:
        self.location = location
        self._fd = fd

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def read_into(self, offset: int, buffer: memoryview) -> int:
        """Fill ``buffer`` from ``offset``; returns the bytes filled (fewer only at end of file)."""
        view = buffer if buffer.format == "B" and buffer.ndim == 1 else buffer.cast("B")
        done, length = 0, len(view)
        while done < length:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                break
            done += got
        return done

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer only at end of file)."""
        return pread_all(self._fd, length, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LocalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalStorage:
    """The local file system (and anything mounted into it: NFS, Lustre, a FUSE bucket)."""

    def open_reader(self, location: str | os.PathLike[str], what: str,
                    error: type[DistmergeError] = DistmergeError) -> LocalReader:
        return LocalReader(os.fspath(location), open_regular(location, what, error))

    def crc32(self, location: str | os.PathLike[str], offset: int, length: int, what: str,
              error: type[DistmergeError] = DistmergeError,
              on_chunk: Callable[[memoryview], None] | None = None) -> int | None:
        if length < 0:
            return None
        with self.open_reader(location, what, error) as reader:
            return span_crc32(reader, offset, length, on_chunk)

    def create(self, location: str | os.PathLike[str], header: bytes, size: int) -> None:
        try:
            fd = os.open(location, os.O_CREAT | _WRITE_FLAGS, 0o644)
        except OSError as e:
            raise _os_error(e, location, "creating the output file") from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError(f"{location}: is not a regular file (planted in OUT_DIR?); refused: remove it and rerun")
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
            with contextlib.suppress(FileNotFoundError):
                os.unlink(location)
            raise _os_error(e, location, f"reserving {size} bytes") from e
        os.close(fd)

    def write_at(self, location: str | os.PathLike[str], offset: int, data: memoryview) -> int:
        try:
            fd = os.open(location, _WRITE_FLAGS)
        except OSError as e:
            raise _os_error(e, location, "opening for writing") from e
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
            start_writeback(fd, offset, len(data))
        except OSError as e:
            raise _os_error(e, location, f"writing at offset {offset + done}") from e
        finally:
            os.close(fd)
        return len(data)

    def publish(self, partial: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
        fsync_path(partial)
        os.replace(partial, final)

    def put(self, location: str | os.PathLike[str], data: bytes, temporary: str | os.PathLike[str]) -> None:
        # The temporary name is created exclusively and never through a link, so a link planted
        # at it in a shared output directory cannot redirect the write elsewhere.
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)  # removes a planted link itself, never its target
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, location)
        except OSError as e:
            raise _os_error(e, location, "writing") from e

    def sync_folder(self, location: str | os.PathLike[str]) -> None:
        fsync_path(location)


LOCAL = LocalStorage()


def span_crc32(reader: Any, offset: int, length: int, on_chunk: Callable[[memoryview], None] | None = None,
               chunk_bytes: int | None = None) -> int | None:
    """CRC-32 of ``length`` bytes at ``offset`` of an opened span reader (any storage's), read in
    ``chunk_bytes`` chunks (default :data:`CHUNK_BYTES`; a remote store: one request each); None when
    the location holds fewer."""
    buffer = memoryview(bytearray(min(chunk_bytes or CHUNK_BYTES, max(length, 1))))
    crc, done = 0, 0
    while done < length:
        want = min(len(buffer), length - done)
        got = reader.read_into(offset + done, buffer[:want])
        if got:
            chunk = buffer[:got]
            crc = crc32(chunk, crc)
            if on_chunk is not None:
                on_chunk(chunk)
        if got < want:
            return None
        done += got
    return crc

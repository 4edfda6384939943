"""Opening input files safely: regular files only, inside the folders the config names.

Why: a FIFO as a shard or dataset blocks ``open`` forever, a device file never ends, and a
link from a model folder to ``/etc/passwd`` or ``~/.ssh`` would otherwise be read (and its
content copied into the output or echoed in an error). Every check here happens before the
first byte is read, and no error message prints content of a file it refused.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from distmerge.errors import DistmergeError

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
}


def file_kind(mode: int) -> str:
    """What a stat mode is, in words, for messages."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_regular(path: str | os.PathLike[str], what: str,
                 error: type[DistmergeError] = DistmergeError) -> int:
    """Open ``path`` read-only and return the descriptor, refusing anything but a regular file.

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer, and the
    type is checked on the opened descriptor (not on the path), so swapping the file for a FIFO
    between a check and the open cannot make a reader hang.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{path}: {what} does not exist (removed or renamed while in use?)") from None
    except PermissionError as e:
        raise error(f"{path}: permission denied reading {what} ({e.strerror})") from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket, or a FIFO opened for writing elsewhere
            raise error(f"{path}: {what} is not a regular file (a socket or special file); refused") from None
        raise error(f"{path}: cannot open {what} ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path}: {what} is {file_kind(mode)}, not a regular file; refused "
                    "(distmerge reads only regular files, so a pipe or device cannot make it hang)")
    return fd


def require_regular(path: str | os.PathLike[str], what: str,
                    error: type[DistmergeError] = DistmergeError) -> None:
    """Refuse ``path`` unless it is a regular file (for libraries that open paths themselves)."""
    os.close(open_regular(path, what, error))


def read_limited(path: str | os.PathLike[str], what: str, limit: int,
                 error: type[DistmergeError] = DistmergeError) -> bytes:
    """The whole of a small regular file, refusing one larger than ``limit`` bytes."""
    fd = open_regular(path, what, error)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"{path}: {what} is {size} bytes, more than the {limit} this kind of file "
                        "may have; refused (is it the right file?)")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise error(f"{path}: {what} grew past {limit} bytes while being read; refused")
        return b"".join(chunks)
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    finally:
        os.close(fd)


def model_roots(folder: str | os.PathLike[str]) -> tuple[Path, ...]:
    """Where the files of a model folder may really live: the folder itself, and for a
    Hugging Face cache snapshot (``.../snapshots/<rev>/``, whose files are links into
    ``../../blobs/``) that repository's blob store."""
    folder = Path(folder).absolute()
    roots = [folder.resolve()]
    for candidate in (folder, folder.resolve()):
        if candidate.parent.name == "snapshots":
            blobs = candidate.parent.parent / "blobs"
            if blobs.is_dir():
                roots.append(blobs.resolve())
    return tuple(dict.fromkeys(roots))


def is_within(path: Path, roots: Iterable[Path]) -> bool:
    """True when ``path`` (already resolved) is one of ``roots`` or below one."""
    return any(path == r or path.is_relative_to(r) for r in roots)


def check_inside(path: Path, folder: Path, what: str, error: type[DistmergeError] = DistmergeError,
                 folder_kind: str = "model folder") -> Path:
    """The real location of ``path``, refusing it when links take it out of the model folder.

    Returns the resolved path, which is what the caller should open.
    """
    real = path.resolve()
    if not is_within(real, model_roots(folder)):
        how = "is a symbolic link" if path.is_symlink() else "resolves through a symbolic link"
        raise error(f"{path}: {what} {how} to a location outside the {folder_kind} {folder}; refused "
                    "(distmerge reads only inside the folders the config names: copy the file in)")
    return real


def pread_all(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset`` (fewer only at end of file), in as many reads as it takes."""
    chunks, done = [], 0
    while done < length:
        chunk = os.pread(fd, length - done, offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)

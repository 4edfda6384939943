"""One merge per output directory: an exclusive lock held for the whole run.

Why: two merges started into the same OUT (a cron schedule overlapping a manual run) used to
interleave their journals and rename each other's files. Now the second one stops at once
with a message naming the holder.

How, and what is guaranteed:

- The lock is ``OUT/.distmerge.lock``, locked with a POSIX record lock (``fcntl.lockf``).
  The kernel releases it when the holder exits in any way (crash, ``kill -9``, OOM), so a
  dead process never leaves a stale lock on a local filesystem. On NFS (v4, or v3 with NLM)
  the server holds the lock for the client host; if that host disappears, the server
  releases it when the host's lease expires (NFSv4: the lease time, 90 s by default) or when
  it reboots (NFSv3 statd). While the lease lasts, the output stays locked: waiting is the
  safe side.
- Filesystems without POSIX locks (some FUSE and object-store mounts answer ENOLCK or
  EOPNOTSUPP) fall back to an exclusive-create lock file with a heartbeat rewritten every
  ``HEARTBEAT_S`` seconds. Such a lock is stale when its holder is a dead process on this
  host, or when its heartbeat is older than ``STALE_AFTER_S`` (another host that is gone).
  Breaking a stale lock renames it away (only one contender can), and every holder checks
  at each heartbeat and before it finishes that the lock file still carries its own nonce:
  a run that lost its lock stops instead of writing on.
- The lock file holds who has it (host, pid, start time, last heartbeat), so the refusal
  says whom to look for. It is removed on release; the lock's own protocol (re-checking
  that the path still names the locked file) makes removal safe against a waiting run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from distmerge.errors import OutputError

log = logging.getLogger(__name__)

LOCK_NAME = ".distmerge.lock"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0
_NO_POSIX_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
# Lock files this process holds: a second OutputLock of the same path in this process must
# fail without opening the file (closing any descriptor of it would drop our POSIX lock).
_HELD: set[str] = set()
_HELD_GUARD = threading.Lock()


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_holder(info: dict[str, Any]) -> str:
    """'pid 123 on host h, started 12:00:00, last heartbeat 3 s ago' from a lock file's content."""
    if not info:
        return "another distmerge run"
    parts = [f"pid {info.get('pid')} on host {info.get('host')}"]
    if isinstance(info.get("started"), (int, float)):
        parts.append("started " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])))
    if isinstance(info.get("heartbeat"), (int, float)):
        parts.append(f"last heartbeat {max(0, time.time() - info['heartbeat']):.0f} s ago")
    return ", ".join(parts)


def read_holder(path: Path) -> dict[str, Any]:
    """The lock file's content, or {} when it is missing, empty or not ours."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        data = json.loads(os.read(fd, 4096) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)


class OutputLock:
    """Exclusive lock of an output directory; use as a context manager around the whole run."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.nonce = uuid.uuid4().hex
        self.posix = True
        self._fd: int | None = None
        self._info = {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": boot_id(),
                      "nonce": self.nonce, "started": time.time(), "heartbeat": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self._key = ""

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        key = str(self.path.resolve())
        with _HELD_GUARD:
            if key in _HELD:  # POSIX locks belong to the process: another thread of ours holds it
                raise self._busy(self._info)
            _HELD.add(key)
        self._key = key
        try:
            self._acquire()
        except BaseException:
            with _HELD_GUARD:
                _HELD.discard(key)
            raise

    def _acquire(self) -> None:
        for _ in range(100):  # a holder that removes the file between our open and lock: retry
            if self._try_lock():
                break
        else:
            raise OutputError(f"{self.path}: could not take the lock (it keeps being replaced)")
        self._write_info()
        self._thread = threading.Thread(target=self._heartbeat, name="distmerge-lock-heartbeat", daemon=True)
        self._thread.start()

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags | os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputError(f"{self.path}: is a symbolic link; refused (remove it)") from None
            if e.errno in (errno.EEXIST, errno.ENOENT):
                raise
            raise OutputError(f"{self.path}: cannot create the lock file ({e.strerror})") from None

    def _try_lock(self) -> bool:
        """One attempt; False means "try again" (the file changed under us)."""
        try:
            fd, created = self._open(os.O_CREAT | os.O_EXCL), True
        except FileExistsError:
            try:
                fd, created = self._open(0), False
            except FileNotFoundError:
                return False
            self._check_ours(fd)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise self._busy(read_holder(self.path)) from None
            if e.errno not in _NO_POSIX_LOCKS:
                os.close(fd)
                raise OutputError(f"{self.path}: cannot lock ({e.strerror})") from None
            if self.posix:
                log.warning("%s: the filesystem has no POSIX locks; using a lock file with a heartbeat", self.path)
                self.posix = False
            if created:  # exclusive creation is the lock on such filesystems
                self._fd = fd
                return True
            os.close(fd)
            holder = read_holder(self.path)
            if not self._is_stale(holder):
                raise self._busy(holder) from None
            self._break(holder)
            return False
        if not self._still_named(fd):
            os.close(fd)  # the previous holder removed it after we opened it: lock the new one
            return False
        self._fd = fd
        return True

    def _check_ours(self, fd: int) -> None:
        """An existing file at the lock's name must be a lock file of distmerge's (or empty)."""
        st = os.fstat(fd)
        content = os.pread(fd, 4096, 0) if stat.S_ISREG(st.st_mode) else b""
        try:
            info = json.loads(content) if content.strip() else {}
        except ValueError:
            info = None
        if not stat.S_ISREG(st.st_mode) or not isinstance(info, dict) or (info and "nonce" not in info):
            os.close(fd)
            raise OutputError(f"{self.path}: exists and is not a distmerge lock file; refused, since distmerge "
                              "never overwrites a file it did not write (move it away)")

    def _still_named(self, fd: int) -> bool:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _busy(self, holder: dict[str, Any]) -> OutputError:
        return OutputError(
            f"{self.path.parent}: another distmerge run is writing this output ({describe_holder(holder)}); "
            "wait for it to finish or choose another OUT_DIR"
        )

    def _is_stale(self, holder: dict[str, Any]) -> bool:
        if not holder:  # being written right now (never break that), or left empty by a crash long ago
            try:
                return time.time() - os.stat(self.path).st_mtime > STALE_AFTER_S
            except OSError:
                return False
        same_host = holder.get("host") == self._info["host"] and holder.get("boot_id") == self._info["boot_id"]
        if same_host and isinstance(holder.get("pid"), int):
            return not pid_alive(holder["pid"])
        beat = holder.get("heartbeat")
        return isinstance(beat, (int, float)) and time.time() - beat > STALE_AFTER_S

    def _break(self, holder: dict[str, Any]) -> None:
        """Move a stale lock away; if what moved was not the stale one, put it back."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.nonce}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if read_holder(aside).get("nonce") != holder.get("nonce"):
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        log.warning("%s: broke a stale lock of %s", self.path, describe_holder(holder))
        aside.unlink(missing_ok=True)

    def _write_info(self) -> None:
        assert self._fd is not None
        self._info["heartbeat"] = time.time()
        data = json.dumps(self._info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.check()
                self._write_info()
            except (OSError, OutputError):
                self.lost = True
                log.error("%s: this run no longer holds the output lock", self.path)
                return

    def check(self) -> None:
        """Raise when this run no longer holds the lock (it was broken or the file replaced)."""
        if self._fd is None:
            raise OutputError(f"{self.path}: not locked")
        if self.lost or not self._still_named(self._fd) or self._own_content().get("nonce") != self.nonce:
            self.lost = True
            raise OutputError(f"{self.path.parent}: this run lost its lock on the output (another run took it "
                              "over); stopping without finishing the output")

    def _own_content(self) -> dict[str, Any]:
        # Read through our own descriptor: opening and closing another descriptor of the file
        # would drop this process's POSIX lock (locks belong to the process, not the descriptor).
        assert self._fd is not None
        try:
            data = json.loads(os.pread(self._fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._fd is None:
            return
        try:
            if not self.lost and self._still_named(self._fd):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing releases the POSIX lock
            self._fd = None
            with _HELD_GUARD:
                _HELD.discard(self._key)

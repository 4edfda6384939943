"""The lock of an object-store output, and the journal's copy there, kept fresh by one thread.

Why an object and not a file lock: the runs that could collide on ``s3://bucket/prefix`` run on
different machines. The lock is an object only one run can create (``If-None-Match: *``); the
holder rewrites it every :data:`HEARTBEAT_S` seconds with ``If-Match`` on its own ETag, so a
second run sees a live holder and stops, and a holder that died (its heartbeat older than
:data:`STALE_S` by the store's own clock, never the machines'; at once if it ran on this machine
and its process is gone) is replaced. A run that finds its
lock gone or replaced stops before finishing (:meth:`RemoteLock.check`).

The same thread copies the local journal to the store whenever it has grown, so a run killed
anywhere leaves a journal there that a rerun on any machine resumes from (at most a few seconds
of finished parts are redone). :meth:`RemoteLock.mirror` copies it at once (after recording new
uploads, and at the end).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from distmerge.errors import OutputError
from distmerge.io.object_stores import object_store
from distmerge.output.lock import OutputLock, boot_id, pid_alive

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_S = 120.0
MIRROR_S = 3.0


class RemoteLock:
    """``with RemoteLock(lock_url, journal_path, journal_url):`` holds the output for this run."""

    def __init__(self, lock_url: str, journal_path: Path, journal_url: str) -> None:
        self.lock_url, self.journal_path, self.journal_url = lock_url, journal_path, journal_url
        self._store = object_store(lock_url)
        self._holder = {"host": socket.gethostname(), "boot": boot_id(), "pid": os.getpid(), "run": uuid.uuid4().hex}
        self._etag: str | None = None
        self._lost: str | None = None
        self._mirrored = -1
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RemoteLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _content(self) -> bytes:
        return json.dumps({**self._holder, "heartbeat": time.time()}).encode()

    def acquire(self) -> None:
        for _ in range(3):
            self._etag = self._store.put_object(self.lock_url, self._content(), "the output's lock", if_none_match=True)
            if self._etag is not None:
                break
            held = self._store.get_object(self.lock_url, "the output's lock")
            if held is None:
                continue  # released meanwhile
            holder = _parse(held.data)
            if held.age_s < STALE_S and not _died_here(holder):
                raise OutputError(
                    f"{self.lock_url}: another merge is writing this output ({_describe(holder)}, last heartbeat "
                    f"{held.age_s:.0f}s ago); wait for it, or delete the lock object if that run is gone "
                    f"(it is taken over once its heartbeat is {STALE_S:.0f}s old)")
            log.warning("%s: taking over the lock of a run that is gone (%s; last heartbeat %.0fs ago)",
                        self.lock_url, _describe(holder), held.age_s)
            self._store.delete_object(self.lock_url, "the output's lock", if_match=held.etag)
        else:
            raise OutputError(f"{self.lock_url}: could not take the output's lock (other runs keep taking it)")
        self._thread = threading.Thread(target=self._keep, name="distmerge-remote-lock", daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        beat = time.monotonic()
        while not self._stop.wait(MIRROR_S):
            try:
                self.mirror()
                if time.monotonic() - beat >= HEARTBEAT_S:
                    self._heartbeat()
                    beat = time.monotonic()
            except Exception as e:  # noqa: BLE001 - reported by check(), on the main thread
                log.warning("%s: %s (will retry)", self.lock_url, e)

    def _heartbeat(self) -> None:
        with self._mutex:
            if self._lost or self._etag is None:
                return
            etag = self._store.put_object(self.lock_url, self._content(), "the output's lock", if_match=self._etag)
            if etag is None:
                self._lost = "another run replaced the lock (this run's heartbeat was late)"
            else:
                self._etag = etag

    def mirror(self) -> None:
        """Copy the journal's complete lines to the store if it grew since the last copy."""
        with self._mutex:
            try:
                data = self.journal_path.read_bytes()
            except FileNotFoundError:
                return
            data = data[:data.rfind(b"\n") + 1]
            if len(data) != self._mirrored:
                self._store.put_object(self.journal_url, data, "the journal")
                self._mirrored = len(data)

    def check(self) -> None:
        """Raise if this run lost the output (it must not finish it)."""
        if self._lost:
            raise OutputError(f"{self.lock_url}: {self._lost}; stopping before the output is finished")
        held = self._store.get_object(self.lock_url, "the output's lock")
        if held is None or _parse(held.data).get("run") != self._holder["run"]:
            raise OutputError(f"{self.lock_url}: this run no longer holds the output's lock (deleted or taken "
                              "over); stopping before the output is finished")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.mirror()
        except OutputError as e:  # the run's own error (if any) is the one to show
            log.warning("%s; a rerun resumes from the store's last copy of the journal", e)
        if self._etag is not None and not self._lost:
            try:
                self._store.delete_object(self.lock_url, "the output's lock", if_match=self._etag)
            except OutputError as e:
                log.warning("%s; the lock is taken over once its heartbeat is %.0fs old", e, STALE_S)


def _parse(data: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _died_here(holder: dict[str, Any]) -> bool:
    """A holder on this machine (same host, same boot) whose process is gone: no need to wait."""
    pid = holder.get("pid")
    return (holder.get("host") == socket.gethostname() and bool(holder.get("boot")) and holder.get("boot") == boot_id()
            and isinstance(pid, int) and not pid_alive(pid))


def _describe(holder: dict[str, Any]) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"


class BothLocks:
    """The local folder's lock and the store's: ``check`` asks both."""

    def __init__(self, local: OutputLock, remote: RemoteLock) -> None:
        self.local, self.remote = local, remote

    def check(self) -> None:
        self.local.check()
        self.remote.check()


class HeldOutput:
    """``with HeldOutput(folder, lock_url, journal_url, on_held) as lock``: the run's local folder
    locked (against a second run on this machine), then the store's lock; ``on_held`` gets the
    store's lock (to copy the journal at once when it must)."""

    def __init__(self, folder: Path, lock_url: str, journal_url: str, on_held: Callable[[RemoteLock], None]) -> None:
        self._folder, self._lock_url, self._journal_url, self._on_held = folder, lock_url, journal_url, on_held
        self._stack = ExitStack()

    def __enter__(self) -> BothLocks:
        from distmerge.output.journal import JOURNAL_NAME

        try:
            local = self._stack.enter_context(OutputLock(self._folder))
            remote = self._stack.enter_context(RemoteLock(self._lock_url, self._folder / JOURNAL_NAME,
                                                          self._journal_url))
        except BaseException:
            self._stack.close()
            raise
        self._on_held(remote)
        return BothLocks(local, remote)

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

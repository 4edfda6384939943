"""One run per output directory (issue #12): the lock, its stale-lock rules, and two real merges
racing for one OUT."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distmerge.errors import OutputError
from distmerge.output import lock as lock_module
from distmerge.output.journal import JOURNAL_NAME
from distmerge.output.lock import LOCK_NAME, OutputLock
from tests.helpers import make_config

HOLD = """
import sys, time
from pathlib import Path
from distmerge.output.lock import OutputLock
lock = OutputLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
if sys.argv[3] == "release":
    lock.release()
"""


def _holder(out: Path, seconds: float, release: bool = True) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(seconds), "release" if release else "keep"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_second_lock_in_this_process_is_refused(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(OutputError, match=f"another distmerge run is writing this output \\(pid {os.getpid()}"):
            OutputLock(tmp_path).acquire()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()
    with OutputLock(tmp_path):  # released for good
        pass


def test_lock_held_by_another_process_names_it(tmp_path):
    proc = _holder(tmp_path, 30)
    try:
        with pytest.raises(OutputError, match=rf"pid {proc.pid} on host {socket.gethostname()}, started .*heartbeat"):
            OutputLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_killed_holder_leaves_no_stale_lock(tmp_path):
    proc = _holder(tmp_path, 60, release=False)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the file stays, the kernel dropped the lock
    with OutputLock(tmp_path) as lock:
        lock.check()


@pytest.fixture
def no_posix_locks(monkeypatch):
    """A filesystem without POSIX locks (some FUSE and object-store mounts)."""
    def refuse(*_: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", refuse)


def _plant(out: Path, **info: object) -> None:
    base = {"host": socket.gethostname(), "boot_id": lock_module.boot_id(), "pid": os.getpid(), "nonce": "other",
            "started": time.time(), "heartbeat": time.time()}
    (out / LOCK_NAME).write_text(json.dumps({**base, **info}))


def test_fallback_breaks_the_lock_of_a_dead_process_on_this_host(tmp_path, no_posix_locks):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant(tmp_path, pid=dead.pid)
    with OutputLock(tmp_path) as lock:
        assert not lock.posix
        lock.check()


def test_fallback_respects_a_live_holder_on_another_host(tmp_path, no_posix_locks):
    _plant(tmp_path, host="other-node", boot_id="x", pid=1)
    with pytest.raises(OutputError, match="pid 1 on host other-node"):
        OutputLock(tmp_path).acquire()


def test_fallback_breaks_a_lock_whose_host_stopped_beating(tmp_path, no_posix_locks):
    _plant(tmp_path, host="gone-node", boot_id="x", pid=1, heartbeat=time.time() - lock_module.STALE_AFTER_S - 5)
    with OutputLock(tmp_path) as lock:
        lock.check()
    assert not (tmp_path / LOCK_NAME).exists()


def test_fallback_second_contender_is_refused_and_a_lost_lock_is_noticed(tmp_path, no_posix_locks):
    with OutputLock(tmp_path) as lock:
        with pytest.raises(OutputError, match="another distmerge run"):
            OutputLock(tmp_path / ".." / tmp_path.name).acquire()
        _plant(tmp_path, nonce="intruder")  # somebody broke our lock and took it over
        with pytest.raises(OutputError, match="lost its lock"):
            lock.check()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["nonce"] == "intruder"  # theirs stays


# --- two real merges into one OUT -----------------------------------------------------------

def _merge_command(tmp_path: Path, llama_family, out: Path) -> list[str]:
    base, experts = llama_family
    config = tmp_path / "m.yml"
    config.write_text(yaml.safe_dump(make_config("task_arithmetic", base, experts, [0.5, 0.5]).model_dump(mode="json")))
    return [sys.executable, "-m", "distmerge", "merge", str(config), str(out), "--shard-size", "20KB", "--no-progress"]


def _wait_for_units(proc: subprocess.Popen, out: Path, units: int) -> None:
    """Until the running merge ``proc`` has journaled ``units`` units (it must not end before)."""
    deadline = time.time() + 180
    while time.time() < deadline:
        journal = out / JOURNAL_NAME
        if journal.exists() and journal.read_text().count('"kind":"unit"') >= units:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"the merge journaled fewer than {units} units in 180 s")


def _verify(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distmerge", "verify", str(out)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_two_merges_started_together_exactly_one_runs(tmp_path, llama_family):
    out = tmp_path / "out"
    command = _merge_command(tmp_path, llama_family, out)
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    assert "another distmerge run is writing this output (pid" in loser and "Traceback" not in loser
    assert _verify(out).returncode == 0
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_staggered_second_merge_is_refused_while_the_first_runs(tmp_path, llama_family):
    out = tmp_path / "out"
    # One worker and small units: the first run is still merging (it holds the lock) for
    # seconds after its fifth unit, longer than the second needs to start and ask for the lock.
    command = [*_merge_command(tmp_path, llama_family, out), "--workers", "1", "--shard-size", "4KB"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_units(first, out, 5)
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first merge ended before the second started; the test proves nothing"
    assert second.returncode == 2 and "another distmerge run is writing this output" in second.stderr
    assert first.wait(timeout=300) == 0, first.communicate()
    assert _verify(out).returncode == 0


@pytest.mark.slow
def test_input_shard_deleted_during_a_merge_is_a_message(tmp_path, llama_family):
    base, experts = llama_family
    victim_model = Path(shutil.copytree(experts[1], tmp_path / "expert"))
    config = tmp_path / "m.yml"
    config.write_text(yaml.safe_dump(make_config("task_arithmetic", base, [experts[0], victim_model], [0.5, 0.5])
                                     .model_dump(mode="json")))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "distmerge", "merge", str(config), str(out), "--shard-size", "20KB",
                             "--no-progress", "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_units(proc, out, 3)
    for shard in victim_model.glob("model-*.safetensors"):
        shard.unlink()
    code = proc.wait(timeout=300)
    _, err = proc.communicate()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and str(victim_model) in err and "does not exist" in err
    assert not (out / "model.safetensors.index.json").exists()

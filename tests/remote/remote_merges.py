"""What the tests of merges into object stores (S3, Cloud Storage) share: the merge, its CLI runs,
and the scenario of a run killed midway.

In that scenario the server lets one part through and holds the next, the merge is killed (its
whole process group, as a lost node or an OOM kill would) once the store's copy of the journal
records the part, and the rerun must take the stale lock over, keep that part (never sending it
again), upload only the others and produce the same bytes as the local merge.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from distmerge.output.remote_lock import MIRROR_S

MODEL = "model-00001-of-00001.safetensors"
JOURNAL = "distmerge_journal.jsonl"
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def write_config(path: Path, names: dict[str, str]) -> Path:
    """The TIES merge of e1 and e2 onto base (role -> location)."""
    path.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": names["base"], "parameters": {"density": 0.5}, "dtype": "bfloat16",
        "models": [{"model": names[m], "parameters": {"weight": w}} for m, w in (("e1", 0.6), ("e2", 0.5))]}))
    return path


def cli(env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distmerge", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def merge(env: dict, cfg: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    """The merge as the tests run it: 2 workers, 16 MB units, so the output file has several parts."""
    return cli(env, "merge", str(cfg), out, "--no-progress", "--workers", "2", "--shard-size", "16MB", *extra)


def records(journal: bytes, kind: str) -> list[dict]:
    return [r for r in map(json.loads, journal.decode().splitlines()) if r["kind"] == kind]


def kill_then_resume(server, env: dict, cfg: Path, url: str, stored: Callable[[], dict[str, bytes]],
                     part_key: str, reference: bytes) -> None:
    """Run the scenario against ``server`` (an S3 or Cloud Storage test server); ``stored()`` lists
    the output prefix, ``part_key`` is the model file's key in the server's ``part_puts``."""
    command = [sys.executable, "-m", "distmerge", "merge", str(cfg), url, "--no-progress", "--workers", "2",
               "--shard-size", "16MB"]  # as merge() runs it
    server.hold_parts(after=1)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        # Until the store's journal copy records the first part (and its units: the copy is
        # unchanged for longer than the copying period, the next part being held).
        deadline, seen, since = time.time() + 180, b"", time.time()
        while time.time() < deadline:
            journal = stored().get(JOURNAL, b"")
            if journal != seen:
                seen, since = journal, time.time()
            elif records(journal, "part") and time.time() - since > MIRROR_S + 1:
                break
            assert proc.poll() is None, "the merge ended before it could be interrupted"
            time.sleep(0.2)
        else:
            pytest.fail("no part was journaled in the store")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        server.hold_parts(None)
    before = stored()
    assert MODEL not in before and "model.safetensors.index.json" not in before  # nothing looks complete
    kept = records(before[JOURNAL], "part")
    server.reset_counters()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming:" in rerun.stderr and "taking over the lock" in rerun.stderr
    out = stored()
    assert out[MODEL] == reference
    # The kept parts were not uploaded again; the others were, once each.
    total = {r["n"] for r in records(out[JOURNAL], "part") if r["id"] == kept[0]["id"]}
    assert len(total) > len(kept) >= 1
    assert server.part_puts[part_key] == len(total) - len(kept), rerun.stderr[-3000:]
    resumed = re.search(r"resuming: (\d+) of (\d+) units", rerun.stderr)
    assert resumed and 0 < int(resumed[1]) < int(resumed[2]), rerun.stderr[-2000:]

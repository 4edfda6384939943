"""Time mergekit 0.1.5 on the same inputs and config, from its reference environment.

The environment is the one :mod:`distmerge.testing.mergekit_reference` creates and reuses
(outside the repository; pinned CPU torch first, then mergekit from PyPI). Where it cannot be
made, callers get None and say so.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
import time
from pathlib import Path

import psutil
import yaml

from distmerge.testing.mergekit_reference import ReferenceUnavailable, ensure_reference_env

log = logging.getLogger(__name__)


def ensure_mergekit() -> Path | None:
    """Path of the reference ``mergekit-yaml`` (created on first use); None if impossible."""
    try:
        return ensure_reference_env()
    except ReferenceUnavailable as e:
        log.warning("%s; the mergekit comparison is skipped", e)
        return None


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def run_mergekit(config: dict, out: Path, work: Path) -> dict | None:
    """Time one ``mergekit-yaml`` run (CPU, same threads); returns seconds and peak RSS."""
    exe = ensure_mergekit()
    if exe is None:
        return None
    path = work / "mergekit.yml"
    mk = {k: v for k, v in config.items() if k not in ("aim", "execution")}
    path.write_text(yaml.safe_dump(mk, sort_keys=False))
    started = time.perf_counter()
    proc = psutil.Popen([str(exe), str(path), str(out), "--out-shard-size", "5B", "--lazy-unpickle",
                         "--allow-crimes", "--no-copy-tokenizer"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc))
        time.sleep(0.1)
    reader.join()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        log.warning("mergekit failed (exit %s): %s", proc.returncode, b"".join(output)[-2000:].decode(errors="replace"))
        return None
    return {"seconds": seconds, "peak_rss": peak}

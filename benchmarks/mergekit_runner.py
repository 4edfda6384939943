"""Run mergekit 0.1.5 on the same inputs and config, from a virtual environment of its own.

The environment is made once under benchmarks/_work/mergekit-venv (pinned CPU torch first,
then mergekit from PyPI). Where that cannot be installed, callers get None and say so.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

log = logging.getLogger(__name__)
VENV = Path(__file__).parent / "_work" / "mergekit-venv"
MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"


def ensure_mergekit() -> Path | None:
    """Path of the ``mergekit-yaml`` executable, installing it on first use; None if impossible."""
    exe = VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
        pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True, timeout=1800)
        subprocess.run([*pip, f"mergekit=={MERGEKIT_VERSION}"], check=True, timeout=1800)
    except (subprocess.SubprocessError, OSError) as e:
        log.warning("mergekit could not be installed (%s); its comparison is skipped", e)
        return None
    return exe if exe.exists() else None


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

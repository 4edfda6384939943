"""The mergekit 0.1.5 reference environment: one place that creates, finds and runs it.

mergekit is never installed into distmerge's own environment. It lives in a virtual
environment of its own, outside the repository (default ``~/.cache/distmerge/mergekit-0.1.5``,
or ``$DISTMERGE_MERGEKIT_VENV``), made on first use with the pinned CPU torch first (a bare
``torch`` requirement would pull a multi-GB CUDA build) and then ``mergekit==0.1.5``, and
reused when present. The compatibility suite (``tests/compat``) and the benchmarks
(``benchmarks/mergekit_runner.py``) both go through :func:`ensure_reference_env`.

:func:`run_references` runs mergekit-yaml's command on CPU, single-threaded and with a fixed
random seed (so its float sums have one order and reruns give the same bytes), many configs per
process, and caches each output under a key made of the config (input paths replaced by the
hashes of the inputs' files), the inputs' bytes and the options, so a repeated run costs a
directory lookup.

Longer than 300 lines because the batch runner (a script for the reference environment, the
forking, the per-job status files and their collection into the cache) belongs with the cache
keys and the environment it runs in: one module owns every way distmerge talks to mergekit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from distmerge.testing.locks import exclusive_lock

MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
VENV_ENV = "DISTMERGE_MERGEKIT_VENV"
OPT_OUT_ENV = "DISTMERGE_SKIP_MERGEKIT"  # "1": the comparison tests skip, saying so
CACHE_ENV = "DISTMERGE_MERGEKIT_CACHE"
# mergekit iterates sets of model references (e.g. config.json's template when there is no
# base_model), so its output can follow Python's string hash seed: fixed for every run.
HASH_SEED = "0"

# Options that make mergekit's output a function of config and inputs only: CPU math, one
# thread (torch's parallel float reductions split by thread count), a fixed seed for the
# random methods (they still differ from distmerge's draws; see docs/methods.md).
DETERMINISTIC_OPTIONS = ("--no-cuda", "--random-seed", "0", "--num-threads", "1", "--no-lazy-unpickle",
                         "--no-low-cpu-memory", "--no-async-write", "--safe-serialization",
                         "--no-write-model-card", "--quiet")


class ReferenceUnavailable(RuntimeError):
    """The mergekit reference environment could not be created (the message says why)."""


def venv_path() -> Path:
    """Where the reference environment lives (``$DISTMERGE_MERGEKIT_VENV`` or the user cache)."""
    env = os.environ.get(VENV_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "distmerge" / f"mergekit-{MERGEKIT_VERSION}"


def cache_root() -> Path:
    """Where reference outputs are cached, keyed by config, inputs and options."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "distmerge" / f"mergekit-{MERGEKIT_VERSION}-outputs"


def _installed(venv: Path) -> bool:
    py = venv / "bin" / "python"
    if not (venv / "bin" / "mergekit-yaml").exists() or not py.exists():
        return False
    probe = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
        capture_output=True, text=True, timeout=120)
    return probe.returncode == 0 and probe.stdout.split()[:1] == [MERGEKIT_VERSION]


def ensure_reference_env(python: str | None = None) -> Path:
    """Path of the reference ``mergekit-yaml``, creating its environment on first use.

    Raises :class:`ReferenceUnavailable` with the reason (pip's last lines) when it cannot be
    made; callers decide whether that fails a test (the default) or is an explicit opt-out.
    """
    venv = venv_path()
    exe = venv / "bin" / "mergekit-yaml"
    with exclusive_lock(venv.parent / f".{venv.name}.lock"):
        if _installed(venv):
            return exe
        steps = [
            [python or sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--index-url", TORCH_INDEX,
             f"torch=={TORCH_VERSION}"],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"mergekit=={MERGEKIT_VERSION}"],
        ]
        for cmd in steps:
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            except (OSError, subprocess.SubprocessError) as e:
                raise ReferenceUnavailable(f"creating the mergekit {MERGEKIT_VERSION} reference environment "
                                           f"at {venv} failed at `{' '.join(cmd)}`: {e}") from e
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                raise ReferenceUnavailable(f"creating the mergekit {MERGEKIT_VERSION} reference environment "
                                           f"at {venv} failed at `{' '.join(cmd)}` (exit {done.returncode}): "
                                           + " | ".join(tail))
        if not _installed(venv):
            raise ReferenceUnavailable(f"{venv} was created but does not hold mergekit {MERGEKIT_VERSION}")
    return exe


# ---- cached runs ----------------------------------------------------------------------------

def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_digest(folder: Path) -> str:
    """Hash of every regular file in a model folder (names and bytes)."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + b"\0" + _file_digest(p).encode() + b"\n")
    return h.hexdigest()


def _replace_paths(value: Any, names: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return names.get(value, value)
    if isinstance(value, list):
        return [_replace_paths(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _replace_paths(v, names) for k, v in value.items()}
    return value


def cache_key(config: Mapping[str, Any], inputs: Mapping[str, Path], options: tuple[str, ...]) -> str:
    """Key of one reference run: config with input paths replaced by content hashes, options."""
    names = {str(p): f"input:{folder_digest(p)}" for p in inputs.values()}
    canonical = json.dumps({"config": _replace_paths(dict(config), names), "options": list(options),
                            "mergekit": MERGEKIT_VERSION, "torch": TORCH_VERSION, "hash_seed": HASH_SEED},
                           sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


# The batch runner, executed by the reference environment's Python: one process for many
# configs (a mergekit-yaml process spends ~5 s importing torch and transformers per case). The
# parent imports mergekit once and forks a child per job, so no job sees state an earlier one
# left behind (mergekit mutates cached model configs and keeps a class-level loader cache: run
# in one process, a job's config.json took an earlier job's dtype). The child runs
# mergekit-yaml's own click command, with one thread set once (torch refuses to set the
# inter-op thread count twice), and merges LoRA adapters into a cache of its own (mergekit's
# default cache is keyed by path). Only a job with an adapter gets ``--lora-merge-cache``: the
# option alone changes mergekit's output (a tied model's config.json then says
# ``tie_word_embeddings: false``).
_BATCH_RUNNER = r"""
import json, os, sys, traceback
import torch
torch.set_num_threads(1)
torch.set_num_interop_threads(1)
from mergekit.scripts.run_yaml import main
jobs = json.load(open(sys.argv[1]))
for job in jobs:
    pid = os.fork()
    if pid == 0:
        try:
            lora = ["--lora-merge-cache", job["lora_cache"]] if job["lora_cache"] else []
            main.main(args=[job["config"], job["out"], *job["options"], *lora], standalone_mode=False)
            error = None
        except BaseException as e:
            error = "".join(traceback.format_exception(e)).strip().splitlines()[-8:]
        json.dump({"error": error}, open(job["status"], "w"))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    os.waitpid(pid, 0)
"""


def _uses_lora(config: Mapping[str, Any]) -> bool:
    """Whether a config names a ``model+adapter`` anywhere."""
    text = json.dumps(config)
    return any("+" in m for m in _model_strings(config)) if "+" in text else False


def _model_strings(value: Any) -> Iterator[str]:
    if isinstance(value, Mapping):
        for key, v in value.items():
            if key in ("model", "base_model") and isinstance(v, str):
                yield v
            else:
                yield from _model_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _model_strings(v)


def _single_threaded(options: tuple[str, ...]) -> list[str]:
    """The options without ``--num-threads N`` (the batch runner sets one thread once: torch
    refuses to set the inter-op thread count a second time in one process)."""
    out, skip = [], False
    for i, opt in enumerate(options):
        if skip:
            skip = False
            continue
        if opt == "--num-threads":
            if options[i + 1] != "1":
                raise ValueError("the batch runner runs mergekit single-threaded only")
            skip = True
            continue
        out.append(opt)
    return out


def run_references(jobs: Sequence[tuple[Mapping[str, Any], Mapping[str, Path]]], *,
                   extra_options: tuple[str, ...] = (), processes: int | None = None,
                   timeout: float = 3600) -> list[Path | RuntimeError]:
    """mergekit 0.1.5's output folder for each ``(config, inputs)`` job, or the RuntimeError
    (mergekit's last output lines) where it refused or failed. Cached outputs cost a directory
    lookup; the rest run in at most ``processes`` batch processes at once (default: the CPU
    count, at most 4), each importing mergekit once. Raises ReferenceUnavailable when the
    environment cannot be made."""
    options = DETERMINISTIC_OPTIONS + tuple(extra_options)
    keys = [cache_key(config, inputs, options) for config, inputs in jobs]
    results: dict[str, Path | RuntimeError] = {}
    pending: dict[str, Mapping[str, Any]] = {}
    for key, (config, _) in zip(keys, jobs, strict=True):
        if (cache_root() / key / "config.json").exists():
            results[key] = cache_root() / key
        else:
            pending.setdefault(key, config)
    if pending:
        exe = ensure_reference_env()
        cache_root().mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".batch-", dir=cache_root()))
        try:
            results.update(_run_batches(exe.parent / "python", pending, options, work,
                                        processes or min(4, os.cpu_count() or 1), timeout))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return [results[key] for key in keys]


def _run_batches(python: Path, pending: Mapping[str, Mapping[str, Any]], options: tuple[str, ...],
                 work: Path, processes: int, timeout: float) -> dict[str, Path | RuntimeError]:
    """Runs the pending configs split round-robin over ``processes`` batch processes."""
    runner = work / "runner.py"
    runner.write_text(_BATCH_RUNNER)
    batches: list[list[dict[str, str]]] = [[] for _ in range(max(1, min(processes, len(pending))))]
    for i, (key, config) in enumerate(pending.items()):
        job_dir = work / key
        job_dir.mkdir()
        (job_dir / "config.yml").write_text(yaml.safe_dump(dict(config), sort_keys=False))
        batches[i % len(batches)].append({"key": key, "config": str(job_dir / "config.yml"),
                                          "out": str(job_dir / "out"), "status": str(job_dir / "status.json"),
                                          "lora_cache": str(job_dir / "lora") if _uses_lora(config) else "",
                                          "options": _single_threaded(options)})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": HASH_SEED}
    env.pop("PYTHONPATH", None)
    running = []
    for n, batch in enumerate(batches):
        (work / f"batch{n}.json").write_text(json.dumps(batch))
        log = open(work / f"batch{n}.log", "w")  # noqa: SIM115 - closed after wait below
        running.append((subprocess.Popen([str(python), str(runner), str(work / f"batch{n}.json")], cwd=work,
                                         env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in running:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    results: dict[str, Path | RuntimeError] = {}
    for n, batch in enumerate(batches):
        for job in batch:
            results[job["key"]] = _collect(job, work / f"batch{n}.log")
    return results


def _collect(job: Mapping[str, str], log: Path) -> Path | RuntimeError:
    """Moves one finished job's output into the cache, or says why there is none."""
    status = Path(job["status"])
    if not status.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-8:] if log.exists() else []
        return RuntimeError("mergekit batch process ended before this config: " + "\n".join(tail))
    error = json.loads(status.read_text())["error"]
    if error is not None:
        return RuntimeError("mergekit-yaml failed: " + "\n".join(error))
    out, target = Path(job["out"]), cache_root() / job["key"]
    (out / "mergekit_config.yml").unlink(missing_ok=True)  # names temporary paths
    with contextlib.suppress(OSError):
        os.replace(out, target)  # another session may have won the race: same bytes
    return target


def run_reference(config: Mapping[str, Any], inputs: Mapping[str, Path], *,
                  extra_options: tuple[str, ...] = (), timeout: float = 900) -> Path:
    """mergekit 0.1.5's output folder for ``config`` (cached); ``inputs`` names every model
    folder the config refers to. Raises ReferenceUnavailable or RuntimeError (mergekit failed,
    with its last output lines)."""
    (result,) = run_references([(config, inputs)], extra_options=extra_options, processes=1, timeout=timeout)
    if isinstance(result, RuntimeError):
        raise result
    return result

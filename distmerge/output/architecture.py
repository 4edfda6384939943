"""The tensor names and shapes a ``config.json``'s architecture has, for the verification.

Building them takes transformers (about two seconds of imports, then a model on the meta
device): more than a small merge itself on one machine, and in the merging process it would
hold the GIL the merge's worker threads need. So the shapes are kept three ways:

- in memory, once per process and shape-relevant config;
- on disk, under ``DISTMERGE_CACHE`` (default ``~/.cache/distmerge``) ``/architectures``, one
  JSON file per shape-relevant config and transformers version: a user iterating on merges
  of one architecture pays for the build once. A config that transformers cannot build (a
  custom architecture, no ``model_type``) is kept there too, as such: trying again costs
  every merge of it seconds of imports, and only another transformers version could change
  the answer (a failed import, or memory running out, is not kept: the environment can change);
- built ahead by a child process (:func:`prepare_architecture`, right after planning), on
  another core while the merge runs; the verification waits for it, and builds in-process
  only when the child did not deliver (then the failure is reported as the check's warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

from distmerge.errors import DistmergeError
from distmerge.io.model_source import cache_home
from distmerge.io.writes import write_text_atomic

log = logging.getLogger(__name__)

Shapes = dict[str, tuple[int, ...]]
_NOT_SHAPES = ("torch_dtype", "dtype", "transformers_version", "_name_or_path")
CHILD_TIMEOUT_S = 300.0
_MEMORY: dict[str, Shapes | None] = {}
_CHILDREN: dict[str, subprocess.Popen[bytes]] = {}
_LOCK = threading.Lock()


def _transformers_version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "none"


def shape_key(config: dict[str, Any]) -> str:
    """What decides the shapes: the config without its dtype and provenance fields, and the
    transformers version that builds it."""
    relevant = {k: v for k, v in config.items() if k not in _NOT_SHAPES}
    return json.dumps({"config": relevant, "transformers": _transformers_version()}, sort_keys=True, default=str)


def cache_file(key: str) -> Path:
    return cache_home() / "architectures" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _load(key: str) -> tuple[bool, Shapes | None]:
    """``(found, shapes)`` as cached on disk for ``key``: shapes None where the build failed;
    not found where the file is missing, unreadable or another key's."""
    try:
        stored = json.loads(cache_file(key).read_text())
        if stored.get("key") != key:
            return False, None
        if stored["shapes"] is None:
            return True, None
        return True, {name: tuple(int(d) for d in shape) for name, shape in stored["shapes"].items()}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return False, None


def _store(key: str, shapes: Shapes | None) -> None:
    """Keep a build's outcome on disk (None: transformers cannot build this config)."""
    try:
        path = cache_file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = None if shapes is None else {n: list(s) for n, s in shapes.items()}
        write_text_atomic(path, json.dumps({"key": key, "shapes": kept}))
    except (OSError, DistmergeError) as e:  # a read-only or full cache: the outcome is only not kept
        log.debug("cannot cache the architecture: %r", e)


def prepare_architecture(config: dict[str, Any]) -> None:
    """Have the shapes of ``config`` ready before the verification asks; never raises.

    From memory or disk at once; otherwise a child process builds them (and caches them on disk).
    """
    key = shape_key(config)
    with _LOCK:
        if key in _MEMORY or key in _CHILDREN:
            return
        found, shapes = _load(key)
        if found or not _has_model_type(config):
            _MEMORY[key] = shapes
            return
        try:
            _CHILDREN[key] = subprocess.Popen(
                [sys.executable, "-m", "distmerge.output.architecture"], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            assert _CHILDREN[key].stdin is not None
            _CHILDREN[key].stdin.write(json.dumps(config).encode())
            _CHILDREN[key].stdin.close()
        except OSError as e:
            log.debug("cannot start the architecture's build: %r", e)
            _CHILDREN.pop(key, None)


def expected_architecture(config: dict[str, Any]) -> Shapes | None:
    """Tensor names and shapes of the config's architecture (None: transformers cannot build it)."""
    key = shape_key(config)
    with _LOCK:  # a second caller waits for the first build instead of repeating it
        if key not in _MEMORY:
            child = _CHILDREN.pop(key, None)
            if child is not None:
                try:
                    child.wait(CHILD_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    child.kill()
            found, shapes = _load(key)  # the child's outcome, failure included: not tried again here
            if not found:
                shapes, final = _build(config)
                if final:
                    _store(key, shapes)
            _MEMORY[key] = shapes
        return _MEMORY[key]


def _has_model_type(config: dict[str, Any]) -> bool:
    """transformers builds a config by its ``model_type``: without one there is nothing to
    import or try."""
    return isinstance(config.get("model_type"), str)


def build_architecture(config: dict[str, Any]) -> Shapes | None:
    """The shapes, built by transformers on the meta device (tied output embeddings left out)."""
    return _build(config)[0]


def _build(config: dict[str, Any]) -> tuple[Shapes | None, bool]:
    """``(shapes, final)``: :func:`build_architecture`'s shapes, and whether the outcome holds
    for this transformers version (False: an import failed, which installing it would mend)."""
    if not _has_model_type(config):
        return None, True
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
    except Exception as e:  # noqa: BLE001 - missing or broken (a torch library): the environment's, mendable
        log.debug("cannot import what builds the architecture: %r", e)
        return None, False
    try:
        cfg = AutoConfig.for_model(**config)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(cfg)
    except (ImportError, MemoryError) as e:  # a package the model class needs; memory: not the config's
        log.debug("cannot build the architecture of config.json now: %r", e)
        return None, False
    except Exception as e:  # noqa: BLE001 - any failure means "cannot check", reported as a warning
        log.debug("cannot build the architecture of config.json: %r", e)
        return None, True
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False) or getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        for name in [n for n in shapes if n.endswith("lm_head.weight")]:
            shapes.pop(name)
    return shapes, True


def _main() -> int:
    """The child of :func:`prepare_architecture`: config JSON on stdin, the outcome into the cache."""
    config = json.loads(sys.stdin.read())
    shapes, final = _build(config)
    if final:
        _store(shape_key(config), shapes)
    return 0 if shapes is not None else 1


if __name__ == "__main__":
    sys.exit(_main())

"""JSON and YAML from untrusted files, bounded before anything is built from them.

Why: Python's parsers recurse, so a config nested ten thousand levels deep raises
RecursionError (a traceback, not a message); YAML aliases let a few hundred bytes stand for
billions of values that only explode later, when the config is dumped or fingerprinted. Here
both formats are parsed with a nesting limit, YAML aliases are counted, and the expanded size
of the result is bounded, so a bad file costs a message and milliseconds.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import yaml

from distmerge.errors import DistmergeError
from distmerge.io.files import read_limited

log = logging.getLogger(__name__)

MAX_DEPTH = 64
MAX_NODES = 100_000
MAX_YAML_ALIASES = 256
MAX_CONFIG_BYTES = 1000**2  # a merge config is KBs; the pure-Python YAML parser takes ~10 s per MB
MAX_NUMBER_CHARS = 100  # longer integers are typos or attacks (and base-60 ones parse in quadratic time)
# Bytes per JSON container ([ or {) below which a document is refused before parsing: real
# headers, indexes and configs have one container per 30+ bytes, while 12 MB of "[[],[],...]"
# would take ~300 MB of Python lists.
MIN_BYTES_PER_CONTAINER = 12


def check_bounded(data: Any, source: str, error: type[DistmergeError], *, max_depth: int = MAX_DEPTH,
                  max_nodes: int = MAX_NODES) -> None:
    """Refuse a parsed value nested deeper than ``max_depth`` or expanding to more than
    ``max_nodes`` values (shared YAML aliases counted as often as they are used).

    Iterative, so the check itself cannot overflow the stack, and it stops at the first
    value past a limit, so a billion-laughs document costs at most ``max_nodes`` steps.
    """
    stack: list[tuple[Any, int]] = [(data, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise error(f"{source}: expands to more than {max_nodes} values (repeated YAML aliases?); refused")
        if isinstance(value, dict):
            children: Any = list(value.keys()) + list(value.values())
        elif isinstance(value, (list, tuple)):
            children = value
        else:
            continue
        if depth >= max_depth and children:
            raise error(f"{source}: nested more than {max_depth} levels deep; refused")
        stack.extend((child, depth + 1) for child in children)


def parse_json(raw: bytes | str, source: str, error: type[DistmergeError], *,
               max_depth: int | None = MAX_DEPTH) -> Any:
    """Parse JSON text; a syntax error, bad UTF-8 or excessive nesting is ``error`` naming ``source``.

    ``max_depth=None`` skips the walk of the result, for callers that validate every value
    they use against a fixed schema anyway (a safetensors header of 100k tensors).
    """
    containers = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) else raw.count("[") + raw.count("{")
    if containers * MIN_BYTES_PER_CONTAINER > max(len(raw), 4096):
        raise error(f"{source}: {containers} arrays and objects in {len(raw)} bytes is not the shape of a "
                    "header, index or config; refused before parsing")
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise error(f"{source}: nested too deeply to be valid here; refused") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{source}: not valid JSON ({e})") from None
    except ValueError as e:  # NaN/Infinity, or an integer of more digits than Python converts
        raise error(f"{source}: not valid JSON ({str(e)[:200]})") from None
    if max_depth is not None:
        check_bounded(data, source, error, max_depth=max_depth)
    return data


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words, for "expected a JSON object, got ...":
    a user reads ``null`` and ``an array`` in their file, not Python's NoneType and list."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    kinds = {dict: "an object", list: "an array", str: "a string"}
    return next((kind for t, kind in kinds.items() if isinstance(value, t)), "a number")


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity are not JSON; Python's parser accepts them unless told otherwise."""
    raise ValueError(f"{name} is not a JSON value")


def read_json(path: str | os.PathLike[str], what: str, error: type[DistmergeError], *,
              limit: int = 64 * 1000**2) -> Any:
    """A small JSON file (config.json, an index, a manifest), read and parsed within bounds."""
    return parse_json(read_limited(path, what, limit, error), f"{path}", error)


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts aliases and nesting while it composes the document.

    It also reads ``1e-1`` and ``5e9`` as numbers (YAML 1.2, JSON and Python do; PyYAML's YAML
    1.1 rules make them strings, which mergekit's pydantic models then convert to floats, so
    configs written that way are common), and it warns about a key given twice in one mapping
    (the last one wins, as in mergekit, but it is almost always a mistake).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D401 - PyYAML hook
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _Refused(f"uses more than {MAX_YAML_ALIASES} YAML aliases")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"is nested more than {MAX_DEPTH} levels deep")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


    def construct_yaml_int(self, node: Any) -> Any:  # noqa: D401 - PyYAML hook
        if len(str(node.value)) > MAX_NUMBER_CHARS:
            raise _Refused(f"has a number of more than {MAX_NUMBER_CHARS} characters at line {node.start_mark.line + 1}")
        return super().construct_yaml_int(node)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:  # noqa: D401 - PyYAML hook
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    line = key_node.start_mark.line + 1
                    if key_node.value in seen:
                        log.warning("%s: key %r at line %d repeats line %d; the last one wins",
                                    self.name if self.name != "<unicode string>" else "config", key_node.value,
                                    line, seen[key_node.value])
                    seen[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)
_BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _Refused(Exception):
    """Raised inside the loader; turned into the caller's error with the file named."""


def parse_yaml(text: str, source: str, error: type[DistmergeError]) -> Any:
    """Parse one YAML document safely (no Python objects), bounded in nesting, aliases and size."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader already refuses control characters here
        data = loader.get_single_data()
    except _Refused as e:
        raise error(f"{source}: {e}; refused") from None
    except RecursionError:
        raise error(f"{source}: nested too deeply; refused") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise error(f"{source}: a value cannot be read ({e})") from None
    except yaml.reader.ReaderError as e:
        raise error(f"{source}: character #x{e.character:04x} at position {e.position} is not allowed in YAML "
                    f"({e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise error(f"{source}: YAML syntax error{where}: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()
    check_bounded(data, source, error)
    return data


def read_yaml(path: str | os.PathLike[str], what: str, error: type[DistmergeError]) -> Any:
    """A YAML file (a merge config), read within bounds and parsed safely."""
    raw = read_limited(path, what, MAX_CONFIG_BYTES, error)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (expected YAML)") from None
    return parse_yaml(text, str(path), error)

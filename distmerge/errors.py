"""Errors a user can act on.

Every error that reaches the command line is a :class:`DistmergeError`: the CLI prints its
message (no traceback unless ``--debug``) and exits non-zero. Messages name the file, tensor
or config field involved and say what to do about it.
"""

from __future__ import annotations


class DistmergeError(Exception):
    """Base class of all errors that are the user's to fix (bad input, bad config, no space)."""

    exit_code = 2


class ConfigError(DistmergeError):
    """The merge configuration is invalid: names the key, the value and what is allowed."""


class CheckpointError(DistmergeError):
    """An input checkpoint is missing, corrupt, truncated or does not match the others."""


class OutputError(DistmergeError):
    """The output directory cannot be used (exists, not writable, disk full)."""


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for a message: cut to ``limit`` characters, and safe for any value
    (Python refuses to print an integer of more than 4300 digits). true, false and null as the
    user wrote them (YAML and JSON), not Python's True, False and None."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    try:
        text = repr(value)
    except ValueError:
        return f"(a {type(value).__name__} too long to show)"
    return text if len(text) <= limit else text[:limit] + "..."

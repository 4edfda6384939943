"""A parameter's scalar read as mergekit 0.1.5 reads it, so its configs run unchanged.

mergekit checks each scalar with pydantic in lax mode against the parameter's type, before it
tells a gradient from a list of labels. A config that mergekit runs may so hold ``t: true``
(1.0), ``weight: "0.5"`` (a quoted number), ``normalize: "yes"`` or ``max_iter: "5"``, and
``weight: ["0.2", "0.8"]`` is a gradient for a number parameter. These are pydantic's lax
rules for the four kinds distmerge's parameters have, measured against pydantic 2 in
mergekit's own environment (``tests/methods/test_lax_scalars.py`` holds the table):

- a number (float): a bool (1.0 / 0.0), an int, a float, or a string Python reads as a float
  (``"1e-3"``, ``"inf"``, ``"1_000"``) once the whitespace around it is stripped (Unicode's
  White_Space, as Rust's ``trim``) and its underscores dropped, ASCII only; an underscore may
  not lead, end or follow another (``"0_.5"`` is 0.5, ``"1__0"`` refused);
- a count (int): a bool, an int, a float with no fraction, a string of digits (``"5"``,
  ``"1_000"``, underscores as Python's ``int`` takes them) or digits then ``.0`` (``"5.0"``),
  the whitespace around it stripped;
- a switch (bool): a bool, 0 or 1 as int or float, or one of ``0 off f false n no`` /
  ``1 on t true y yes`` in any case, with no whitespace around it;
- a label (str): a string only.

What is not finite is still refused later, by :class:`distmerge.methods.base.ParamSpec`: a NaN
or infinite parameter would poison every merged weight (mergekit runs it).
"""

from __future__ import annotations

import re
from typing import Any

# Unicode's White_Space property, what pydantic (Rust's str::trim) strips around a number;
# Python's str.strip() would also strip the separators \x1c-\x1f, which pydantic refuses.
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_WHOLE = re.compile(r"[+-]?[0-9](?:_?[0-9])*(?:\.0+)?")
_INT64 = 2**63  # pydantic refuses a float beyond it as a count (1e20), though Python's int takes it


def lax_scalar(kind: type, value: Any) -> Any:
    """``value`` as a ``kind`` (float, int, bool or str) under mergekit's lax reading, or
    ``ValueError`` when mergekit would refuse it too."""
    if kind is str:
        if isinstance(value, str):
            return value
    elif kind is bool:
        return _switch(value)
    elif isinstance(value, bool):
        return kind(value)
    elif kind is float:
        return _number(value)
    elif kind is int:
        return _count(value)
    raise ValueError(value)


def _number(value: Any) -> float:
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an int past float's range
            raise ValueError(value) from None
    if isinstance(value, str):
        text = value.strip(_WHITE_SPACE)
        if text.isascii() and not (text.startswith("_") or text.endswith("_") or "__" in text):
            return float(text.replace("_", ""))  # ValueError when it is no number
    raise ValueError(value)


def _count(value: Any) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) < _INT64:
        return int(value)
    if isinstance(value, str) and _WHOLE.fullmatch(text := value.strip(_WHITE_SPACE)):
        return int(text.split(".")[0])
    raise ValueError(value)


def _switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    word = value.lower() if isinstance(value, str) else None
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(value)

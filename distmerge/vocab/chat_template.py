"""``chat_template``: a named template, ``auto``, or a literal Jinja string, as mergekit 0.1.5's
``_set_chat_template`` resolves it, and the output tokenizer's files.

A value under 256 characters with no newline and no ``{`` that names a file of
``distmerge/data/chat_templates`` is that template (distmerge's own templates: their text differs
from mergekit's, what they render does not); ``auto`` is the template most of the models have
(the first seen among equals; none: the tokenizer keeps its own); anything else must hold a ``{``
and be at least 20 characters, and is the template itself. The tokenizer is then saved
with ``save_pretrained``, which writes the template as transformers does (``chat_template.jinja``
in current releases).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from distmerge.errors import ConfigError
from distmerge.vocab.files import load_tokenizer

TEMPLATES_PACKAGE = "distmerge.data"
TEMPLATES_DIR = "chat_templates"


def named_templates() -> list[str]:
    folder = resources.files(TEMPLATES_PACKAGE).joinpath(TEMPLATES_DIR)
    return sorted(p.name[:-6] for p in folder.iterdir() if p.name.endswith(".jinja"))


def resolve_chat_template(value: str | None, models: Sequence[str] = ()) -> str | None:
    """The template text for a config's ``chat_template`` (None: leave the tokenizer's own)."""
    if not value:
        return None
    if value == "auto":
        found = []
        for i, model in enumerate(models):
            tok = load_tokenizer(model, f"models[{i}]")
            template = getattr(tok, "chat_template", None) if tok is not None else None
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value and value in named_templates():
        path = resources.files(TEMPLATES_PACKAGE).joinpath(TEMPLATES_DIR).joinpath(value + ".jinja")
        return path.read_text(encoding="utf-8")
    if len(value) < 20 or "{" not in value:
        raise ConfigError(f"chat_template: {value[:60]!r} is neither a named template ("
                          + ", ".join(named_templates()) + "), 'auto', nor a Jinja template")
    return value


def tokenizer_files(tokenizer: Any, chat_template: str | None = None) -> dict[str, bytes]:
    """The files ``tokenizer.save_pretrained`` writes, by name, with ``chat_template`` set
    first when given (the output layer writes them where and how it writes side files)."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    with tempfile.TemporaryDirectory(prefix="distmerge-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}

"""Rendering chat templates the way transformers does, for comparing distmerge's named templates
with mergekit 0.1.5's: each conversation is rendered by transformers' own ``render_jinja_template``
(what ``apply_chat_template`` calls) and by a plain jinja2 ``ImmutableSandboxedEnvironment`` with
the same settings (``trim_blocks``, ``lstrip_blocks``, a ``raise_exception`` global); the outcome
is the rendered string, or the exception the template raised."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers.utils.chat_template_utils import render_jinja_template

from tests.vocab.conftest import MERGEKIT_HOME, mergekit_missing

# mergekit's templates: in its venv's site-packages, else an unpacked mergekit 0.1.5 source tree.
MERGEKIT_SOURCE = Path("/work/mk/mergekit-0.1.5")
SUBDIR = Path("mergekit/_data/chat_templates")
DEFAULT_TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}


def mergekit_templates_dir() -> Path | None:
    """mergekit's chat templates (the reference venv is made on first use unless opted out)."""
    mergekit_missing()  # makes the venv on first use, unless explicitly opted out
    candidates = sorted(MERGEKIT_HOME.glob(f"lib/python*/site-packages/{SUBDIR}"))
    candidates.append(MERGEKIT_SOURCE / SUBDIR)
    return next((d for d in candidates if (d / "chatml.jinja").is_file()), None)


def mergekit_missing_reason() -> str:
    return (f"mergekit 0.1.5's chat templates are not here (neither {MERGEKIT_HOME}/lib/python*/"
            f"site-packages/{SUBDIR} nor {MERGEKIT_SOURCE / SUBDIR})")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=32)
def _plain(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def _by_transformers(template, messages, generation, tokens):
    return render_jinja_template([messages], chat_template=template,
                                 add_generation_prompt=generation, **tokens)[0][0]


def _by_jinja(template, messages, generation, tokens):
    return _plain(template).render(messages=messages, add_generation_prompt=generation, **tokens)


RENDERERS = {"transformers": _by_transformers, "jinja2": _by_jinja}


def outcome(renderer: str, template: str, messages: list, generation: bool,
            tokens: dict | None = None) -> tuple:
    """("text", rendered) or ("error", exception type, kind); kind tells apart the refusals a
    template raises itself (raise_exception: roles out of order vs a role not supported)."""
    tokens = DEFAULT_TOKENS if tokens is None else tokens
    try:
        return "text", RENDERERS[renderer](template, messages, generation, tokens)
    except Exception as e:  # the comparison is of what each template does, errors included
        kind = ""
        if type(e) is jinja2.exceptions.TemplateError:
            kind = "alternation" if "alternate" in str(e) else "unsupported role"
        return "error", type(e).__name__, kind


def assert_same_rendering(ours: str, theirs: str, messages: list, generation: bool,
                          tokens: dict | None = None) -> tuple:
    """Both templates give the same outcome under both renderers; returns transformers' one."""
    results = []
    for renderer in RENDERERS:
        got = outcome(renderer, ours, messages, generation, tokens)
        want = outcome(renderer, theirs, messages, generation, tokens)
        assert got == want, (renderer, messages, generation, tokens)
        results.append(want)
    return results[0]

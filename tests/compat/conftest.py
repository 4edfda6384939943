"""Fixtures of the mergekit compatibility suite: pico models built once per session, and the
reference environment (created on first use; a failure to create it fails every case unless
``DISTMERGE_SKIP_MERGEKIT=1`` opts out explicitly)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distmerge.testing import mergekit_reference as ref
from tests.compat.cases import MODELS, Case

log = logging.getLogger(__name__)

RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="session")
def mergekit_exe() -> Path:
    if os.environ.get(ref.OPT_OUT_ENV) == "1":
        pytest.skip(f"{ref.OPT_OUT_ENV}=1: mergekit comparison explicitly opted out")
    try:
        return ref.ensure_reference_env()
    except ref.ReferenceUnavailable as e:
        pytest.fail(f"mergekit reference environment unavailable ({e}); set {ref.OPT_OUT_ENV}=1 to opt out",
                    pytrace=False)


class PicoModels:
    """Builds each named model of ``cases.MODELS`` on first use (deterministic from its seed)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.built:
            from distmerge.testing import pico

            builder, kwargs, tok = MODELS[name]
            if builder == "lora":
                from distmerge.testing.compare import load_folder
                from tests.inputs.lora_fixtures import write_adapter

                kwargs = dict(kwargs)
                state = load_folder(self[kwargs.pop("base")])
                write_adapter(self.root / name, state, **kwargs)
                path = self.root / name
            else:
                path = getattr(pico, f"make_{builder}")(self.root / name, **kwargs)
            if tok is not None:
                t = pico.make_tokenizer(tok["vocab_size"], tok["added"])
                if tok.get("special"):
                    t.add_special_tokens({"additional_special_tokens": [pico.special_token(s)
                                                                        for s in tok["special"]]})
                t.save_pretrained(path)
            self.built[name] = path
        return self.built[name]


@pytest.fixture(scope="session")
def pico_models(tmp_path_factory: pytest.TempPathFactory) -> PicoModels:
    return PicoModels(tmp_path_factory.mktemp("pico"))


def resolve(value: Any, models: PicoModels) -> Any:
    """A case's config with each ``@name`` replaced by the path of that pico model."""
    if isinstance(value, str) and value.startswith("@"):  # "@model" or "@model+@adapter"
        return "+".join(str(models[part[1:]]) for part in value.split("+"))
    if isinstance(value, list):
        return [resolve(v, models) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, models) for k, v in value.items()}
    return value


@pytest.fixture(scope="session")
def references(request: pytest.FixtureRequest, mergekit_exe: Path,
               pico_models: PicoModels) -> dict[str, Path | RuntimeError]:
    """mergekit's output (or its refusal) for every selected case, run in one batch on first
    use: one mergekit process per CPU instead of one per case (minutes saved on a cold cache)."""
    selected: dict[str, Case] = {}
    for item in request.session.items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if isinstance(case, Case):
            selected[case.id] = case
    jobs = [(resolve(c.reference_config(), pico_models), {n: pico_models[n] for n in sorted(c.models())})
            for c in selected.values()]
    started = time.perf_counter()
    outputs = ref.run_references(jobs)
    log.info("mergekit 0.1.5 reference outputs for %d cases in %.1f s", len(jobs), time.perf_counter() - started)
    return dict(zip(selected, outputs, strict=True))


@pytest.fixture(scope="session", autouse=True)
def compat_results() -> Iterator[dict[str, dict]]:
    """Per-case agreement figures; written to $DISTMERGE_COMPAT_REPORT (JSON) when set."""
    yield RESULTS
    target = os.environ.get("DISTMERGE_COMPAT_REPORT")
    if target and RESULTS:
        Path(target).write_text(json.dumps(RESULTS, indent=1, sort_keys=True))

"""The architecture's shapes for the verification: built by a child process, cached on disk, the
same as an in-process build; a damaged cache file is rebuilt, never trusted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from distmerge.output import architecture
from distmerge.output.architecture import (
    build_architecture,
    cache_file,
    expected_architecture,
    prepare_architecture,
    shape_key,
)


@pytest.fixture()
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DISTMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(architecture, "_MEMORY", {})
    monkeypatch.setattr(architecture, "_CHILDREN", {})
    return tmp_path / "cache"


def test_a_child_builds_and_caches_what_an_in_process_build_gives(llama_family, fresh_cache, monkeypatch):
    config = json.loads((llama_family[0] / "config.json").read_text())
    config["intermediate_size"] += 8  # a config no other test has cached
    prepare_architecture(config)
    child = architecture._CHILDREN[shape_key(config)]
    built_here = build_architecture(config)
    assert built_here is not None and "model.layers.0.mlp.up_proj.weight" in built_here
    got = expected_architecture(config)
    assert child.returncode == 0 and not architecture._CHILDREN
    assert got == built_here and got["model.layers.0.mlp.up_proj.weight"][0] == config["intermediate_size"]
    assert cache_file(shape_key(config)).is_file() and cache_file(shape_key(config)).parent.parent == fresh_cache

    # A new process (memory empty) reads the disk, builds nothing, starts no child.
    monkeypatch.setattr(architecture, "_MEMORY", {})
    monkeypatch.setattr(architecture, "build_architecture", lambda c: pytest.fail("built again"))
    prepare_architecture({**config, "torch_dtype": "bfloat16"})  # only the dtype differs: same shapes
    assert not architecture._CHILDREN
    assert expected_architecture(config) == built_here


def test_a_damaged_or_foreign_cache_file_is_rebuilt(llama_family, fresh_cache, monkeypatch):
    config = json.loads((llama_family[0] / "config.json").read_text())
    key = shape_key(config)
    path = cache_file(key)
    path.parent.mkdir(parents=True)
    truth = build_architecture(config)
    for damaged in ("{not json", json.dumps({"key": "another config", "shapes": {"x": [1]}}),
                    json.dumps({"key": key, "shapes": {"x": ["a"]}}), json.dumps([1, 2])):
        path.write_text(damaged)
        monkeypatch.setattr(architecture, "_MEMORY", {})
        assert expected_architecture(config) == truth
        assert json.loads(path.read_text())["key"] == key  # rewritten whole


def test_an_architecture_transformers_cannot_build_is_kept_as_such(fresh_cache, monkeypatch):
    """A custom architecture fails its build once: the child's failure is kept on disk, and
    neither this process nor a later one tries again (each try is seconds of imports)."""
    config = {"model_type": "no-such-architecture"}
    prepare_architecture(config)  # the child fails; never raises
    monkeypatch.setattr(architecture, "_build", lambda c: pytest.fail("built again after the child"))
    assert expected_architecture(config) is None
    assert architecture._CHILDREN == {}
    assert json.loads(cache_file(shape_key(config)).read_text()) == {"key": shape_key(config), "shapes": None}

    monkeypatch.setattr(architecture, "_MEMORY", {})  # a new process
    prepare_architecture(config)
    assert architecture._CHILDREN == {}  # no child started
    assert expected_architecture(config) is None


def test_a_config_without_a_model_type_imports_nothing(fresh_cache, monkeypatch):
    """``config.json`` of ``{}`` (a hand-made folder): no child, no import of transformers."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # an import would raise ImportError
    prepare_architecture({})
    assert architecture._CHILDREN == {}
    assert expected_architecture({}) is None
    assert expected_architecture({"model_type": 7}) is None


def test_a_failed_import_is_not_kept(fresh_cache, monkeypatch):
    """transformers missing, or a package its model class needs: no shapes now, but installing
    it could give them, so nothing is kept on disk and the next process tries again."""
    config = {"model_type": "llama"}
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "transformers", None)
        assert expected_architecture(config) is None
    assert not cache_file(shape_key(config)).exists()

    import transformers

    def needs_a_package(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'some_kernel_package'")

    monkeypatch.setattr(architecture, "_MEMORY", {})
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", needs_a_package)
    assert expected_architecture(config) is None
    assert not cache_file(shape_key(config)).exists()


def test_a_broken_environment_or_an_unwritable_cache_is_a_warning_not_a_crash(fresh_cache, monkeypatch):
    """A non-ImportError from the imports (a torch library that will not load) is not kept
    and does not escape; nor does a cache file that cannot be written (here a folder in its
    place), for a config that builds or one that does not."""
    import types

    class Broken(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            raise OSError("libcudart.so.12: cannot open shared object file")

    config = {"model_type": "llama"}
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "accelerate", Broken("accelerate"))
        assert expected_architecture(config) is None
    assert not cache_file(shape_key(config)).exists()

    for unwritable in ({}, {"model_type": "no-such-architecture"}):
        cache_file(shape_key(unwritable)).mkdir(parents=True)
        assert expected_architecture(unwritable) is None


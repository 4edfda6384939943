"""A finishing merge verifies at a fraction of its output: a sample read back, NaN/Inf from the workers.

The sample's rule is checked on its own (first and last range of every file, every k-th one
between); a damaged range the sample holds is found, one it skips is left to the full
``distmerge verify`` (both shown on the same damaged copy); NaN/Inf that a cast to float16
creates stop the merge at the first block that has them, and with ``allow_nonfinite`` are
reported per tensor with the count an independent ``torch.isfinite`` over the output gives.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distmerge.config import parse_config
from distmerge.engine.run import run_merge
from distmerge.errors import ConfigError, OutputError
from distmerge.io.safetensors import INDEX_NAME, parse_safetensors_header
from distmerge.output.manifest import MANIFEST_NAME, load_manifest
from distmerge.output.verify import verify_output
from distmerge.output.verify_sample import SAMPLE_EVERY, sampled_ranges
from tests.helpers import make_config

pytestmark = pytest.mark.usefixtures("ray_local")


class _Info:
    """The two things the sample needs of a tensor: its file and where a row range starts."""

    def __init__(self, file: str, start: int, row_bytes: int) -> None:
        self.file, self._start, self._row = file, start, row_bytes

    def span(self, r0: int, r1: int) -> tuple[int, int]:
        return self._start + r0 * self._row, (r1 - r0) * self._row


def test_the_sample_takes_each_files_first_and_last_range_and_every_kth_between():
    infos = {"a": _Info("f1", 0, 10), "b": _Info("f1", 1000, 10), "c": _Info("f2", 0, 4)}
    covered = {"a": [[r, r + 10, 0] for r in range(0, 100, 10)],  # f1 offsets 0..900
               "b": [[r, r + 5, 0] for r in range(0, 50, 5)],  # f1 offsets 1000..1450
               "c": [[0, 3, 0]]}
    picked = sampled_ranges(covered, infos, 4)
    # f1 in file order: a's 10 ranges (0-9), then b's (10-19): 0, 4, 8, 12, 16 and the last, 19.
    assert picked["a"] == [[0, 10, 0], [40, 50, 0], [80, 90, 0]]
    assert picked["b"] == [[10, 15, 0], [30, 35, 0], [45, 50, 0]]
    assert picked["c"] == [[0, 3, 0]]  # a file of one range: that range
    assert sampled_ranges(covered, infos, 1) == covered


def test_verify_settings_and_what_the_report_says(llama_family, tmp_path):
    base, experts = llama_family
    cfg = make_config("task_arithmetic", base, experts, [0.6, 0.3])
    assert cfg.execution.verify == "sample"
    for given, meant in ((True, "full"), (False, "layout"), ("full", "full")):
        assert parse_config({**cfg.model_dump(mode="json"), "execution": {"verify": given}}).execution.verify == meant
    with pytest.raises(ConfigError, match="execution.verify: 'all' is not one of sample, full, layout"):
        parse_config({**cfg.model_dump(mode="json"), "execution": {"verify": "all"}})
    reports, whole = {}, {}
    for mode in ("sample", "full", "layout"):
        data = {**cfg.model_dump(mode="json"), "execution": {"verify": mode}}
        whole[mode] = run_merge(parse_config(data), tmp_path / mode, shard_size=20000, progress=False)
        reports[mode] = whole[mode]["verify"]
    # Where the time went, phase by phase, within the run's own seconds.
    phases = whole["sample"]["phases_s"]
    assert {"plan", "output", "ray", "open files", "merge", "side files", "verify"} <= set(phases)
    assert all(s >= 0 for s in phases.values()) and sum(phases.values()) <= whole["sample"]["seconds"] + 0.5
    total = reports["full"]["checksums_total"]
    assert total > 2 * SAMPLE_EVERY and reports["sample"]["checksums_total"] == total
    assert reports["full"]["checksums_verified"] == total and reports["full"]["read_back"] == "all"
    sampled = reports["sample"]["checksums_verified"]
    assert reports["sample"]["read_back"] == "sample" and 2 <= sampled <= total // SAMPLE_EVERY + 2 * 2
    assert reports["sample"]["bytes_scanned"] < reports["full"]["bytes_scanned"] / 4
    assert reports["layout"]["checksums_verified"] == 0 and reports["layout"]["read_back"] == "none"
    assert all(r["ok"] for r in reports.values())


def _range_offset(out: Path, entry_index: int) -> tuple[Path, int]:
    """The file and byte offset of the ``entry_index``-th checksummed range in file order."""
    manifest = load_manifest(out / MANIFEST_NAME)
    (name, entry), = manifest["files"].items()
    infos, _ = parse_safetensors_header(out / name)
    spans = sorted(infos[t].span(r0, r1)[0] for t, ranges in entry["tensors"].items() for r0, r1, _ in ranges)
    return out / name, spans[entry_index]


def test_a_damaged_sampled_range_is_found_and_a_skipped_one_only_by_the_full_check(llama_family, tmp_path):
    base, experts = llama_family
    out = tmp_path / "out"
    run_merge(make_config("task_arithmetic", base, experts, [0.6, 0.3]), out, shard_size=20000, progress=False)
    weight_map = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    manifest = load_manifest(out / MANIFEST_NAME)

    def check(copy: Path, **how) -> list[str]:
        return verify_output(copy, weight_map=weight_map, manifest=manifest, **how).problems

    for index, found_by_sample in ((0, True), (1, False)):  # range 0 is always sampled; range 1 never (k > 1)
        copy = tmp_path / f"damaged-{index}"
        shutil.copytree(out, copy)
        path, offset = _range_offset(copy, index)
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x10]))
        sampled = check(copy, deep=False, sample_every=SAMPLE_EVERY)
        assert bool(sampled) == found_by_sample and all("fail their checksum" in p for p in sampled)
        assert any("fail their checksum" in p for p in check(copy, deep=True))


def test_nan_and_inf_made_by_the_merge_stop_it_or_are_counted_without_reading_back(llama_family, tmp_path):
    base, experts = llama_family
    data = make_config("linear", None, experts, [1e7, 1e7]).model_dump(mode="json")
    data.update(dtype="float32", out_dtype="float16", parameters={"normalize": False})  # |values| * 2e7 > 65504
    with pytest.raises(OutputError, match=r"tensor '.*' rows \d+:\d+: the merge makes \d+ NaN/Inf values in float16"):
        run_merge(parse_config(data), tmp_path / "out", progress=False)  # at the first such block
    assert not (tmp_path / "out" / INDEX_NAME).exists()
    report = run_merge(parse_config({**data, "execution": {"allow_nonfinite": True}}), tmp_path / "kept",
                       progress=False)
    counted = {}
    for w in report["verify"]["warnings"]:
        if "NaN/Inf values" in w:
            name = w.split("tensor '")[1].split("'")[0]
            counted[name] = int(w.split(" has ")[1].split()[0])
    merged = {}
    for f in sorted((tmp_path / "kept").glob("model-*.safetensors")):
        merged.update(load_file(f))
    expected = {n: int((~torch.isfinite(t.float())).sum()) for n, t in merged.items()}
    assert counted and counted == {n: c for n, c in expected.items() if c}
    assert report["verify"]["read_back"] == "sample"


def test_the_architecture_is_built_once_per_shape_relevant_config(llama_family):
    from distmerge.output.architecture import expected_architecture, prepare_architecture

    config = json.loads((llama_family[0] / "config.json").read_text())
    first = expected_architecture({**config, "torch_dtype": "float32"})
    assert first is not None and "model.embed_tokens.weight" in first
    assert expected_architecture({**config, "torch_dtype": "bfloat16"}) is first  # the merge rewrote only the dtype
    wider = expected_architecture({**config, "intermediate_size": config["intermediate_size"] * 2})
    assert wider is not first and wider["model.layers.0.mlp.up_proj.weight"][0] == config["intermediate_size"] * 2
    prepare_architecture({"model_type": "no-such-architecture"})  # never raises: verification reports it
    assert expected_architecture({"model_type": "no-such-architecture"}) is None

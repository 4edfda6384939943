"""Reliability: reruns are no-ops, interrupted merges resume to identical bytes, a killed worker
or driver costs only unfinished work, journals of other merges are refused, verify catches damage."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from distmerge.cli import main
from distmerge.engine.run import run_merge
from distmerge.errors import OutputError
from distmerge.output.journal import JOURNAL_NAME
from tests.helpers import ST_ITEMSIZE, file_bytes, make_config, safetensors_header

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def clean_run(llama_family, tmp_path_factory):
    """A reference merge, uninterrupted."""
    base, experts = llama_family
    cfg = make_config("task_arithmetic", base, experts, [0.6, 0.3])
    out = tmp_path_factory.mktemp("clean") / "out"
    run_merge(cfg, out, shard_size=20000, progress=False)
    return cfg, out


def test_rerun_of_finished_merge_is_a_noop(clean_run):
    cfg, out = clean_run
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    started = time.perf_counter()
    report = run_merge(cfg, out, progress=False)
    assert report["noop"] is True and time.perf_counter() - started < 5
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_fingerprint_directory_changes_with_inputs(llama_family, tmp_path):
    base, experts = llama_family
    copy = tmp_path / "expert"
    copy.mkdir()
    for p in experts[1].iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    cfg = make_config("task_arithmetic", base, [experts[0], copy], [0.5, 0.5])
    first = run_merge(cfg, tmp_path / "nightly-{fingerprint}", progress=False)
    assert first["out_dir"] == str(tmp_path / f"nightly-{first['fingerprint']}")
    again = run_merge(cfg, tmp_path / "nightly-{fingerprint}", progress=False)
    assert again["noop"] and again["out_dir"] == first["out_dir"]
    assert again["fingerprint"] == first["fingerprint"]  # the CLI's "already complete" line prints it
    victim = sorted(copy.glob("model-*.safetensors"))[0]
    os.utime(victim, ns=(time.time_ns(), time.time_ns()))  # a re-saved fine-tune
    second = run_merge(cfg, tmp_path / "nightly-{fingerprint}", progress=False)
    assert second["fingerprint"] != first["fingerprint"] and not second.get("noop")
    assert (tmp_path / f"nightly-{first['fingerprint']}" / "model.safetensors.index.json").exists()


def test_journal_of_another_merge_is_refused(clean_run, llama_family):
    cfg, out = clean_run
    base, experts = llama_family
    other = make_config("task_arithmetic", base, experts, [0.6, 0.9])
    with pytest.raises(OutputError, match=r"holds a finished merge of different inputs or config \(the config differs \(models\)\)"):
        run_merge(other, out, progress=False)


def test_an_interrupted_run_of_another_minor_version_is_not_resumed(llama_family, tmp_path, monkeypatch):
    """0.2 changed DARE's and DELLA's masks (0.3 model stock's Gram sums): a run another minor
    version began is refused, the refusal naming the version (resuming it would mix two
    streams' masks in one model); the same minor version resumes it."""
    import distmerge.output.journal as journal

    base, experts = llama_family
    cfg = make_config("dare_ties", base, experts, [0.6, 0.3], parameters={"density": 0.5})
    out = tmp_path / "out"
    monkeypatch.setattr(journal, "__version__", "0.1.0")
    run_merge(cfg, out, shard_size=20000, progress=False)
    _interrupt(out, keep_units=3, damage=False)
    monkeypatch.setattr(journal, "__version__", "0.2.0")
    with pytest.raises(OutputError, match=r"the config differs \(distmerge version\)"):
        run_merge(cfg, out, shard_size=20000, progress=False)
    monkeypatch.setattr(journal, "__version__", "0.1.7")
    report = run_merge(cfg, out, shard_size=20000, progress=False)
    assert not report.get("noop") and (out / "model.safetensors.index.json").exists()


def _interrupt(out, keep_units: int, damage: bool) -> None:
    """Turn a finished output into what a crash leaves: no index, a partial journal, lost writes."""
    (out / "model.safetensors.index.json").unlink()
    lines = (out / JOURNAL_NAME).read_text().splitlines()
    header, units = lines[0], [line for line in lines[1:] if '"kind":"unit"' in line]
    (out / JOURNAL_NAME).write_text("\n".join([header, *units[:keep_units]]) + '\n{"kind":"unit","t":')
    for f in out.glob("model-*.safetensors"):
        f.rename(f.with_name(f.name + ".partial"))
        if damage:  # a write the journal recorded but the disk lost
            with open(f.with_name(f.name + ".partial"), "r+b") as fh:
                fh.seek(-3, os.SEEK_END)
                fh.write(b"\xff\xff\xff")


def _units_merged(report: dict[str, Any]) -> int:
    """Units the workers' batch results say they merged in this run (summed per node)."""
    return sum(node["units"] for node in report["nodes"].values())


def _recomputed(report: dict[str, Any]) -> set[tuple[int, int, int]]:
    """(tensor, row_start, row_end) of every unit a worker merged in this run."""
    return {(t, r0, r1) for t, r0, r1, _crc in report["unit_checksums"]}


def _unit_bytes(out: Path, tensor: str, r0: int, r1: int) -> tuple[Path, int, int]:
    """File and absolute byte range of rows [r0, r1) of ``tensor`` in an output directory,
    from the safetensors headers (parsed by the test, not by distmerge)."""
    for path in sorted(out.glob("model-*.safetensors*")):
        data_start, header = safetensors_header(path)
        if tensor in header:
            entry = header[tensor]
            row_bytes = math.prod(entry["shape"][1:]) * ST_ITEMSIZE[entry["dtype"]]
            return path, data_start + entry["data_offsets"][0] + r0 * row_bytes, (r1 - r0) * row_bytes
    raise AssertionError(f"no output file holds {tensor!r}")


def test_resume_after_crash_gives_identical_bytes(clean_run, tmp_path):
    cfg, clean = clean_run
    out = tmp_path / "out"
    total = run_merge(cfg, out, shard_size=20000, progress=False)["units"]
    _interrupt(out, keep_units=total // 2, damage=True)
    report = run_merge(cfg, out, progress=False)
    assert 0 < report["resumed_units"] < total // 2 + 1
    assert file_bytes(out) == file_bytes(clean)
    assert report["verify"]["ok"] and report["verify"]["checksums_total"] >= total
    assert report["verify"]["checksums_verified"] >= 2  # a sample (test_verify_sample.py), the resumed units' included
    # The work the workers report having done, not the size of the skip list: every unit
    # not skipped, and none of the skipped ones.
    assert _units_merged(report) == len(_recomputed(report)) == total - report["resumed_units"]


def test_resume_recomputes_a_journaled_unit_whose_bytes_were_lost(clean_run, tmp_path):
    """A crash can lose writes the journal already recorded. A unit that IS in the surviving
    journal but whose bytes on disk were damaged must be recomputed (its CRC no longer
    matches), and it must be the only journaled unit that is."""
    cfg, clean = clean_run
    out = tmp_path / "out"
    total = run_merge(cfg, out, shard_size=20000, progress=False)["units"]
    records = [json.loads(line) for line in (out / JOURNAL_NAME).read_text().splitlines()]
    names = records[0]["tensors"]
    journaled = [(r["t"], r["r0"], r["r1"]) for r in records if r["kind"] == "unit"]
    assert len(set(journaled)) == total > 8
    keep = total // 2
    kept = journaled[:keep]
    _interrupt(out, keep_units=keep, damage=False)
    # A kept unit from the middle of the kept ones, of at least 64 bytes, whose rows do not
    # reach the end of its file (the bytes _interrupt's damage hits): flip 16 of its bytes.
    for victim in kept[keep // 2:]:
        path, start, length = _unit_bytes(out, names[victim[0]], *victim[1:])
        if length >= 64 and start + length < path.stat().st_size:
            break
    else:
        raise AssertionError("no kept unit to damage")
    with open(path, "r+b") as fh:
        fh.seek(start + length // 2)
        original = fh.read(16)
        fh.seek(start + length // 2)
        fh.write(bytes(b ^ 0xFF for b in original))
    with open(clean / path.name.removesuffix(".partial"), "rb") as fh:
        fh.seek(start + length // 2)
        assert fh.read(16) == original  # the damaged bytes were the clean run's
    report = run_merge(cfg, out, progress=False)
    assert file_bytes(out) == file_bytes(clean)
    assert _recomputed(report) == (set(journaled) - set(kept)) | {victim}
    assert _units_merged(report) == total - keep + 1
    assert report["resumed_units"] == keep - 1


def test_resume_flag_without_journal_and_non_empty_dir(llama_family, tmp_path):
    base, experts = llama_family
    cfg = make_config("linear", None, experts, [1, 1])
    with pytest.raises(OutputError, match="nothing to resume"):
        run_merge(cfg, tmp_path / "empty", resume=True, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(OutputError, match="not empty and holds no distmerge journal"):
        run_merge(cfg, tmp_path / "busy", progress=False)


def _merge_processes() -> list[psutil.Process]:
    """Merge task workers of the Ray this process runs (its raylet is our child), and only
    those: a Ray of another test process on this machine is not touched."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::merge_batch_task"):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_killed_worker_costs_only_its_unit(clean_run, tmp_path):
    cfg, clean = clean_run
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            for p in _merge_processes():
                try:
                    p.send_signal(signal.SIGKILL)
                    killed.append(p.pid)
                    return
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.01)

    thread = threading.Thread(target=killer)
    thread.start()
    run_merge(cfg, tmp_path / "out", shard_size=20000, workers=2, progress=False)
    thread.join()
    assert killed, "no merge worker was seen to kill"
    assert file_bytes(tmp_path / "out") == file_bytes(clean)


def test_killed_driver_is_resumed_by_rerunning(clean_run, tmp_path):
    cfg, clean = clean_run
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "distmerge", "merge", str(path), str(out), "--shard-size", "20KB", "--no-progress"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            journal = out / JOURNAL_NAME
            if journal.exists() and journal.read_text().count('"kind":"unit"') >= 30:
                break
            assert proc.poll() is None, "the merge ended before it could be interrupted"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (out / "model.safetensors.index.json").exists()
    rerun = subprocess.run([*command[:-3], "--no-progress"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming:" in rerun.stderr
    assert file_bytes(out) == file_bytes(clean)


def test_verify_command(clean_run, tmp_path, capsys):
    _, clean = clean_run
    out = tmp_path / "copy"
    out.mkdir()
    for p in clean.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    assert main(["verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    victim = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0x40
    victim.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    assert "fail their checksum" in capsys.readouterr().out
    (out / "model.safetensors.index.json").unlink()
    assert main(["verify", str(out)]) == 1
    assert "did not finish" in capsys.readouterr().out


def test_report_records_verification(clean_run):
    _, clean = clean_run
    report = json.loads((clean / "merge_report.json").read_text())
    assert report["verify"]["ok"] and report["verify"]["problems"] == []
    assert report["verify"]["tensors"] == report["tensors"]

"""The single-machine path (threads of this process, no Ray) and the Ray path give the same bytes
for every method; ``auto`` takes the local path where no Ray is asked for and never imports Ray;
refusals are one line; a failing batch stops the others and nothing is published."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from distmerge.config import parse_config
from distmerge.engine.executors import choose_executor, run_threaded
from distmerge.engine.run import run_merge
from distmerge.errors import CheckpointError, ConfigError
from distmerge.methods import METHODS
from distmerge.testing.method_cases import CASES, method_config
from tests.helpers import file_bytes

pytestmark = pytest.mark.usefixtures("ray_local")


def _config(method: str, base: Path, experts: list[Path], **execution: Any) -> dict[str, Any]:
    """``method``'s case (``distmerge.testing.method_cases``) with a fixed seed and ``execution``."""
    return method_config(method, base, experts, execution={"seed": 3, **execution})


def test_every_method_of_the_registry_has_a_case():
    assert set(CASES) == set(METHODS)


@pytest.mark.parametrize("method", sorted(CASES))
def test_local_and_ray_give_the_same_bytes(llama_family, tmp_path, method):
    base, experts = llama_family
    cfg = parse_config(_config(method, base, experts))
    on_ray = run_merge(cfg, tmp_path / "ray", executor="ray", shard_size=60_000, workers=2, progress=False)
    local = run_merge(cfg, tmp_path / "local", executor="local", shard_size=60_000, workers=2, progress=False)
    assert (on_ray["executor"], local["executor"]) == ("ray", "local")
    assert local["units"] == on_ray["units"] > 4
    assert file_bytes(tmp_path / "local") == file_bytes(tmp_path / "ray")
    assert json.loads((tmp_path / "local" / "merge_report.json").read_text())["executor"] == "local"
    assert "local" in local["phases_s"] and "ray" not in local["phases_s"]


def test_local_threads_and_one_thread_agree_under_any_sharding(llama_family, tmp_path):
    base, experts = llama_family
    cfg = parse_config(_config("ties", base, experts))
    run_merge(cfg, tmp_path / "one", executor="local", shard_size=10**12, workers=1, progress=False)
    run_merge(cfg, tmp_path / "many", executor="local", shard_size=20_000, workers=5, progress=False)
    assert file_bytes(tmp_path / "one") == file_bytes(tmp_path / "many")


def test_auto_is_ray_here_because_this_process_runs_ray(llama_family):
    assert choose_executor("auto", None, None).name == "ray"
    assert choose_executor("local", None, None).name == "local"
    with pytest.raises(ConfigError, match="--ray-address joins a Ray cluster"):
        choose_executor("local", "ray://somewhere:10001", None)
    with pytest.raises(ConfigError, match="aim: calibrat"):
        choose_executor("local", None, "aim: calibrating needs Ray")


def _cli(*args: str, env: dict[str, str] | None = None, code: str = "") -> subprocess.CompletedProcess[str]:
    """The command in a fresh process (no Ray running there); ``code`` runs after it, same process."""
    script = ("import sys\nfrom distmerge.cli import main\nsys.argv = ['distmerge', *sys.argv[1:]]\n"
              f"rc = main()\n{code}\nsys.exit(rc)")
    import os

    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in {**os.environ, **(env or {})}.items() if k != "RAY_ADDRESS"})


def test_auto_merges_without_ray_and_never_imports_it(llama_family, tmp_path):
    base, experts = llama_family
    path = tmp_path / "m.yml"
    path.write_text(yaml.safe_dump(_config("ties", base, experts)))
    run = _cli("merge", str(path), str(tmp_path / "out"), "--no-progress",
               code="print('RAY IMPORTED' if 'ray' in sys.modules else 'no ray')")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "no ray" in run.stdout
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["executor"] == "local" and report["verify"]["ok"]
    assert report["phases_s"]["local"] < 0.5  # the pool "starts" at once (Ray's start: seconds)
    again = _cli("merge", str(path), str(tmp_path / "out"), "--no-progress")
    assert again.returncode == 0 and re.search(r"already complete: .* \(fingerprint [0-9a-f]{16}\)", again.stdout), again.stdout
    # The executor is not part of the merge's identity (same bytes): another one finds it done too.
    other = _cli("merge", str(path), str(tmp_path / "out"), "--no-progress", "--executor", "local")
    assert other.returncode == 0 and "already complete" in other.stdout, other.stderr[-2000:]
    ray_out = run_merge(parse_config(_config("ties", base, experts)), tmp_path / "ray", executor="ray", progress=False)
    assert ray_out["executor"] == "ray"
    assert file_bytes(tmp_path / "out") == file_bytes(tmp_path / "ray")


@pytest.mark.parametrize(("flags", "message"), [
    (("--executor", "local", "--ray-address", "127.0.0.1:1"), "drop one of them"),
    (("--executor", "threads"), "invalid choice: 'threads'"),
    (("--ray-address", "127.0.0.1:1"), "Ray cluster at 127.0.0.1:1 (--ray-address or RAY_ADDRESS): nothing answers"),
    (("--ray-address", "http://127.0.0.1:8265"), "not a Ray address (http:// is the dashboard's address"),
])
def test_refusals_are_one_line_without_traceback(llama_family, tmp_path, flags, message):
    base, experts = llama_family
    path = tmp_path / "m.yml"
    path.write_text(yaml.safe_dump(_config("linear", base, experts)))
    run = _cli("merge", str(path), str(tmp_path / "out"), "--no-progress", *flags)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()  # refused before OUT (its lock and journal) was made


def test_aim_calibrates_in_process_without_ray_and_writes_what_ray_writes(llama_family, tmp_path):
    """``auto`` with AIM calibrating one stage takes the local path: no Ray imported, the
    statistics computed in the command's process, and the merge's bytes those of the Ray
    executor merging with the same statistics; ``distmerge calibrate`` gives them too."""
    base, experts = llama_family
    aim = {"omega": 0.4, "calibration": {"n_samples": 8, "block_size": 512}}
    path = tmp_path / "m.yml"
    path.write_text(yaml.safe_dump({**_config("task_arithmetic", base, experts), "aim": aim}))
    run = _cli("merge", str(path), str(tmp_path / "out"), "--no-progress",
               code="print('RAY IMPORTED' if 'ray' in sys.modules else 'no ray')")
    assert run.returncode == 0 and "no ray" in run.stdout, run.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["executor"] == "local" and report["aim"]["relaxed_tensors"] > 10
    stages = json.loads(report["aim"]["metadata"]["stages"])
    assert [s["node_id"] for s in stages] == ["in-process"] and stages[0]["layers"][0] == 0
    stats = tmp_path / "stats.safetensors"
    cal = _cli("calibrate", str(path), "--out", str(stats), "--no-progress")
    assert cal.returncode == 0, cal.stderr[-2000:]
    saved = load_file(tmp_path / "out" / "aim_statistics.safetensors")
    assert saved.keys() == load_file(stats).keys() and all(torch.equal(v, load_file(stats)[k]) for k, v in saved.items())
    on_ray = {**_config("task_arithmetic", base, experts), "aim": {"omega": 0.4, "stats": str(stats)}}
    assert run_merge(parse_config(on_ray), tmp_path / "ray", executor="ray", progress=False)["executor"] == "ray"
    assert file_bytes(tmp_path / "out") == file_bytes(tmp_path / "ray")


def test_local_executor_refuses_a_calibration_pipeline_and_creates_nothing(llama_family, tmp_path):
    base, experts = llama_family
    data = {**_config("task_arithmetic", base, experts, executor="local"), "aim": {"omega": 0.4, "stages": 2}}
    path = tmp_path / "m.yml"
    path.write_text(yaml.safe_dump(data))
    run = _cli("merge", str(path), str(tmp_path / "out"), "--no-progress")
    assert run.returncode == 2 and "aim.stages: 2 asks for a pipeline of 2 Ray stage actors" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    cal = _cli("calibrate", str(path), "--out", str(tmp_path / "s.safetensors"), "--no-progress")
    assert cal.returncode == 2 and "use executor auto or ray" in cal.stderr and not (tmp_path / "s.safetensors").exists()
    # A cluster address nobody answers on: refused at once (Ray's own join retries without end).
    gone = _cli("calibrate", str(path), "--out", str(tmp_path / "s.safetensors"), "--no-progress",
                "--executor", "ray", "--ray-address", "127.0.0.1:1")
    assert gone.returncode == 2 and "nothing answers there" in gone.stderr and "Traceback" not in gone.stderr


@pytest.mark.parametrize(("executor", "method"), [("local", "linear"), ("ray", "linear"), ("ray", "ties")])
def test_a_failing_batch_stops_the_merge_and_publishes_nothing(llama_family, tmp_path, request, monkeypatch,
                                                              executor, method):
    """The failing task's error, as itself; the tasks still in flight waited for, never cancelled
    (a Ray cancel, forced or not, can race a task's reply and abort the driver process inside
    Ray), and nothing published."""
    cancels: list[object] = []
    if executor == "ray":
        request.getfixturevalue("ray_local")
        import ray

        monkeypatch.setattr(ray, "cancel", lambda ref, **kw: cancels.append(ref))
    base, experts = llama_family
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in experts[1].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = sorted(broken.glob("*.safetensors"))[-1]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].reshape(-1)[0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    cfg = parse_config(_config(method, base, [experts[0], broken]))
    with pytest.raises(CheckpointError, match=f"{name}.*NaN/Inf"):
        run_merge(cfg, tmp_path / "out", executor=executor, shard_size=20_000, workers=3, progress=False)
    assert cancels == []
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    # The same merge without the broken input still runs in this process afterwards.
    good = parse_config(_config(method, base, experts))
    run_merge(good, tmp_path / "good", executor=executor, shard_size=20_000, workers=3, progress=False)
    assert (tmp_path / "good" / "model.safetensors.index.json").exists()


class ListSchedule:
    """A schedule of independent tasks (what run_threaded drains), for the stop test."""

    def __init__(self, tasks: list[int]) -> None:
        self.tasks, self.running = list(tasks), 0

    def take(self) -> int | None:
        if not self.tasks:
            return None
        self.running += 1
        return self.tasks.pop(0)

    @property
    def finished(self) -> bool:
        return not self.tasks and not self.running

    def done(self, task: int, result: object) -> None:
        self.running -= 1


def test_run_threaded_stops_the_others_at_the_first_error():
    seen: list[int] = []

    def work(item: int, stop) -> int:
        if item == 2:
            raise ValueError("boom")
        for _ in range(200):  # a long batch: ends at its next block once told to stop
            if stop.wait(0.01):
                seen.append(-1 - item)
                return item
        seen.append(item)
        return item

    with pytest.raises(ValueError, match="boom"):
        run_threaded(work, ListSchedule(list(range(20))), 3, lambda item, result: None)
    assert seen and all(s < 0 for s in seen)  # every running batch saw the stop
    assert len(seen) <= 2  # and nothing after the failure started
    assert torch.get_num_threads() >= 1
